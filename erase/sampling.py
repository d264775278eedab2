"""Sampling helpers shared by methods: seeded noise, guided noise prediction, partial DDIM trajectories."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

# (latents, timestep, text embeddings) -> predicted noise
NoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from its parts, so sample i of step s draws the same numbers in any process layout."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def randn(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (identical on every device) and moved to `device`."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def guided_noise(
    noise_fn: NoiseFn, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free guided noise `e(x,∅) + g·(e(x,c) − e(x,∅))` from one batched call."""
    both = noise_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
    e_uncond, e_cond = both.chunk(2)
    return e_uncond + guidance * (e_cond - e_uncond)


def ddim_scheduler(scheduler_config: dict, num_steps: int) -> DDIMScheduler:
    """A DDIM scheduler with `num_steps` timesteps set; build once per run, it holds no per-trajectory state."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def ddim_partial(
    noise_fn: NoiseFn,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    stop_index: int,
) -> tuple[torch.Tensor, int]:
    """Run DDIM (eta 0, classifier-free guidance) from noise `latents` for `stop_index` steps of `scheduler`'s
    schedule (see `ddim_scheduler`).

    Returns the latents and the DDPM timestep they sit at (`timesteps[stop_index]` of the DDIM schedule).
    """
    num_steps = len(scheduler.timesteps)
    if not 0 <= stop_index < num_steps:
        raise ValueError(f"stop_index {stop_index} outside [0, {num_steps})")
    x = latents * scheduler.init_noise_sigma
    batch = x.shape[0]
    for t in scheduler.timesteps[:stop_index]:
        t_batch = t.expand(batch).to(x.device)
        eps = guided_noise(noise_fn, x, t_batch, cond, uncond, guidance)
        x = scheduler.step(eps, t, x).prev_sample
    return x, int(scheduler.timesteps[stop_index])
