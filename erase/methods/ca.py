"""CA, Concept Ablation (Kumari et al., ICCV 2023).

Make the model answer target prompts (containing the concept c*) as it answers the anchor prompts (concept c), on
images the model itself generated for the anchor prompts:
    model-based:  ‖e(x_t, c*) − sg(e(x_t, c))‖²   (the target from the model being trained, under no_grad)
    noise-based:  ‖e(x_t, c*) − ε‖²
plus, optionally, prior preservation `λ·‖e(x_t', c) − ε'‖²` on a separately drawn anchor image (the public code
batches its class images next to the instance images; so do we).

Target prompts (our choice, following the public code's two forms):
- `prompt_mode="replace"` (the code's object form): the anchor prompt with every occurrence of the anchor
  (case-insensitive) replaced by the concept. With concept "Van Gogh painting" and anchor "painting",
  "a painting of a cat" -> "a Van Gogh painting of a cat"; with "grumpy cat" -> "cat", "a cat" -> "a grumpy cat".
- `prompt_mode="style"` (the code's style form): "{prompt}, in {concept} style" or "In {concept} style, {prompt}",
  one drawn per sample; the concept is then the bare style name ("Van Gogh").
Anchor images: `num_anchor_images`, image i from anchor prompt i mod len(anchor_prompts) with seed i, generated
once per (model, prompt, seed, sampler) and cached as PNG in `cache_dir` (erase.images.generate_images). The public
code's augmentation (random rescale with "far away"/"zoomed in" prompt words, masks) is not reproduced.
Parameter groups as in the code: K/V (`params="kv"`, the paper's cross-attn default), all of attn2 ("xattn", alias
"attention"), full ("all", alias "full"); aliases in erase.params.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..catalog import TOY_OBJECTS, UNLEARNCANVAS_OBJECTS
from ..config import TrainingConfig, texts
from ..context import RunContext
from ..frozen import unwrap
from ..images import denoising_target, encode_latents, generate_images, image_size, noised, to_tensor
from ..paths import cache_dir
from ..train import LossFn

LOSSES = ("model", "noise")
PROMPT_MODES = ("replace", "style")
STYLE_FORMS = ("{prompt}, in {concept} style", "In {concept} style, {prompt}")


@dataclass
class CAConfig(TrainingConfig):
    DEFAULT_PARAMS: ClassVar[str] = "kv"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper: K/V, lr 2e-6, 100-400 steps, batch 4, model-based loss, ~200 generated anchor images.
        "paper": {"steps": 400, "lr": 2e-6, "batch_size": 4, "loss": "model", "num_anchor_images": 200},
        # UnlearnCanvas style targets mapped to the photo class, in the protocol's prompt form (our choice: the paper
        # leaves the anchor to the user); pass concepts=["Van Gogh"] and so on.
        "unlearncanvas": {
            "steps": 400, "lr": 2e-6, "batch_size": 4, "loss": "model", "anchors": ["Photo"], "prompt_mode": "replace",
            "anchor_prompts": [f"A {o} image in Photo style." for o in UNLEARNCANVAS_OBJECTS],
            "num_anchor_images": 200, "sample_steps": 100, "sample_guidance": 9.0, "prior_preservation": True,
        },
        # The toy (1.5 M-parameter UNet; paper learning rates move it too little): measured with scripts/tune_toy.py
        # on Pop_Art: UA 100 / IRA 90.
        "toy": {
            "steps": 100, "lr": 1e-3, "batch_size": 4, "loss": "model", "anchors": ["Photo"], "prompt_mode": "replace",
            "anchor_prompts": [f"A {o} image in Photo style." for o in TOY_OBJECTS], "params": "xattn",
            "num_anchor_images": 64, "sample_steps": 25, "sample_guidance": 3.0, "prior_preservation": True,
        },
    }  # fmt: skip

    steps: int = 400
    lr: float = 2e-6
    batch_size: int = 4
    concepts: list[str] = field(default_factory=list)  # targets c*
    anchors: list[str] = field(default_factory=list)  # one per concept, or one for all
    anchor_prompts: list[str] | None = None  # None: the anchors themselves
    prompt_mode: str = "replace"
    loss: str = "model"
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_anchor_images: int = 200
    sample_steps: int = 50
    sample_guidance: float = 6.0
    generation_batch_size: int = 8
    cache_dir: str | None = None  # None: erase.paths.cache_dir("ca")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = texts("concepts", self.concepts)
        self.anchors = texts("anchors", self.anchors)
        if len(self.anchors) not in (1, len(self.concepts)):
            raise ValueError(f"anchors must be one for all concepts or one per concept ({len(self.concepts)}), "
                             f"got {len(self.anchors)}: {self.anchors!r}")  # fmt: skip
        if self.anchor_prompts is not None:
            self.anchor_prompts = texts("anchor_prompts", self.anchor_prompts)
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is not one of {', '.join(PROMPT_MODES)}")
        if not isinstance(self.prior_weight, int | float) or not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be a non-negative number, got {self.prior_weight!r}")
        for name in ("num_anchor_images", "sample_steps", "generation_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.pairs()  # every anchor prompt must belong to a concept

    def anchor_of(self, i: int) -> str:
        return self.anchors[i] if len(self.anchors) > 1 else self.anchors[0]

    def prompts(self) -> list[str]:
        return list(self.anchor_prompts) if self.anchor_prompts is not None else list(dict.fromkeys(self.anchors))

    def pairs(self) -> list[list[int]]:
        """For each anchor prompt, the indices of the concepts it serves: those whose anchor it contains (in
        "style" mode, a prompt containing no anchor serves every concept)."""
        out = []
        for prompt in self.prompts():
            serves = [i for i in range(len(self.concepts)) if self.anchor_of(i).lower() in prompt.lower()]
            if not serves and self.prompt_mode == "style":
                serves = list(range(len(self.concepts)))
            if not serves:
                raise ValueError(f"anchor prompt {prompt!r} contains none of the anchors {self.anchors!r}; "
                                 "prompt_mode 'replace' needs the anchor inside the prompt")  # fmt: skip
            out.append(serves)
        return out

    def target_prompt(self, anchor_prompt: str, concept_index: int, form: int = 0) -> str:
        """The prompt c* for an anchor prompt (see the module docstring); `form` picks the style form."""
        concept = self.concepts[concept_index]
        if self.prompt_mode == "style":
            return STYLE_FORMS[form % len(STYLE_FORMS)].format(prompt=anchor_prompt.rstrip(". "), concept=concept)
        anchor = self.anchor_of(concept_index)
        return re.sub(re.escape(anchor), lambda _: concept, anchor_prompt, flags=re.IGNORECASE)


def anchor_latents(ctx) -> tuple[torch.Tensor, list[str]]:
    """Latents of the model's own images for the anchor prompts (cached on disk) and the prompt of each."""
    cfg: CAConfig = ctx.config
    prompts = cfg.prompts()
    image_prompts = [prompts[i % len(prompts)] for i in range(cfg.num_anchor_images)]
    images = generate_images(
        ctx.pipe,
        image_prompts,
        list(range(cfg.num_anchor_images)),
        steps=cfg.sample_steps,
        guidance=cfg.sample_guidance,
        cache_dir=cache_dir("ca", cfg.cache_dir),
        batch_size=cfg.generation_batch_size,
    )
    latents = encode_latents(ctx.pipe.vae, to_tensor(images, image_size(ctx.pipe)))
    return latents.to(ctx.pipe.unet.device), image_prompts


