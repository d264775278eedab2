"""Shared pieces of the unit tests: a saved tiny pipeline, small ESD configs and random image folders."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import erase
from erase.params import select
from erase.testing import tiny_pipeline


def fresh_pipe(seed: int = 0):
    pipe = tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_images(folder: Path, count: int = 2, seed: int = 0) -> Path:
    """`count` random 16x16 PNGs (0.png, 1.png, ...) in `folder`, made if missing: images for data-driven methods."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


def small_esd(**overrides):
    values = {"concepts": ["van gogh"], "steps": 3, "lr": 1e-3, "ddim_steps": 4, "seed": 0}
    values.update(overrides)
    return erase.make_config("esd", **values)


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    """Copies of the UNet's attn2 K/V weights in float64, for closed-form methods' independent solves."""
    return {n: p.detach().clone().double() for n, p in select(pipe.unet, "kv").items()}


@torch.no_grad()
def padded_vectors(pipe, prompt: str) -> torch.Tensor:
    """One prompt's text-encoder output, every token of its padded sequence (T, d), float64, encoded alone."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0].double()


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def save_tiny(path: Path, seed: int = 0) -> Path:
    fresh_pipe(seed).save_pretrained(path)
    return path


def generate(pipe, prompt: str = "a cat", seed: int = 0):
    return pipe(prompt, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def listening_pipe():
    """The tiny pipeline with its cross-attention outputs scaled up 20x: a random UNet barely listens to its text,
    and an objective that does not depend on the prompt cannot show an attack or a learned word working."""
    pipe = fresh_pipe()
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "attn2.to_out.0.weight" in name:
                param.mul_(20)
    return pipe
