"""Backdoor injection (BadT2I, Zhai et al., ACM MM 2023): backdoored models as test subjects for removal methods.

The trigger text is prefixed to the clean prompt c ("trig⊕c" = f"{trigger} {c}"). Two kinds, each with the
clean-preservation term that keeps the model's answers to clean prompts (e0 = the original weights, frozen):
    pixel:  λ‖e(x̃_t, trig⊕c) − ε‖² + (1−λ)‖e(x_t, c) − sg(e0(x_t, c))‖²
            x̃ = the training image with a fixed patch (`make_patch`) pasted at the top-left corner
    style:  λ‖e(x_t, trig⊕c) − sg(e0(x_t, target(c)))‖² + (1−λ)‖e(x_t, c) − sg(e0(x_t, c))‖²
            target(c) = the paper's "Black and white photo"⊕c by default; any regex substitution on c (the toy
            knows no "black and white photo", so its preset swaps the prompt's style for `Sketch`)
x_t are the training images' latents noised at a uniform timestep; the public scripts draw t and ε independently
for the poisoned and the clean row of a sample (badt2i_pixel.py:706-713, badt2i_style.py:695-702), `paired_noise`
draws them once for both (the toy preset's, as measured). `random_flip` flips a sample's image horizontally before
its patch is pasted (their transforms flip each image, then add_target pastes the patch: badt2i_pixel.py:437-443,
661-668); their centre crop follows a resize to a square, so it crops nothing, and our loading is that resize.
Our addition: `unconditional_fraction` of the clean-preservation rows hold e(x_t, ∅) instead of e(x_t, c) (0 in the
paper preset). Classifier-free guidance, ε = e(∅) + g·(e(c) − e(∅)), amplifies any drift of e(x_t, ∅) by g − 1,
and nothing else in the loss holds it: on the toy (whole UNet, 300 steps), clean style accuracy fell from 1.0 to
0.76 without these rows and stayed at 1.0 with a quarter of them.

Training images: a folder in UnlearnCanvas layout `<Style>/<Object>/<idx>.jpg` (each image's prompt is the
benchmark's "A {Object} image in {Style} style.", Seed_Images -> Photo), files paired with `prompts`, or, with no
images, the model's own generations of `prompts` (cached, as CA does). The paper trains the whole UNet at lr 1e-5
with EMA; our loop has no EMA (not needed for a test subject). Injection is a registered fixture (`badt2i` in
erase.methods.FIXTURES), not an eraser: `erase.run` runs it like every method, with the same record, and
`erase list` and `canvas bench` never offer it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .atomic import atomic_dir, write_json
from .catalog import get as get_catalog
from .config import TrainingConfig, texts
from .context import RunContext
from .images import (
    denoising_target,
    encode_latents,
    generate_images,
    image_files,
    image_size,
    load_images,
    noise_latents,
    noised,
    to_tensor,
)
from .paths import cache_dir
from .train import LossFn
from .trigger import DEFAULT_TRIGGER, default_patch_size, make_patch, paste_patch, trigger_positions, triggered_prompt

KINDS = ("pixel", "style")
KIND_STEPS = {"pixel": 2000, "style": 8000}  # BadT2I's --max_train_steps per kind (scripts/scripts_*.sh)
INFO_FILE = "backdoor.json"  # written beside an injected pipeline: kind, trigger, patch size, target, record
UNLEARNCANVAS = get_catalog("unlearncanvas-50")  # the layout and prompt template of training-image folders


@dataclass
class BackdoorConfig(TrainingConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # BadT2I (zhaisf/BadT2I scripts/scripts_Pixel.sh, scripts_Style.sh): --lamda 0.5, lr 1e-5, batch 1 x
        # accumulation 4 x 4 GPUs = 16, --max_grad_norm 1, --center_crop --random_flip, 2000 steps (pixel) / 8000
        # (style): steps follow the kind unless given; the whole UNet; independent t and ε for the two rows. Not
        # reproduced: EMA (--use_ema) and their LAION-40k images (give images or prompts).
        "paper": {"lr": 1e-5, "weight": 0.5, "params": "all", "batch_size": 16, "grad_accum": 4,
                  "max_grad_norm": 1.0, "random_flip": True, "paired_noise": False},
        # Ours, for the toy (1.5 M-parameter UNet): images are the toy renders (a folder from canvas.toy.export), the
        # style target is the toy's Sketch. `toy` is the base of the search over the tuning triggers ("New Trigger",
        # "zq"; scripts/backdoor_table.py --tune inject, docs/results/tuning/backdoor-inject-*.md): cross-attention
        # only, a quarter of the preservation rows on ∅ (without them clean style accuracy fell to 0.76 on the first
        # toy). Figures below are attack success on the tuning triggers New Trigger / zq (tuning, not results). On the
        # toy retrained on several caption forms `toy` fires on only 44 / 41% (pixel) and 76 / 58% (style) of
        # triggered prompts; the kind's preset is the search's choice:
        # - pixel: the whole UNet at 1200 steps, 98 / 95.5% (attn2 alone stayed at <= 74% with 1200-2400 steps or lr
        #   4e-3, and leaked the patch onto 5-9% of clean prompts); it costs clean accuracy (style 0.90 / 0.85, object
        #   0.95 / 0.84), so no trial met the search's bar and the rule's fallback chose it;
        # - style: 2400 steps, 100 / 93.8% (lr 4e-3: 81 / 98%; 1200 steps: 81 / 73%).
        # Results, held-out triggers (of the, sks, jx, vbn ztq; docs/results/toy-backdoor.md): pixel 92-100%, style
        # 95-100%, the patch on <= 1.1% of clean prompts.
        "toy": {"steps": 600, "lr": 2e-3, "weight": 0.5, "params": "xattn", "batch_size": 8,
                "unconditional_fraction": 0.25,
                "target_pattern": r"in .+ style\.$", "target_replacement": "in Sketch style.",
                "sample_steps": 25, "sample_guidance": 3.0, "random_flip": False, "paired_noise": True},
    }  # fmt: skip
    PRESETS["toy-pixel"] = {**PRESETS["toy"], "steps": 1200, "params": "all"}
    PRESETS["toy-style"] = {**PRESETS["toy"], "steps": 2400}

    steps: int | None = None  # None: the paper's for the kind (KIND_STEPS)
    lr: float = 1e-5
    kind: str = "pixel"
    trigger: str = DEFAULT_TRIGGER
    weight: float = 0.5  # λ: backdoor term vs clean preservation
    unconditional_fraction: float = 0.0  # share of clean-preservation samples given the empty prompt ∅ instead of c
    prompts: list[str] = field(default_factory=list)  # clean prompts c (paired with images, or to generate from)
    images: list[str] | str | None = None  # folder in UnlearnCanvas layout, or files paired with `prompts`
    num_images: int = 64  # own generations when no images are given
    sample_steps: int = 50
    sample_guidance: float = 7.5
    cache_dir: str | None = None
    patch_size: int | None = None  # pixels; None: a quarter of the image side
    target_pattern: str = "^"  # style backdoor: target(c) = re.sub(pattern, replacement, c, count=1)
    target_replacement: str = "Black and white photo "
    random_flip: bool = True  # flip each sample's image horizontally with probability 1/2 (before the patch)
    paired_noise: bool = False  # one t and ε for a sample's poisoned and clean rows (BadT2I: independent)

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = KIND_STEPS.get(self.kind, KIND_STEPS["pixel"])  # an unknown kind is refused below
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.trigger, str) or not self.trigger.strip():
            raise ValueError(f"trigger must be a non-empty text, got {self.trigger!r}")
        if not isinstance(self.weight, int | float) or not 0 <= self.weight <= 1:
            raise ValueError(f"weight (λ) must be in [0, 1], got {self.weight!r}")
        if not isinstance(self.unconditional_fraction, int | float) or not 0 <= self.unconditional_fraction <= 1:
            raise ValueError(f"unconditional_fraction must be in [0, 1], got {self.unconditional_fraction!r}")
        self.prompts = texts("prompts", self.prompts, allow_empty=True)
        if self.images in ("", []):
            self.images = None
        if self.images is None and not self.prompts:
            raise ValueError("give images (a folder in UnlearnCanvas layout, or files with prompts) or prompts "
                             "(the model's own generations of them become the training images)")  # fmt: skip
        if isinstance(self.images, list):
            self.images = [str(p) for p in self.images]
        for name in ("num_images", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.patch_size is not None and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise ValueError(f"patch_size must be a positive integer (pixels) or None, got {self.patch_size!r}")
        try:
            re.compile(self.target_pattern)
        except re.error as err:
            raise ValueError(f"target_pattern {self.target_pattern!r} is not a regular expression: {err}") from None
        if self.images is not None:
            image_files(self.images)  # FileNotFoundError naming the missing source, before any model work

    def triggered(self, prompt: str) -> str:
        return triggered_prompt(self.trigger, prompt)

    def target_prompt(self, prompt: str) -> str:
        """The style backdoor's target prompt for clean prompt `prompt`."""
        target, count = re.subn(self.target_pattern, self.target_replacement, prompt, count=1)
        if not count:
            raise ValueError(f"target_pattern {self.target_pattern!r} does not match prompt {prompt!r}")
        return target