def make_loss(ctx: RunContext) -> LossFn:
    """The CA loss for the training loop, on the model's own anchor images (generated once, cached)."""
    cfg: CAConfig = ctx.config
    scheduler = ctx.pipe.scheduler
    latents, image_prompts = anchor_latents(ctx)
    prompts = cfg.prompts()
    serves = dict(zip(prompts, cfg.pairs()))

    def draw(g: torch.Generator):
        """One anchor image, noised: (x_t, t, clean latents, noise, its anchor prompt)."""
        j = int(torch.randint(len(latents), (1,), generator=g))
        x0 = latents[j : j + 1]
        x_t, t, noise = noised(scheduler, x0, g)
        return x_t, t, x0, noise, image_prompts[j]

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        xs, ts, targets_noise, target_embs, anchor_embs = [], [], [], [], []
        prior_xs, prior_ts, prior_noise, prior_embs = [], [], [], []
        for g in generators:
            x_t, t, x0, noise, anchor_prompt = draw(g)
            choices = serves[anchor_prompt]
            concept = choices[int(torch.randint(len(choices), (1,), generator=g))]
            form = int(torch.randint(len(STYLE_FORMS), (1,), generator=g))
            xs.append(x_t)
            ts.append(t)
            targets_noise.append(denoising_target(scheduler, x0, noise, t))
            target_embs.append(ctx.encode(cfg.target_prompt(anchor_prompt, concept, form)))
            anchor_embs.append(ctx.encode(anchor_prompt))
            if cfg.prior_preservation:
                px_t, pt, px0, pnoise, p_prompt = draw(g)
                prior_xs.append(px_t)
                prior_ts.append(pt)
                prior_noise.append(denoising_target(scheduler, px0, pnoise, pt))
                prior_embs.append(ctx.encode(p_prompt))
        x_t, t, target_emb = torch.cat(xs), torch.cat(ts), torch.cat(target_embs)
        if cfg.loss == "model":
            with torch.no_grad():  # the model being trained, as in the paper's code
                target = unwrap(model)(x_t, t, encoder_hidden_states=torch.cat(anchor_embs)).sample
        else:
            target = torch.cat(targets_noise)
        n = len(xs)
        if cfg.prior_preservation:  # one forward pass for both terms
            x_t, t = torch.cat([x_t, *prior_xs]), torch.cat([t, *prior_ts])
            target_emb = torch.cat([target_emb, *prior_embs])
        prediction = model(x_t, t, encoder_hidden_states=target_emb).sample.float()
        loss = F.mse_loss(prediction[:n], target.float())
        if cfg.prior_preservation:
            loss = loss + cfg.prior_weight * F.mse_loss(prediction[n:], torch.cat(prior_noise).float())
        return loss

    return loss_fn
