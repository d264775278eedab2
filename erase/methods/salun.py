"""SalUn, Saliency Unlearning (Fan et al., ICLR 2024), for diffusion models.

1. Saliency mask: the gradient of the forgetting loss, the diffusion loss `‖e(x_t, c_f) − ε‖²` of the forget images
   under their forget prompts (as the public generate_mask.py does), summed over the forget set in batches; then
   `m = 1(|g| ≥ γ)` with γ chosen so that exactly `mask_fraction` of the weights of the parameter set, ranked
   globally, are 1 (ties at γ broken by position). Default set: the whole UNet, as the public SD code.
2. Training: `‖e(x_t, c_f) − sg(e(x_t, c'))‖² + α·‖e(x_r,t, c_r) − ε‖²`, with every gradient multiplied by m (a
   hook on each parameter, removed after training). x_t is one noised forget image used for both terms of the
   relabelling loss; the target e(x_t, c') is the model being trained, detached, as in the public code (paper:
   "sg"). α `retain_weight`: 0.5 for classes, 0.1 for NSFW in the paper.
Weights outside the mask stay bit-identical: their gradients are exactly zero, so Adam without weight decay never
moves them (its moments stay zero). Weight decay would move them, so it is refused; a final check restores and
warns should any masked weight have moved anyway (e.g. a quantized optimizer).

Prompts (our scheme): `forget_prompts`, `pseudo_prompts` and `retain_prompts` are each one template for every
image, or a list with one prompt per image (in the sorted order of erase.images.image_files). A template may use
`{object}` and `{style}`: the image's parent and grandparent folder names with underscores as spaces, so the
UnlearnCanvas layout <Style>/<Object>/<idx>.jpg gives "A {object} image in {style} style." per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainingConfig
from ..context import RunContext
from ..frozen import unwrap
from ..images import denoising_target, diffusion_loss, encode_latents, image_files, image_size, load_images, noised
from ..sampling import sample_seed
from ..train import LossFn


@dataclass
class SalUnConfig(TrainingConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper (class-wise forgetting): lr 1e-5, batch 8, α 0.5, top 50% saliency mask, whole UNet.
        "paper": {"steps": 100, "lr": 1e-5, "batch_size": 8, "retain_weight": 0.5, "mask_fraction": 0.5},
        # UnlearnCanvas: the target style relabelled as the photo class; forget/retain images = split indices 1-3.
        "unlearncanvas": {
            "steps": 100, "lr": 1e-5, "batch_size": 8, "retain_weight": 0.5, "mask_fraction": 0.5,
            "forget_prompts": "A {object} image in {style} style.",
            "pseudo_prompts": "A {object} image in Photo style.",
            "retain_prompts": "A {object} image in {style} style.",
        },
        # Measured on the toy (scripts/tune_toy.py, Pop_Art): lr 1e-4 UA 100 / IRA 92; 5e-4 over-erases (IRA 38),
        # as does 2e-4 for 50 steps (IRA 59).
        "toy": {
            "steps": 100, "lr": 1e-4, "batch_size": 8, "retain_weight": 0.5, "mask_fraction": 0.5,
            "forget_prompts": "A {object} image in {style} style.",
            "pseudo_prompts": "A {object} image in Photo style.",
            "retain_prompts": "A {object} image in {style} style.",
        },
    }  # fmt: skip

    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 8
    forget_images: str | list[str] | None = None  # folder(s) or files
    forget_prompts: str | list[str] = "A {object} image in {style} style."
    pseudo_prompts: str | list[str] = "A {object} image in Photo style."  # c', the concept the forget images map to
    retain_images: str | list[str] | None = None
    retain_prompts: str | list[str] = "A {object} image in {style} style."
    retain_weight: float = 0.5  # α
    mask_fraction: float = 0.5
    mask_batch_size: int = 8  # forget images per gradient pass while building the mask

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.mask_fraction, bool) or not isinstance(self.mask_fraction, int | float)
            or not 0 < self.mask_fraction <= 1
        ):  # fmt: skip
            raise ValueError(f"mask_fraction must be in (0, 1], got {self.mask_fraction!r}")
        if not isinstance(self.retain_weight, int | float) or not self.retain_weight >= 0:
            raise ValueError(f"retain_weight must be a non-negative number, got {self.retain_weight!r}")
        if self.weight_decay:
            raise ValueError(f"weight_decay must be 0 for SalUn, got {self.weight_decay!r}: decay would move the "
                             "weights outside the saliency mask")  # fmt: skip
        if not isinstance(self.mask_batch_size, int) or self.mask_batch_size < 1:
            raise ValueError(f"mask_batch_size must be a positive integer, got {self.mask_batch_size!r}")
        if self.forget_images is None or (not isinstance(self.forget_images, str) and not list(self.forget_images)):
            raise ValueError(f"forget_images must name a folder or image files, got {self.forget_images!r}")
        forget = _files("forget_images", self.forget_images)
        _prompts("forget_prompts", self.forget_prompts, forget)
        _prompts("pseudo_prompts", self.pseudo_prompts, forget)
        if self.retain_weight > 0:
            if self.retain_images is None or (not isinstance(self.retain_images, str) and not list(self.retain_images)):
                raise ValueError(f"retain_images is required when retain_weight > 0 (got {self.retain_images!r}); "
                                 "give retain images or set retain_weight=0")  # fmt: skip
            _prompts("retain_prompts", self.retain_prompts, _files("retain_images", self.retain_images))


def _files(name: str, source) -> list[Path]:
    try:
        return image_files(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None


def _prompts(name: str, prompts: str | list[str], files: list[Path]) -> list[str]:
    """One prompt per image: a template filled from each image's folders, or a list given one-to-one."""
    if isinstance(prompts, str):
        out = []
        for path in files:
            words = {"object": path.parent.name.replace("_", " "), "style": path.parent.parent.name.replace("_", " ")}
            try:
                out.append(prompts.format(**words))
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"{name} template {prompts!r}: only {{object}} and {{style}} can be filled") from None
        return out
    prompts = list(prompts)
    if len(prompts) != len(files) or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: give one template or one prompt per image ({len(files)} images), "
                         f"got {len(prompts)} prompts")  # fmt: skip
    return prompts