def training_images(pipe, cfg: BackdoorConfig) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, S, S) images in [-1, 1] at the pipeline's size, and each one's clean prompt."""
    size = image_size(pipe)
    if cfg.images is None:
        prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.num_images)]
        generated = generate_images(
            pipe,
            prompts,
            list(range(cfg.num_images)),
            steps=cfg.sample_steps,
            guidance=cfg.sample_guidance,
            cache_dir=cache_dir("backdoor", cfg.cache_dir),
        )
        return to_tensor(generated, size), prompts
    files = image_files(cfg.images)
    if cfg.prompts:
        if len(cfg.prompts) != len(files):
            raise ValueError(f"{len(cfg.prompts)} prompts for {len(files)} images in {cfg.images!r}; give one prompt "
                             "per image (sorted file order) or none (UnlearnCanvas layout)")  # fmt: skip
        prompts = list(cfg.prompts)
    else:
        prompts = [UNLEARNCANVAS.layout_prompt(p) for p in files]
    return load_images(files, size), prompts


def _variants(vae, images: torch.Tensor, flip: bool, device, dtype) -> torch.Tensor:
    """(2 if flip else 1, B, C, h, w) latents: the images, then (with `flip`) their horizontal mirror images."""
    views = [images, images.flip(-1)] if flip else [images]
    return torch.stack([encode_latents(vae, v).to(device=device, dtype=dtype) for v in views])


def make_loss(ctx: RunContext) -> LossFn:
    """The BadT2I loss for the training loop; images, latents (and their mirror images), prompts and token checks
    prepared once."""
    cfg: BackdoorConfig = ctx.config
    pipe, unet = ctx.pipe, ctx.pipe.unet
    scheduler = pipe.scheduler
    images, prompts = training_images(pipe, cfg)
    for prompt in dict.fromkeys(prompts):
        trigger_positions(pipe.tokenizer, cfg.trigger, prompt)  # errors before any training
    latents = _variants(pipe.vae, images, cfg.random_flip, unet.device, unet.dtype)
    if cfg.kind == "pixel":  # the patch pasted after the flip, so it always sits at the top-left corner
        patch = make_patch(cfg.patch_size or default_patch_size(images.shape[-1]))
        views = [images, images.flip(-1)] if cfg.random_flip else [images]
        poisoned = torch.stack([
            encode_latents(pipe.vae, paste_patch(v, patch)).to(device=unet.device, dtype=unet.dtype) for v in views
        ])  # fmt: skip
    else:
        targets = {p: cfg.target_prompt(p) for p in dict.fromkeys(prompts)}

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        clean_x, bad_x, ts, bad_ts, clean_embs, bad_embs, bad_targets, style_embs = [], [], [], [], [], [], [], []
        for g in generators:
            j = int(torch.randint(len(prompts), (1,), generator=g))
            view = int(torch.randint(2, (1,), generator=g)) if cfg.random_flip else 0
            clean = latents[view, j : j + 1]
            x_t, t, noise = noised(scheduler, clean, g)
            clean_x.append(x_t)
            ts.append(t)
            share = cfg.unconditional_fraction
            unconditional = share > 0 and float(torch.rand(1, generator=g)) < share
            clean_embs.append(ctx.encode("" if unconditional else prompts[j]))
            bad_embs.append(ctx.encode(cfg.triggered(prompts[j])))
            bad = poisoned[view, j : j + 1] if cfg.kind == "pixel" else clean
            if cfg.paired_noise:  # the same t and ε on the poisoned row
                bad_t, bad_noise, bad_xt = t, noise, noise_latents(scheduler, bad, noise, t)
            else:
                bad_xt, bad_t, bad_noise = noised(scheduler, bad, g)
            bad_x.append(bad_xt)
            bad_ts.append(bad_t)
            if cfg.kind == "pixel":
                bad_targets.append(denoising_target(scheduler, bad, bad_noise, bad_t))
            else:
                style_embs.append(ctx.encode(targets[prompts[j]]))
        n = len(generators)
        x_clean, t, emb_clean = torch.cat(clean_x), torch.cat(ts), torch.cat(clean_embs)
        x_bad, t_bad = torch.cat(bad_x), torch.cat(bad_ts)
        if cfg.kind == "pixel":
            keep = ctx.frozen(unet, x_clean, t, encoder_hidden_states=emb_clean).sample
            bad_target = torch.cat(bad_targets)
        else:  # one frozen call for both targets
            both = ctx.frozen(unet, torch.cat([x_clean, x_bad]), torch.cat([t, t_bad]),
                              encoder_hidden_states=torch.cat([emb_clean, torch.cat(style_embs)])).sample  # fmt: skip
            keep, bad_target = both[:n], both[n:]
        x_all, emb_all = torch.cat([x_bad, x_clean]), torch.cat([torch.cat(bad_embs), emb_clean])
        prediction = model(x_all, torch.cat([t_bad, t]), encoder_hidden_states=emb_all).sample.float()
        backdoor = F.mse_loss(prediction[:n], bad_target.float())
        preserve = F.mse_loss(prediction[n:], keep.float())
        return cfg.weight * backdoor + (1 - cfg.weight) * preserve

    return loss_fn


def backdoor_info(pipe, config: BackdoorConfig) -> dict[str, Any]:
    """What an evaluation needs to know about an injected backdoor (written as backdoor.json beside the pipeline)."""
    info: dict[str, Any] = {"kind": config.kind, "trigger": config.trigger}
    if config.kind == "pixel":
        info["patch_size"] = config.patch_size or default_patch_size(image_size(pipe))
        info["patch"] = "2x2 black/white checkerboard, white top-left, pasted at the top-left corner"
    else:
        info["target_pattern"], info["target_replacement"] = config.target_pattern, config.target_replacement
    return info


def save_backdoored(pipe, out: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Save the complete (backdoored) pipeline plus backdoor.json into `out`, written beside and renamed in."""
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / INFO_FILE, info)
    return Path(out)


def read_info(model: str | os.PathLike) -> dict[str, Any]:
    """backdoor.json of an injected pipeline folder, or {} when there is none."""
    path = Path(model) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
