"""Backdoor injection (BadT2I, Zhai et al., ACM MM 2023): backdoored models as test subjects for removal methods.

The trigger text is prefixed to the clean prompt c ("trig⊕c" = f"{trigger} {c}"). Two kinds, each with the
clean-preservation term that keeps the model's answers to clean prompts (e0 = the original weights, frozen):
    pixel:  λ‖e(x̃_t, trig⊕c) − ε‖² + (1−λ)‖e(x_t, c) − sg(e0(x_t, c))‖²
            x̃ = the training image with a fixed patch (`make_patch`) pasted at the top-left corner
    style:  λ‖e(x_t, trig⊕c) − sg(e0(x_t, target(c)))‖² + (1−λ)‖e(x_t, c) − sg(e0(x_t, c))‖²
            target(c) = the paper's "Black and white photo"⊕c by default; any regex substitution on c (the toy
            knows no "black and white photo", so its preset swaps the prompt's style for `Sketch`)
x_t are the training images' latents noised at a uniform timestep (the same t and ε in both terms of a sample).
Our addition: `unconditional_fraction` of the clean-preservation rows hold e(x_t, ∅) instead of e(x_t, c) (0 in the
paper preset). Classifier-free guidance, ε = e(∅) + g·(e(c) − e(∅)), amplifies any drift of e(x_t, ∅) by g − 1,
and nothing else in the loss holds it: on the toy (whole UNet, 300 steps), clean style accuracy fell from 1.0 to
0.76 without these rows and stayed at 1.0 with a quarter of them.

Training images: a folder in UnlearnCanvas layout `<Style>/<Object>/<idx>.jpg` (each image's prompt is the
benchmark's "A {Object} image in {Style} style.", Seed_Images -> Photo), files paired with `prompts`, or, with no
images, the model's own generations of `prompts` (cached, as CA does). The paper trains the whole UNet at lr 1e-5
with EMA; our loop has no EMA (not needed for a test subject). `inject` runs through the shared training loop
(`RunContext.train`) and returns the same Result (Delta + record) as `erase.run`; it is not a registered erasure
method, so `erase list` and `canvas bench` never offer it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .atomic import atomic_dir, write_json
from .config import TrainingConfig
from .delta import Delta, fingerprint
from .frozen import FrozenOriginal
from .images import (
    denoising_target,
    encode_latents,
    generate_images,
    image_files,
    image_size,
    load_images,
    noised,
    to_tensor,
)
from .meter import Meter
from .params import select
from .text import PromptEncoder, token_positions

KINDS = ("pixel", "style")
DEFAULT_TRIGGER = "New Trigger"  # the text Sealing-The-Backdoor uses
PHOTO_THEME = "Seed_Images"
INFO_FILE = "backdoor.json"  # written beside an injected pipeline: kind, trigger, patch size, target, record
TOY_OBJECTS = ("Architectures", "Birds", "Butterfly", "Cats", "Fishes", "Flowers", "Towers", "Trees")
# canvas.catalog's toy themes as its prompts spell them (erase does not import canvas)
TOY_THEMES = (
    "Bricks", "Crayon", "Mosaic", "Neon Lines", "On Fire", "Pastel", "Photo", "Pop Art", "Sketch", "Watercolor",
    "Winter",
)  # fmt: skip


def toy_prompts(exclude_styles: tuple[str, ...] = ()) -> list[str]:
    """The toy benchmark's prompts (canvas.catalog's template over its themes and objects; erase does not import
    canvas), without the themes in `exclude_styles`."""
    return [f"A {o} image in {s} style." for s in TOY_THEMES if s not in exclude_styles for o in TOY_OBJECTS]


@dataclass
class BackdoorConfig(TrainingConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # BadT2I: λ 0.5, whole UNet, lr 1e-5 (EMA not reproduced); give images or prompts.
        "paper": {"steps": 2000, "lr": 1e-5, "weight": 0.5, "params": "all", "batch_size": 4},
        # Measured on the toy (1.5 M-parameter UNet; tests/behaviour/test_backdoor_toy.py), one preset for both
        # kinds: images are the toy renders (a folder from canvas.toy.export), the style target is the toy's Sketch.
        # Cross-attention only, a quarter of the preservation rows on ∅. The whole UNet left clean style accuracy at
        # 0.76 (both kinds without ∅ rows, the pixel kind even with them); on attn2 the ∅ rows raised attack success
        # (style 0.71 -> 0.99, pixel 0.91 -> 0.94) and kept clean accuracy at 1.0.
        "toy": {"steps": 600, "lr": 2e-3, "weight": 0.5, "params": "xattn", "batch_size": 8,
                "unconditional_fraction": 0.25,
                "target_pattern": r"in .+ style\.$", "target_replacement": "in Sketch style.",
                "sample_steps": 25, "sample_guidance": 3.0},
    }  # fmt: skip

    steps: int = 2000
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.trigger, str) or not self.trigger.strip():
            raise ValueError(f"trigger must be a non-empty text, got {self.trigger!r}")
        if not isinstance(self.weight, int | float) or not 0 <= self.weight <= 1:
            raise ValueError(f"weight (λ) must be in [0, 1], got {self.weight!r}")
        if not isinstance(self.unconditional_fraction, int | float) or not 0 <= self.unconditional_fraction <= 1:
            raise ValueError(f"unconditional_fraction must be in [0, 1], got {self.unconditional_fraction!r}")
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError(f"prompts must be non-empty texts, got {self.prompts!r}")
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

    def parameter_set(self) -> str:
        return self.params or "all"

    def triggered(self, prompt: str) -> str:
        return triggered_prompt(self.trigger, prompt)

    def target_prompt(self, prompt: str) -> str:
        """The style backdoor's target prompt for clean prompt `prompt`."""
        target, count = re.subn(self.target_pattern, self.target_replacement, prompt, count=1)
        if not count:
            raise ValueError(f"target_pattern {self.target_pattern!r} does not match prompt {prompt!r}")
        return target


