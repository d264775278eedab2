"""Sampling helpers: seeded noise, guided noise prediction, partial DDIM trajectories, and `generate`, the one way
the toolkit samples images of (prompt, seed) pairs (answer sets, backdoor judging, generated training images, the toy
build)."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from .conditioning import is_sdxl, pooled_dim, unpack

# (latents, timestep, text embeddings) -> the model's output: ε, or v (or x0), as its scheduler's prediction_type says;
# guidance and DDIM steps take any of them (`scheduler.step` reads the type, guidance weights sum to 1)
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
    return e_uncond + guidance * (e_cond - e_uncond)  # weights sum to 1: as valid for v (or x0) as for ε


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
    `num_steps` timesteps set when given; build once per run, it holds no per-trajectory state. The config's
    prediction_type, timestep_spacing, steps_offset and zero-SNR rescaling carry over; where it has no clip_sample or
    set_alpha_to_one (a PNDM or Euler config), SD's False is used, not DDIM's default True (x0 is never clipped)."""
    scheduler = DDIMScheduler.from_config({"clip_sample": False, "set_alpha_to_one": False, **dict(scheduler_config)})
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


OutputType = Literal["pt", "np", "pil"]
Images = torch.Tensor | np.ndarray | list[Image.Image]
Encoder = Callable[[list[str]], torch.Tensor]


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


def _direct(pipe) -> bool:
    """Whether `_sample_batch` reproduces `pipe(...)`: a plain text-to-image pipeline (UNet, VAE, no safety checker,
    no guidance-embedding UNet); anything else is sampled through the pipeline's own call."""
    unet = getattr(pipe, "unet", None)
    return (
        isinstance(pipe, StableDiffusionPipeline)
        and type(pipe).__call__ is StableDiffusionPipeline.__call__
        and getattr(pipe, "safety_checker", None) is None
        and getattr(unet.config, "time_cond_proj_dim", None) is None
        and getattr(pipe, "cross_attention_kwargs", None) is None
    )


def _step_kwargs(scheduler, generators: list[torch.Generator], eta: float) -> dict[str, Any]:
    """The extra arguments the pipeline gives `scheduler.step`: eta and the generators, where the step takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def _sample_batch(pipe, cond: torch.Tensor, uncond: torch.Tensor | None, generators: list[torch.Generator], *,
                  steps: int, guidance: float, eta: float, size: int) -> torch.Tensor:  # fmt: skip
    """Decoded images in [-1, 1] of one batch: the diffusers text-to-image loop, written out so that the text is
    encoded once per run rather than per call and nothing but the UNet, the scheduler and the VAE runs per step."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, cond.dtype
    scale = pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, size // scale, size // scale)
    # one draw per image on the CPU with its own generator, as diffusers' randn_tensor does for a list of generators
    x = torch.cat([torch.randn(shape, generator=g, dtype=dtype) for g in generators]).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    text = torch.cat([uncond, cond]) if uncond is not None else cond
    extra = _step_kwargs(scheduler, generators, eta)
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if uncond is not None else x
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        eps = unet(model_in, t, encoder_hidden_states=text, return_dict=False)[0]
        if uncond is not None:
            e_uncond, e_cond = eps.chunk(2)
            eps = e_uncond + guidance * (e_cond - e_uncond)
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0]
    return vae.decode(x / vae.config.scaling_factor, return_dict=False, generator=generators)[0]


def _texts(pipe, prompts: list[str], encoder: Encoder | None, guided: bool):
    """(cond, uncond or None) embeddings of `prompts`: from `encoder` (the empty prompt encoded once), else the
    pipeline's own `encode_prompt`."""
    if encoder is None:
        cond, uncond = pipe.encode_prompt(prompts, pipe.unet.device, 1, guided)
        return cond, uncond if guided else None
    cond = encoder(prompts)
    return cond, encoder([""]).expand_as(cond) if guided else None


