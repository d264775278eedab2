"""SEOT, SuppressEOT (Li et al., ICLR 2024, "Get What You Want, Not What You Don't"): hide a concept at generation
time by shrinking the dominant directions of the text embeddings that carry it. No weight changes.

For a prompt that contains the concept, the text encoder's output rows at the concept's tokens and at the EOT
positions (the EOS token and every padding position after it, which in CLIP repeat the whole prompt's meaning) form
a matrix χ (k×d). With χ = U·diag(σ)·Vᵀ, soft-weighted regularisation replaces every singular value by
    σ̂ = β · e^(−α·σ) · σ
and writes χ̂ = U·diag(σ̂)·Vᵀ back into those rows: the largest singular values, where the concept lives, shrink
most, small ones are nearly kept. The official code (sen-mao/SuppressEOT, utils/wo_utils.py, `punish_wight`) does
`s *= torch.exp(-alpha*s)`, i.e. β = 1, with α = 1; we keep β as a parameter (default 1). Several concepts in one
prompt share one matrix with the EOT rows. A prompt without the concept passes unchanged.

Timing (`retain_fraction`, the official `cross_retain_steps`, τ = 1 − it): the first part of a sampling run (the
noisy end) keeps the original embeddings; the official code switches at step `cross_retain_steps × 50` of its 50
DDIM steps. We switch on the timestep: a UNet call at t ≥ (1 − retain_fraction)·T (T the scheduler's training
timesteps, 1000) gets the original rows back. With SD's DDIM schedule (steps_offset 1) that is exactly the official
choice at 50 steps (and at 25 or 100), and the same share of the noise range at any step count. The originals are
kept, on the CPU, for the last `STASH_SIZE` distinct regularised prompts, found again by the bytes of their last
row; a prompt pushed out of that memory is regularised at every step.

Attached (`Delta.apply`, or `attach_to(pipe, concept)`), it is a forward hook on `pipe.text_encoder`, so it acts on
every encoding: `pipe(prompt)` (diffusers' `encode_prompt`), `erase.text.PromptEncoder` and the answer sets. An
encoder that cached embeddings before the hook was attached keeps them unpatched: encode after attaching (the
answer-set generator creates its encoder inside the apply context). On SD 1.x/2.x, `clip_skip` reads an earlier
layer, which this hook cannot reach (an error, never a silent no-op). SDXL, which reads both encoders' penultimate
states and a pooled embedding, is our port (erase.methods.seot_hook).

Left out: the inference-time text-embedding optimisation (ITO: 10 gradient steps on the embeddings per sampling step
for steps 10-20, driven by cross- and self-attention map losses of every image being sampled). It needs the UNet's
attention probabilities with gradients during sampling, per image, which is a sampler of its own, not a hook on the
text encoder. The official generated-image recipe runs without it (`--iter_each_step 0`); UnlearnCanvas's runs it.

Anyone holding the base weights can generate without the patch: it hides the concept, it does not remove it
(recorded in delta.json, runtime.settings.bypassable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import MethodConfig, build_config, concept_texts
from ..context import RunContext
from ..runtime import Handle, Runtime
from .seot_hook import EOT_CHOICES, KIND, Settings, check_pipeline, soft_weight, suppress, suppressed_positions

__all__ = ["SEOTConfig", "Settings", "attach_to", "build", "settings_for", "soft_weight", "suppress",
           "suppressed_positions"]  # fmt: skip
BYPASSABLE = (
    "a generation-time hook on the text encoder: the base weights are unchanged and still generate the concept "
    "for anyone who loads them without this patch"
)


@dataclass
class SEOTConfig(MethodConfig):
    """Soft-weighted regularisation of the concept and EOT embeddings at generation time. Nothing is trained:
    `params` must stay unset and `seed` is unused (the patch is deterministic)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The official generated-image command (README "Suppression for generated image"; suppress_eot_w_nulltext.py
        # defaults: --alpha [1.], --cross_retain_steps [.2], --method soft-weight) with --iter_each_step 0: no ITO,
        # so this is the whole recipe. Its sampler (50 DDIM steps, guidance 7.5) is not part of the method here.
        "paper": {"alpha": 1.0, "beta": 1.0, "eot": "all", "retain_fraction": 0.2},
        # UnlearnCanvas (machine_unlearning/evaluation/sampling_unlearned_models/seot.py): the same α 1 and
        # cross_retain_steps 0.2; it suppresses the style's words plus "style" (token positions 5.., counted as if
        # every word were one token) or the object (position 2), which method_inputs gives as the concept text
        # ("Pop Art style", "Cats") and we find by token content. It departs: UnlearnCanvas also runs ITO
        # (--iter_each_step 10, max_step_to_erase 20, λ retain 1 / erase −0.5 / self-retain 1 / self-erase −0.5),
        # which this toolkit does not implement; and its sampler (50 DDIM steps, guidance 9) is not the protocol's.
        "unlearncanvas-style": {"alpha": 1.0, "beta": 1.0, "eot": "all", "retain_fraction": 0.2},
        "unlearncanvas-object": {"alpha": 1.0, "beta": 1.0, "eot": "all", "retain_fraction": 0.2},
    }  # fmt: skip
    # Ours for the toy: the search on the tuning targets (docs/results/tuning/seot-*.md: α 1, 3, 10, with and without
    # the early original steps) found nothing better than the paper's values; every trial left the targets whole
    # (UA 0, IRA / CRA 100). The toy's UNet reads a target from the tokens after its name, which SEOT leaves as
    # they are (scripts/fmn_ceiling.py, docs/results/fmn-ceiling.md). Held-out results: docs/results/toy.md.
    PRESETS["toy"] = dict(PRESETS["paper"])

    concepts: list[str] = field(default_factory=list)
    alpha: float = 1.0  # α > 0: how hard large singular values shrink
    beta: float = 1.0  # β > 0: overall scale of the regularised values (the official code: 1)
    eot: str = "all"  # which EOT rows join the concept's: one of EOT_CHOICES
    retain_fraction: float = 0.2  # share of the run, from the noisy end, on original embeddings (1 − τ); 0: none
    # Prompts the patch is meant to act on (optional; the bench gives its target's answer prompts): each must contain
    # a concept's tokens, or the patch would silently leave it unchanged. A clear error otherwise.
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params is not None:
            raise ValueError(f"SEOT changes no weight, so it takes no parameter set: leave params unset, got "
                             f"{self.params!r}")  # fmt: skip
        super().__post_init__()
        self.concepts = concept_texts(self.concepts)
        for name in ("alpha", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if self.eot not in EOT_CHOICES:
            raise ValueError(f"eot {self.eot!r} is not one of {', '.join(EOT_CHOICES)}")
        if not 0 <= self.retain_fraction < 1:
            raise ValueError(f"retain_fraction must be in [0, 1) (1 would never regularise), got "
                             f"{self.retain_fraction!r}")  # fmt: skip

    def parameter_set(self) -> str:
        return "none"  # recorded in delta.json; the runner selects no parameters for runtime patches


# ------------------------------------------------------------------------------------------------- the inputs
def concept_token_ids(tokenizer, concept: str) -> list[int]:
    """The concept's token ids (no BOS/EOS); ValueError when it tokenizes to nothing, uses characters the tokenizer
    does not know (special tokens), or could never fit in a prompt: its tokens would never be found."""
    ids = tokenizer(concept, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"SEOT concept {concept!r} tokenizes to nothing under this tokenizer; give words")
    special = set(tokenizer.all_special_ids)
    if special & set(ids):
        raise ValueError(f"SEOT concept {concept!r} has text this tokenizer does not know (it becomes "
                         f"{tokenizer.unk_token!r}), so its tokens could never be found in a prompt; spell it with "
                         "words the tokenizer knows")  # fmt: skip
    if len(ids) > tokenizer.model_max_length - 2:
        raise ValueError(f"SEOT concept {concept!r} has {len(ids)} tokens; a prompt holds at most "
                         f"{tokenizer.model_max_length - 2}")  # fmt: skip
    return ids


def settings_for(pipe, config: SEOTConfig) -> dict[str, Any]:
    """What the hook needs, as JSON: the concepts and their token ids under `pipe.tokenizer`, the EOS id, the
    regularisation parameters, and the bypass note a user sees in delta.json."""
    check_pipeline(pipe)
    tokenizer = pipe.tokenizer
    if tokenizer.eos_token_id is None:
        raise ValueError("SEOT needs a tokenizer with an end-of-text token (eos_token_id is None)")
    concept_ids = [concept_token_ids(tokenizer, c) for c in config.concepts]
    check_prompts(tokenizer, config.prompts, config.concepts, concept_ids)
    return {
        "concepts": list(config.concepts),
        "concept_ids": concept_ids,
        "eos_token_id": int(tokenizer.eos_token_id),
        "alpha": float(config.alpha),
        "beta": float(config.beta),
        "eot": config.eot,
        "retain_fraction": float(config.retain_fraction),
        "bypassable": BYPASSABLE,
    }


def check_prompts(tokenizer, prompts: Sequence[str], concepts: Sequence[str], ids: Sequence[list[int]]) -> None:
    """ValueError naming the first prompt in which no concept's tokens occur (SEOT would pass it unchanged)."""
    wanted = [tuple(c) for c in ids]
    for prompt in prompts:
        tokens = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
        windows = {tuple(tokens[i : i + len(c)]) for c in wanted for i in range(len(tokens) - len(c) + 1)}
        if not windows & set(wanted):
            raise ValueError(f"SEOT concept(s) {list(concepts)} do not occur in prompt {prompt!r}, which the patch "
                             "would leave unchanged; give the concept as it is written in the prompt")  # fmt: skip


def build(ctx: RunContext) -> Runtime:
    """The registry's entry: the patch for `ctx.config`, returned detached (`erase.run` attaches it)."""
    return Runtime(KIND, {}, settings_for(ctx.pipe, ctx.config))


def attach_to(pipe, concepts: str | list[str], preset: str | None = "paper", **values: Any) -> Handle:
    """Suppress `concepts` on `pipe` from now on, e.g. `handle = attach_to(pipe, "Van Gogh style")`; the paper's
    values unless `preset`/`values` say otherwise; `handle.remove()` takes it off. (A saved SEOT delta does the
    same with `Delta.load(folder).apply(pipe)`.)"""
    config = build_config(SEOTConfig, preset, concepts=concepts, **values)
    return Runtime(KIND, {}, settings_for(pipe, config)).attach(pipe)