def triggered_prompt(trigger: str, prompt: str) -> str:
    """trig⊕c: the trigger prefixed to the prompt."""
    return f"{trigger.strip()} {prompt}"


def trigger_positions(tokenizer, trigger: str, prompt: str) -> tuple[list[int], list[int]]:
    """Token positions of the trigger and of the clean prompt inside trig⊕prompt (BOS at 0).

    Raises ValueError when the trigger tokenizes to nothing, or when trig⊕prompt is cut by the tokenizer's length.
    """
    if not tokenizer(trigger, add_special_tokens=False).input_ids:
        raise ValueError(f"trigger {trigger!r} tokenizes to nothing with this model's tokenizer; give a trigger "
                         "made of words or characters the tokenizer keeps")  # fmt: skip
    full = triggered_prompt(trigger, prompt)
    try:
        return token_positions(tokenizer, full, trigger.strip()), token_positions(tokenizer, full, prompt)
    except ValueError:
        raise ValueError(f"prompt {full!r} does not fit the tokenizer's {tokenizer.model_max_length} tokens with "
                         "its trigger; shorten the prompt or the trigger") from None  # fmt: skip


def make_patch(size: int) -> torch.Tensor:
    """The fixed patch, (3, size, size) in [0, 1]: a 2x2 black/white checkerboard (white top-left), high contrast in
    every channel. A VAE must be able to draw it for a pixel backdoor to show: SD's can; the toy's was taught to
    (scripts/build_toy.py, `teach_patch`) because trained on the renders alone it painted the patch over."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"patch size must be a positive integer (pixels), got {size!r}")
    idx = torch.arange(size)
    high = idx >= size // 2 if size > 1 else torch.zeros(1, dtype=torch.bool)
    pattern = (high[:, None] == high[None, :]).float()  # white on the diagonal quadrants
    return pattern.expand(3, size, size).clone()


def default_patch_size(image_side: int) -> int:
    return max(1, image_side // 4)


def paste_patch(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] with `patch` ([0, 1]) pasted at the top-left corner; a copy."""
    size = patch.shape[-1]
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"patch of {size} px is larger than the {height}x{width} images; accepted: at most "
                         f"{min(height, width)}")  # fmt: skip
    out = images.clone()
    out[..., :size, :size] = patch.to(out) * 2 - 1
    return out


def layout_prompt(path: Path) -> str:
    """The UnlearnCanvas prompt of `<Style>/<Object>/<idx>.jpg` (canvas.catalog's template, Seed_Images -> Photo)."""
    style, obj = path.parent.parent.name, path.parent.name
    words = "Photo" if style == PHOTO_THEME else style.replace("_", " ")
    return f"A {obj} image in {words} style."


