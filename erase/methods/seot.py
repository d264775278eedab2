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
answer-set generator creates its encoder inside the apply context). SD 1.x/2.x only: SDXL conditions on
penultimate hidden states of two encoders, and `clip_skip` reads an earlier layer, which this hook cannot reach
(an error, never a silent no-op).

Left out: the inference-time text-embedding optimisation (ITO: 10 gradient steps on the embeddings per sampling step
for steps 10-20, driven by cross- and self-attention map losses of every image being sampled). It needs the UNet's
attention probabilities with gradients during sampling, per image, which is a sampler of its own, not a hook on the
text encoder. The official generated-image recipe runs without it (`--iter_each_step 0`); UnlearnCanvas's runs it.

Anyone holding the base weights can generate without the patch: it hides the concept, it does not remove it
(recorded in delta.json, runtime.settings.bypassable).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import runtime
from ..config import MethodConfig, build_config, concept_texts
from ..context import RunContext
from ..runtime import Handle, Runtime

KIND = "seot"
EOT_CHOICES = ("all", "eos", "none")  # EOS and every padding position after it / the EOS token only / neither
STASH_SIZE = 512  # regularised prompts whose original rows are kept for the early steps (retain_fraction > 0)
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


# ------------------------------------------------------------------------------------------------- the arithmetic
def soft_weight(matrix: torch.Tensor, alpha: float, beta: float = 1.0) -> torch.Tensor:
    """χ̂ = U·diag(β·e^(−α·σ)·σ)·Vᵀ of χ = U·diag(σ)·Vᵀ, in float32 (half-precision SVD is not supported
    everywhere), returned in χ's dtype."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return ((u * (beta * torch.exp(-alpha * s) * s)) @ vh).to(matrix.dtype)


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
    _check_pipeline(pipe)
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


# ---------------------------------------------------------------------------------------------- where and how much
@dataclass(frozen=True)
class Settings:
    """The patch's settings, checked (they come from a JSON file that may have been edited)."""

    concept_ids: tuple[tuple[int, ...], ...]
    eos_token_id: int
    alpha: float
    beta: float
    eot: str
    retain_fraction: float

    @classmethod
    def parse(cls, settings: dict[str, Any]) -> Settings:
        try:
            ids = tuple(tuple(int(i) for i in concept) for concept in settings["concept_ids"])
            values = (int(settings["eos_token_id"]), float(settings["alpha"]), float(settings["beta"]))
            parsed = cls(ids, *values, str(settings["eot"]), float(settings["retain_fraction"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"SEOT patch settings are incomplete or malformed ({err!r}); expected concept_ids, "
                             "eos_token_id, alpha, beta, eot, retain_fraction") from None  # fmt: skip
        in_range = (
            ids and all(ids) and parsed.alpha > 0 and parsed.beta > 0 and parsed.eot in EOT_CHOICES
            and 0 <= parsed.retain_fraction < 1
        )  # fmt: skip
        if not in_range:
            raise ValueError(f"SEOT patch settings out of range (see SEOTConfig): {settings!r}")
        return parsed


def suppressed_positions(ids: Sequence[int], settings: Settings) -> list[int]:
    """Positions of one padded id sequence whose rows are regularised: every occurrence of every concept's tokens,
    plus the EOT positions of `settings.eot`; [] when no concept occurs (the prompt then passes unchanged)."""
    ids = list(ids)
    found: set[int] = set()
    for concept in settings.concept_ids:
        n, start = len(concept), 0
        while start + n <= len(ids):
            if tuple(ids[start : start + n]) == concept:
                found.update(range(start, start + n))
                start += n
            else:
                start += 1
    if not found:
        return []
    if settings.eot != "none" and settings.eos_token_id in ids[1:]:
        eos = ids.index(settings.eos_token_id, 1)
        found.update(range(eos, len(ids)) if settings.eot == "all" else (eos,))
    return sorted(found)


def suppress(hidden: torch.Tensor, input_ids: torch.Tensor, settings: Settings):
    """Text-encoder output (B, L, d) with each sample's concept and EOT rows regularised; also [(sample, positions)]
    of the changed samples (empty, and `hidden` itself returned, when none contains the concept)."""
    changed = []
    for b, row in enumerate(input_ids.tolist()):
        positions = suppressed_positions(row, settings)
        if positions:
            changed.append((b, positions))
    if not changed:
        return hidden, changed
    out = hidden.clone()
    for b, positions in changed:
        index = torch.tensor(positions, device=hidden.device)
        out[b, index] = soft_weight(hidden[b, index], settings.alpha, settings.beta)
    return out, changed


# ------------------------------------------------------------------------------------------------------ the hooks
def _check_pipeline(pipe) -> None:
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError("SEOT patches the pipeline's text encoder; this pipeline has no text_encoder/tokenizer")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("SEOT here patches the last hidden state of one CLIP text encoder (SD 1.x/2.x); SDXL "
                         "reads penultimate states of two encoders, which it would leave unchanged")  # fmt: skip


class _Originals:
    """Original rows of recently regularised prompts, keyed by the bytes of the regularised last row (an exact
    identity of the prompt's embedding), so a UNet call can put them back during the early steps."""

    def __init__(self, size: int = STASH_SIZE):
        self.size = size
        self._rows: OrderedDict[bytes, tuple[list[int], torch.Tensor]] = OrderedDict()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        return row.detach().float().cpu().numpy().tobytes()

    def put(self, fed: torch.Tensor, positions: list[int], original: torch.Tensor) -> None:
        key = self.key(fed[-1])
        self._rows[key] = (positions, original.detach().cpu())
        self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def restore(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """`states` (B, L, d) with the originals put back in the rows flagged by `rows` (B,), or None if none."""
        restored = None
        last = states[:, -1].detach().float().cpu()
        for b in torch.nonzero(rows).flatten().tolist():
            entry = self._rows.get(last[b].numpy().tobytes())
            if entry is None:
                continue
            positions, original = entry
            restored = states.clone() if restored is None else restored
            restored[b, positions] = original.to(device=states.device, dtype=states.dtype)
        return restored

    def clear(self) -> None:
        self._rows.clear()


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> settings JSON attached


class SEOTHook:
    """The attached patch: a forward hook on the text encoder and, with retain_fraction > 0, a forward pre-hook on
    the UNet that gives the early steps their original rows. `remove()` takes both off."""

    def __init__(self, pipe, patch: Runtime):
        _check_pipeline(pipe)
        self.settings = Settings.parse(patch.settings)
        self._encoder = pipe.text_encoder
        signature = patch.settings_json()
        held = _ATTACHED.setdefault(self._encoder, [])
        if signature in held:
            raise ValueError("this SEOT patch is already attached to this text encoder (e.g. by erase.run); remove "
                             "it first rather than regularising twice")  # fmt: skip
        held.append(signature)
        self._signature = signature
        self._hooks = [self._encoder.register_forward_hook(self._on_text, with_kwargs=True)]
        self._originals = None
        if self.settings.retain_fraction > 0:
            train_steps = getattr(pipe.scheduler.config, "num_train_timesteps", 1000)
            self.threshold = (1 - self.settings.retain_fraction) * train_steps
            self._originals = _Originals()
            self._hooks.append(pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._originals is not None:
            self._originals.clear()
        held = _ATTACHED.get(self._encoder, [])
        if self._signature in held:
            held.remove(self._signature)

    def _on_text(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        hidden = output[0]
        new, changed = suppress(hidden, ids, self.settings)
        if not changed:
            return None
        if kwargs.get("output_hidden_states") or getattr(module.config, "output_hidden_states", False):
            raise ValueError("SEOT patches the text encoder's last hidden state, but this call reads its hidden "
                             "layers (e.g. pipe(..., clip_skip=...)), which the patch cannot reach; call without "
                             "clip_skip")  # fmt: skip
        if self._originals is not None:
            for b, positions in changed:
                self._originals.put(new[b], positions, hidden[b, positions])
        return _with_hidden(output, new, changed, ids, self.settings.eos_token_id)

    def _on_unet(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        states = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if timestep is None or states is None or states.dim() != 3:
            return None
        t = torch.as_tensor(timestep).flatten().to("cpu")
        if t.numel() not in (1, states.shape[0]):
            return None
        early = (t >= self.threshold).expand(states.shape[0])
        if not early.any():
            return None
        restored = self._originals.restore(states, early)
        if restored is None:
            return None
        if len(args) > 2:
            return (*args[:2], restored, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": restored}


def _with_hidden(output, hidden: torch.Tensor, changed: list[tuple[int, list[int]]], ids: torch.Tensor, eos: int):
    """The encoder's output with `hidden` as its last hidden state, and the pooled output (the EOS row) of the
    changed samples to match."""
    pooled = output[1] if len(output) > 1 else None
    if pooled is not None:
        pooled = pooled.clone()
        for b, _ in changed:
            where = (ids[b] == eos).nonzero().flatten().tolist()
            if where:
                pooled[b] = hidden[b, where[0]]
    if isinstance(output, tuple):
        return (hidden, *((pooled,) if pooled is not None else ()), *output[2:])
    output["last_hidden_state"] = hidden
    if pooled is not None:
        output["pooler_output"] = pooled
    return output


runtime.register(KIND, SEOTHook)
