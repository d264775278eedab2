"""Images for data-driven methods: read them, encode them to latents, noise them, and generate them (cached).

CA, FMN, SalUn, EraseDiff, Scissorhands and backdoor injection all train on noised latents of some images; this is
their one implementation of that path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import save_image
from .delta import fingerprint
from .sampling import generate, randn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from a folder (searched recursively, sorted), one file, or a list of files.

    Raises FileNotFoundError naming the source when it does not exist or holds no image.
    """
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image source {str(path)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source!r}")
    return files


def named_image_files(name: str, source) -> list[Path]:
    """`image_files(source)` for the config field `name`: a missing source, or one with no image, is an error that
    names the field (e.g. "forget_images: image source '...' does not exist")."""
    if source is None or (not isinstance(source, str | os.PathLike) and not list(source)):
        raise ValueError(f"{name} must name a folder or image files, got {source!r}")
    try:
        return image_files(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None


def image_prompts(name: str, prompts: str | Sequence[str], files: Sequence[Path]) -> list[str]:
    """One prompt per image: a template filled from each image's folders, or a list given one-to-one.

    A template may use `{object}` and `{style}`: the image's parent and grandparent folder names with underscores
    as spaces, so the UnlearnCanvas layout <Style>/<Object>/<idx>.jpg gives "A {object} image in {style} style."
    per image. `name` (the config field) is named in the errors."""
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


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1], the VAE's input range; images are resized with bicubic filtering."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_images(source, size: int) -> torch.Tensor:
    return to_tensor([Image.open(p) for p in image_files(source)], size)


def image_size(pipe) -> int:
    """Pixel size the pipeline generates by default: latent size times the VAE's downsampling."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def encoded_image_set(pipe, name: str, source, prompts: str | Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """The latents of `source`'s images at the pipeline's size, on the UNet's device, and one prompt per image:
    a forget or retain set of a data-driven method (`name`, its config field, is named in errors)."""
    files = named_image_files(name, source)
    texts = image_prompts(name, prompts, files)
    return encode_latents(pipe.vae, load_images(files, image_size(pipe))).to(pipe.unet.device), texts


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE latents (distribution means, so the cache is deterministic) of images in [-1, 1]."""
    out = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device=vae.device, dtype=vae.dtype)
        out.append(vae.encode(chunk).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def noised(
    scheduler, latents: torch.Tensor, generator: torch.Generator, t_range: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise) for a diffusion loss: t uniform over the training timesteps (or `t_range`, end exclusive)."""
    low, high = t_range or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(low, high, (latents.shape[0],), generator=generator).to(latents.device)
    noise = randn(tuple(latents.shape), generator, latents.device, latents.dtype)
    return noise_latents(scheduler, latents, noise, t), t, noise


# What a UNet may be trained to predict at x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε: ε ("epsilon", SD 1.x), the velocity
# v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 ("v_prediction", SD 2.x 768) or x0 itself ("sample"). Each is affine in ε for a fixed
# x_t, so a combination of model outputs with weights summing to 1 (guidance, ESD's target) means the same in all.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The scheduler's `prediction_type` (absent: "epsilon", diffusers' default), checked: a clear error names any
    other, so a run refuses a model it would train on the wrong target before it starts."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"the pipeline's scheduler ({type(scheduler).__name__}) has prediction_type {kind!r}; "
                         f"accepted: {', '.join(PREDICTION_TYPES)}")  # fmt: skip
    return kind


def _levels(scheduler, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)) in float32, shaped (B, 1, ..., 1) to broadcast over `like` (B, ...). From the scheduler's
    own ᾱ (its betas, zero-SNR rescaling included), never its add_noise: Euler-type schedulers noise as x0 + σ·ε."""
    t = torch.as_tensor(t).reshape(-1).to(device="cpu", dtype=torch.long)
    alpha_bar = scheduler.alphas_cumprod.cpu().float()[t].to(like.device).view(-1, *[1] * (like.dim() - 1))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def noise_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε in the latents' dtype: the noised input every UNet here is trained on."""
    a, s = _levels(scheduler, t, latents)
    return (a * latents.float() + s * noise.float()).to(latents.dtype)


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """What the model should predict for `latents` noised with `noise` at `t`, by the scheduler's prediction type:
    ε, the velocity √ᾱ_t·ε − √(1−ᾱ_t)·x0 (in float32), or x0."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    a, s = _levels(scheduler, t, latents)
    return a * noise.float() - s * latents.float()


def split_prediction(
    scheduler, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) in float32 from a model output at x_t and t, by the scheduler's prediction type: the inverse of
    `denoising_target`. From ε: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ; from x0: ε = (x_t − √ᾱ·x0)/√(1−ᾱ); from v, with no
    division (so also at a zero-SNR end): ε = √ᾱ·v + √(1−ᾱ)·x_t, x0 = √ᾱ·x_t − √(1−ᾱ)·v."""
    kind = prediction_type(scheduler)
    a, s = _levels(scheduler, t, x_t)
    out, x = output.float(), x_t.float()
    if kind == "epsilon":
        return out, (x - s * out) / a
    if kind == "sample":
        return (x - a * out) / s, out
    return a * out + s * x, a * x - s * out


def diffusion_loss(model, scheduler, latents: torch.Tensor, emb: torch.Tensor, generator: torch.Generator):
    """The denoising loss `‖e(x_t, c) − ε‖²` (or v-prediction's target) on noised `latents`."""
    x_t, t, noise = noised(scheduler, latents, generator)
    target = denoising_target(scheduler, latents, noise, t)
    return F.mse_loss(model(x_t, t, encoder_hidden_states=emb).sample.float(), target.float())


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
) -> list[Image.Image]:
    """Images of `pipe` for (prompt, seed) pairs (`erase.sampling.generate`, the pipeline's own scheduler); with
    `cache_dir`, each image is stored as PNG under a key of (model fingerprint, prompt, seed, steps, guidance) and
    reused by later runs, and only the missing ones are generated (in batches of `batch_size`)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    model_id = fingerprint(pipe) if cache_dir else ""
    paths: list[Path | None] = []
    for prompt, seed in zip(prompts, seeds):
        key = hashlib.sha256(f"{model_id}|{prompt}|{seed}|{steps}|{guidance}".encode()).hexdigest()[:24]
        paths.append(Path(cache_dir) / f"{key}.png" if cache_dir else None)
    images: list[Image.Image | None] = [Image.open(p).convert("RGB") if p and p.is_file() else None for p in paths]
    todo = [i for i, im in enumerate(images) if im is None]
    for start in range(0, len(todo), batch_size):  # saved batch by batch, so an interrupted run keeps its images
        chunk = todo[start : start + batch_size]
        chunk_prompts, chunk_seeds = [prompts[i] for i in chunk], [seeds[i] for i in chunk]
        out = generate(
            pipe, chunk_prompts, chunk_seeds, steps=steps, guidance=guidance, batch_size=len(chunk), output_type="pil"
        )
        for i, image in zip(chunk, out):
            images[i] = image
            if paths[i] is not None:
                save_image(image, paths[i])
    return images  # type: ignore[return-value]
