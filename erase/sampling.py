"""Sampling helpers: seeded noise, guided noise prediction, partial DDIM trajectories, and `generate`, the one way
the toolkit samples images of (prompt, seed) pairs (answer sets, backdoor judging, generated training images, the toy
build)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

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


# Stable Diffusion v1's released DDIM settings: its noise schedule, and x0 never clipped (clipping collapses
# latents of std 1 and washes images out).
SD_V1_DDIM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def ddim_scheduler(scheduler_config: Mapping[str, Any], num_steps: int | None = None) -> DDIMScheduler:
    """A DDIM scheduler on the noise schedule of `scheduler_config` (any scheduler's config, or `SD_V1_DDIM`), with
    `num_steps` timesteps set when given; build once per run, it holds no per-trajectory state."""
    scheduler = DDIMScheduler.from_config(dict(scheduler_config))
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


OutputType = Literal["pt", "np", "pil"]
Images = torch.Tensor | np.ndarray | list[Image.Image]


@contextmanager
def _scheduler(pipe, scheduler) -> Iterator[None]:
    """`pipe` samples with `scheduler` inside the block (None: its own); its own scheduler is restored after."""
    original = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    eta: float = 0.0,
    size: int | None = None,
    scheduler=None,
    encoder: Callable[[list[str]], torch.Tensor] | None = None,
    batch_size: int = 8,
    output_type: OutputType = "pt",
) -> Images:
    """Images of `pipe` for (prompt, seed) pairs: one CPU `torch.Generator` per image, so an image depends only on
    its prompt, its seed and the batch it is drawn in; batches are consecutive slices of `batch_size`.

    `scheduler` replaces the pipeline's own for the call (e.g. `ddim_scheduler(pipe.scheduler.config)` for the
    benchmark's DDIM protocol). `encoder` (e.g. a caching `erase.text.PromptEncoder`, one text encoder only) gives
    the text embeddings, the empty prompt's as the unconditional ones; without it the pipeline encodes the prompts.
    `size` is the pixel height and width (None: the model's default). Returns, by `output_type`, a float32 CPU
    tensor (N, 3, H, W) in [0, 1] ("pt"), an array (N, H, W, 3) in [0, 1] ("np") or a list of PIL images ("pil").
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; each image needs one of each")
    if output_type not in ("pt", "np", "pil"):
        raise ValueError(f"output_type {output_type!r} is not one of pt, np, pil")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batches = []
    with _scheduler(pipe, scheduler):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            text = (
                {"prompt_embeds": encoder(chunk), "negative_prompt_embeds": encoder([""] * len(chunk))}
                if encoder is not None
                else {"prompt": chunk}
            )
            images = pipe(
                **text,
                num_inference_steps=steps,
                guidance_scale=guidance,
                eta=eta,
                height=size,
                width=size,
                output_type=output_type,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]],
            ).images
            batches.append(images.float().cpu() if output_type == "pt" else images)
    if output_type == "pt":
        return torch.cat(batches) if batches else torch.empty(0, 3, 0, 0)
    if output_type == "np":
        return np.concatenate(batches) if batches else np.empty((0, 0, 0, 3), dtype=np.float32)
    return [image for batch in batches for image in batch]


def ddim_level(scheduler: DDIMScheduler, steps_run: int) -> int:
    """The DDPM timestep whose noise level DDIM latents sit at after `steps_run` steps of `scheduler`'s schedule:
    `timesteps[steps_run]`, or 0 once every step has run (the schedule's clean end)."""
    timesteps = scheduler.timesteps
    return int(timesteps[steps_run]) if steps_run < len(timesteps) else 0


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
    schedule (see `ddim_scheduler`); `stop_index` may be the number of steps (the whole run).

    Returns the latents and the DDPM timestep they sit at (see `ddim_level`).
    """
    num_steps = len(scheduler.timesteps)
    if not 0 <= stop_index <= num_steps:
        raise ValueError(f"stop_index {stop_index} outside [0, {num_steps}]")
    x = latents * scheduler.init_noise_sigma
    batch = x.shape[0]
    for t in scheduler.timesteps[:stop_index]:
        t_batch = t.expand(batch).to(x.device)
        eps = guided_noise(noise_fn, x, t_batch, cond, uncond, guidance)
        x = scheduler.step(eps, t, x).prev_sample
    return x, ddim_level(scheduler, stop_index)