def saliency_mask(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    scheduler,
    latents: torch.Tensor,
    emb: torch.Tensor,
    fraction: float,
    batch_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Boolean masks holding exactly round(fraction·n) ones over the n weights: the largest |Σ_batches ∇ℓ_f|."""
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    stored = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for b, start in enumerate(range(0, len(latents), batch_size)):
            g = torch.Generator().manual_seed(sample_seed(seed, "salun-mask", b))
            loss = diffusion_loss(model, scheduler, latents[start : start + batch_size],
                                  emb[start : start + batch_size], g)  # fmt: skip
            for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if grad is not None:
                    grads[name] += grad.float()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(stored[name])
    flat = torch.cat([g.abs().reshape(-1) for g in grads.values()])  # (n,)
    keep = round(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # γ: the keep-th largest |g|
        chosen = flat > threshold
        ties = (flat == threshold).nonzero().reshape(-1)[: keep - int(chosen.sum())]
        chosen[ties] = True
    masks, offset = {}, 0
    for name, g in grads.items():
        masks[name] = chosen[offset : offset + g.numel()].reshape(g.shape)
        offset += g.numel()
    return masks


def make_loss(ctx: RunContext) -> LossFn:
    """The SalUn loss for the training loop; computes the saliency mask first and hands it to the loop as
    `ctx.grad_masks`, so only the salient weights train."""
    cfg: SalUnConfig = ctx.config
    unet, vae, scheduler = ctx.pipe.unet, ctx.pipe.vae, ctx.pipe.scheduler
    size = image_size(ctx.pipe)

    def data(source, prompts: str | list[str], name: str) -> tuple[torch.Tensor, list[str]]:
        files = _files(name, source)
        return encode_latents(vae, load_images(files, size)).to(unet.device), _prompts(name, prompts, files)

    forget, forget_prompts = data(cfg.forget_images, cfg.forget_prompts, "forget_images")
    pseudo_prompts = _prompts("pseudo_prompts", cfg.pseudo_prompts, _files("forget_images", cfg.forget_images))
    retain, retain_prompts = (
        data(cfg.retain_images, cfg.retain_prompts, "retain_images") if cfg.retain_weight > 0 else (None, [])
    )

    ctx.grad_masks = saliency_mask(
        unet, ctx.params, scheduler, forget, ctx.encode(forget_prompts), cfg.mask_fraction, cfg.mask_batch_size,
        cfg.seed,
    )  # fmt: skip

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        xs, ts, forget_embs, pseudo_embs, r_xs, r_ts, r_targets, r_embs = [], [], [], [], [], [], [], []
        for g in generators:
            j = int(torch.randint(len(forget), (1,), generator=g))
            x_t, t, _ = noised(scheduler, forget[j : j + 1], g)
            xs.append(x_t)
            ts.append(t)
            forget_embs.append(ctx.encode(forget_prompts[j]))
            pseudo_embs.append(ctx.encode(pseudo_prompts[j]))
            if retain is not None:
                k = int(torch.randint(len(retain), (1,), generator=g))
                rx_t, rt, noise = noised(scheduler, retain[k : k + 1], g)
                r_xs.append(rx_t)
                r_ts.append(rt)
                r_targets.append(denoising_target(scheduler, retain[k : k + 1], noise, rt))
                r_embs.append(ctx.encode(retain_prompts[k]))
        x_t, t = torch.cat(xs), torch.cat(ts)
        with torch.no_grad():  # relabelled target from the model being trained, detached (public code)
            target = unwrap(model)(x_t, t, encoder_hidden_states=torch.cat(pseudo_embs)).sample
        n = len(xs)
        inputs, steps, embs = [x_t, *r_xs], [t, *r_ts], [torch.cat(forget_embs), *r_embs]
        prediction = model(torch.cat(inputs), torch.cat(steps), encoder_hidden_states=torch.cat(embs)).sample.float()
        loss = F.mse_loss(prediction[:n], target.float())
        if retain is not None:
            loss = loss + cfg.retain_weight * F.mse_loss(prediction[n:], torch.cat(r_targets).float())
        return loss

    return loss_fn