@dataclass(frozen=True)
class _Protocol:
    """What every batch of one `generate` call shares."""

    steps: int
    guidance: float
    eta: float
    size: int | None
    output_type: OutputType
    encoder: Encoder | None


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
    encoder: Encoder | None = None,
    batch_size: int = 8,
    output_type: OutputType = "pt",
) -> Images:
    """Images of `pipe` for (prompt, seed) pairs: one CPU `torch.Generator` per image, seeded with its seed, so an
    image depends only on its prompt and its seed (and, by float rounding only, on the batch it is drawn in);
    batches are consecutive slices of `batch_size`.

    The images are those of `pipe(prompt_embeds=..., negative_prompt_embeds=..., generator=[one per image], ...)`,
    drawn by a loop that calls the UNet, scheduler and VAE directly (no per-call pipeline overhead); a pipeline
    that loop does not cover (not a plain StableDiffusionPipeline, a safety checker, a guidance-embedding UNet,
    cross-attention kwargs) is called as such. `scheduler` replaces the pipeline's own for the call (e.g.
    `ddim_scheduler(pipe.scheduler.config)` for the benchmark's DDIM protocol). `encoder` (e.g. a caching
    `erase.text.PromptEncoder`, one text encoder only) gives the text embeddings, the empty prompt's as the
    unconditional ones; without it the pipeline encodes the prompts. `size` is the pixel height and width (None: the
    model's default). Returns, by `output_type`, a float32 CPU tensor (N, 3, H, W) in [0, 1] ("pt"), an array
    (N, H, W, 3) in [0, 1] ("np") or a list of PIL images ("pil").
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; each image needs one of each")
    if output_type not in ("pt", "np", "pil"):
        raise ValueError(f"output_type {output_type!r} is not one of pt, np, pil")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    protocol = _Protocol(steps, guidance, eta, size, output_type, encoder)
    draw = _direct_batch if _direct(pipe) else _pipeline_batch
    batches = []
    with _scheduler(pipe, scheduler):
        for start in range(0, len(prompts), batch_size):
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            images = draw(pipe, list(prompts[start : start + batch_size]), generators, protocol)
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


def _direct_batch(pipe, prompts: list[str], generators: list[torch.Generator], protocol: _Protocol) -> Images:
    """One batch by `_sample_batch`, post-processed by the pipeline's own image processor."""
    guided = protocol.guidance > 1  # the pipeline's rule for classifier-free guidance
    cond, uncond = _texts(pipe, prompts, protocol.encoder, guided)
    size = protocol.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor:
        raise ValueError(f"size {size} is not a multiple of the VAE's downsampling factor {pipe.vae_scale_factor}")
    decoded = _sample_batch(pipe, cond, uncond, generators, steps=protocol.steps, guidance=protocol.guidance,
                            eta=protocol.eta, size=size)  # fmt: skip
    return pipe.image_processor.postprocess(
        decoded, output_type=protocol.output_type, do_denormalize=[True] * len(prompts)
    )


def _pipeline_batch(pipe, prompts: list[str], generators: list[torch.Generator], protocol: _Protocol) -> Images:
    """One batch through the pipeline's own call: the reference the direct loop reproduces."""
    encoder = protocol.encoder
    if encoder is None:
        text = {"prompt": prompts}
    elif is_sdxl(pipe.unet):
        text = _sdxl_embeds(pipe, encoder, prompts)
    else:
        text = {"prompt_embeds": encoder(prompts), "negative_prompt_embeds": encoder([""] * len(prompts))}
    return pipe(
        **text, num_inference_steps=protocol.steps, guidance_scale=protocol.guidance, eta=protocol.eta,
        height=protocol.size, width=protocol.size, output_type=protocol.output_type, generator=generators,
    ).images  # fmt: skip


def _sdxl_embeds(pipe, encoder: Encoder, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's embedding arguments from an encoder of packed embeddings (erase.conditioning), with the
    negative ones the pipeline itself uses for no negative prompt (zeros under `force_zeros_for_empty_prompt`)."""
    width = pooled_dim(pipe.unet)
    tokens, pooled = unpack(encoder(prompts), width)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = unpack(encoder([""] * len(prompts)), width)
    return {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}  # fmt: skip


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


@torch.no_grad()
def ddim_partial_each(
    noise_fn: NoiseFn,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    stop_indices: Sequence[int],
) -> tuple[torch.Tensor, list[int]]:
    """`ddim_partial` for a batch whose samples stop after different numbers of steps, in one batched run: sample
    b's latents after `stop_indices[b]` steps (its noise `latents[b]`, its condition `cond[b]`), and the DDPM
    timesteps they sit at. The run is as long as the longest; each sample is kept when it reaches its stop."""
    num_steps = len(scheduler.timesteps)
    if len(stop_indices) != latents.shape[0] or not all(0 <= s <= num_steps for s in stop_indices):
        raise ValueError(f"stop_indices {list(stop_indices)} must give one index in [0, {num_steps}] per sample")
    x = latents * scheduler.init_noise_sigma
    kept = x.clone()
    for k, t in enumerate(scheduler.timesteps[: max(stop_indices, default=0)]):
        eps = guided_noise(noise_fn, x, t.expand(x.shape[0]).to(x.device), cond, uncond, guidance)
        x = scheduler.step(eps, t, x).prev_sample
        done = [b for b, s in enumerate(stop_indices) if s == k + 1]
        kept[done] = x[done]
    return kept, [ddim_level(scheduler, s) for s in stop_indices]
