"""Which weights carry a concept: gradients of a forgetting loss on the forget images, and the top fraction of a
per-weight score. SalUn ranks `|Σ_b g_b|` (its saliency mask), Scissorhands `|Σ_b |g_b| ⊙ w|` (SNIP's connection
sensitivity); both rank over many tensors at once and need exactly the requested count, so the ranking lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .images import denoising_target, noised


def guided_mask_loss(
    model: nn.Module,
    scheduler,
    latents: torch.Tensor,
    emb: torch.Tensor,
    null_emb: torch.Tensor,
    guidance: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """−MSE(ε, (1+g)·e(x_t, c) − g·e(x_t, ∅)): the forgetting loss of SalUn's public generate_mask.py (Scissorhands'
    shs_cls.py uses it without the minus), whose gradient says which weights carry the concept under
    classifier-free guidance (one x_t, t for both terms; one UNet call)."""
    x_t, t, noise = noised(scheduler, latents, generator)
    target = denoising_target(scheduler, latents, noise, t)
    n = latents.shape[0]
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([emb, null_emb])).sample
    cond, uncond = out[:n].float(), out[n:].float()  # (1+g) − g = 1: a v-model's guided output is v, like the target
    return -F.mse_loss((1 + guidance) * cond - guidance * uncond, target.float())


def summed_gradients(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    losses: Sequence[Callable[[], torch.Tensor]],
    absolute: bool = False,
) -> dict[str, torch.Tensor]:
    """`Σ_k ∇ losses[k]()` over `params` in float32 (`absolute`: `Σ_k |∇ losses[k]()|`), one backward pass per
    loss; a tensor a loss does not reach gets zeros. The model's requires_grad flags are restored afterwards."""
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    stored = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for loss_fn in losses:
            loss = loss_fn()
            for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if grad is not None:
                    grads[name] += grad.float().abs() if absolute else grad.float()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(stored[name])
    return grads


def top_fraction(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks (one per tensor) holding exactly round(fraction·n) ones over the n scores of all tensors
    together: the largest, ties at the threshold broken by position (tensor order, then flat index)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # (n,)
    keep = round(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest score
        chosen = flat > threshold
        ties = (flat == threshold).nonzero().reshape(-1)[: keep - int(chosen.sum())]
        chosen[ties] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return masks