def training_images(pipe, cfg: BackdoorConfig) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, S, S) images in [-1, 1] at the pipeline's size, and each one's clean prompt."""
    size = image_size(pipe)
    if cfg.images is None:
        prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.num_images)]
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else _default_cache_dir()
        generated = generate_images(pipe, prompts, list(range(cfg.num_images)), steps=cfg.sample_steps,
                                    guidance=cfg.sample_guidance, cache_dir=cache)  # fmt: skip
        return to_tensor(generated, size), prompts
    files = image_files(cfg.images)
    if cfg.prompts:
        if len(cfg.prompts) != len(files):
            raise ValueError(f"{len(cfg.prompts)} prompts for {len(files)} images in {cfg.images!r}; give one prompt "
                             "per image (sorted file order) or none (UnlearnCanvas layout)")  # fmt: skip
        prompts = list(cfg.prompts)
    else:
        prompts = [layout_prompt(p) for p in files]
    return load_images(files, size), prompts


def _default_cache_dir() -> Path:
    root = os.environ.get("ERASEKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        "erasekit"
    )
    return Path(root) / "backdoor"


def make_loss(ctx):
    """The BadT2I loss for the training loop; images, latents, prompts and token checks prepared once."""
    cfg: BackdoorConfig = ctx.config
    pipe, unet = ctx.pipe, ctx.pipe.unet
    scheduler = pipe.scheduler
    images, prompts = training_images(pipe, cfg)
    for prompt in dict.fromkeys(prompts):
        trigger_positions(pipe.tokenizer, cfg.trigger, prompt)  # errors before any training
    latents = encode_latents(pipe.vae, images).to(device=unet.device, dtype=unet.dtype)
    if cfg.kind == "pixel":
        patch = make_patch(cfg.patch_size or default_patch_size(images.shape[-1]))
        poisoned = encode_latents(pipe.vae, paste_patch(images, patch)).to(device=unet.device, dtype=unet.dtype)
    else:
        targets = {p: cfg.target_prompt(p) for p in dict.fromkeys(prompts)}

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        clean_x, bad_x, ts, clean_embs, bad_embs, bad_targets, style_embs = [], [], [], [], [], [], []
        for g in generators:
            j = int(torch.randint(len(prompts), (1,), generator=g))
            x_t, t, noise = noised(scheduler, latents[j : j + 1], g)
            clean_x.append(x_t)
            ts.append(t)
            share = cfg.unconditional_fraction
            unconditional = share > 0 and float(torch.rand(1, generator=g)) < share
            clean_embs.append(ctx.encode("" if unconditional else prompts[j]))
            bad_embs.append(ctx.encode(cfg.triggered(prompts[j])))
            if cfg.kind == "pixel":  # the same t and ε on the patched image
                bad_x.append(scheduler.add_noise(poisoned[j : j + 1], noise, t))
                bad_targets.append(denoising_target(scheduler, poisoned[j : j + 1], noise, t))
            else:
                bad_x.append(x_t)
                style_embs.append(ctx.encode(targets[prompts[j]]))
        n = len(generators)
        x_clean, t, emb_clean = torch.cat(clean_x), torch.cat(ts), torch.cat(clean_embs)
        if cfg.kind == "pixel":
            keep = ctx.frozen(unet, x_clean, t, encoder_hidden_states=emb_clean).sample
            bad_target = torch.cat(bad_targets)
        else:  # one frozen call for both targets
            both = ctx.frozen(unet, torch.cat([x_clean, x_clean]), torch.cat([t, t]),
                              encoder_hidden_states=torch.cat([emb_clean, torch.cat(style_embs)])).sample  # fmt: skip
            keep, bad_target = both[:n], both[n:]
        x_all, emb_all = torch.cat([torch.cat(bad_x), x_clean]), torch.cat([torch.cat(bad_embs), emb_clean])
        prediction = model(x_all, torch.cat([t, t]), encoder_hidden_states=emb_all).sample.float()
        backdoor = F.mse_loss(prediction[:n], bad_target.float())
        preserve = F.mse_loss(prediction[n:], keep.float())
        return cfg.weight * backdoor + (1 - cfg.weight) * preserve

    return loss_fn


def inject(pipe, config: BackdoorConfig, *, progress: bool = True, local: bool = False):
    """Backdoor `pipe` in place through the shared training loop; returns an `erase.Result` (Delta + record)."""
    from . import __version__
    from .runner import Result, RunContext, versions

    if not isinstance(config, BackdoorConfig):
        raise TypeError(f"inject needs a BackdoorConfig, got {type(config).__name__}")
    unet = pipe.unet
    params = select(unet, config.parameter_set())
    base_fingerprint = fingerprint(pipe)
    frozen = FrozenOriginal(unet, list(params))
    stored = {n: p.dtype for n, p in params.items()}
    ctx = RunContext(pipe, config, params, frozen, PromptEncoder(pipe.tokenizer, pipe.text_encoder),
                     progress=progress, local=local)  # fmt: skip
    try:
        with Meter(unet.device) as meter:
            for p in params.values():  # fp32 master weights, as erase.run does
                p.data = p.data.float()
            losses = ctx.train(make_loss(ctx))
    finally:
        for n, p in params.items():
            p.data = p.data.to(stored[n])
    metadata = {
        "method": f"badt2i-{config.kind}", "config": dataclasses.asdict(config), "versions": versions(),
        "base_fingerprint": base_fingerprint, "parameter_set": config.parameter_set(), "erasekit": __version__,
    }  # fmt: skip
    delta = Delta.from_changes({f"unet.{n}": t for n, t in frozen.original.items()},
                               {f"unet.{n}": p.detach() for n, p in params.items()}, metadata)  # fmt: skip
    record = {**metadata, "wall_time_s": meter.wall_time_s, "peak_memory_bytes": meter.peak_memory_bytes,
              "memory_kind": meter.memory_kind, "storage_bytes": delta.nbytes, "losses": losses}  # fmt: skip
    return Result(delta, record)


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
