"""Shared pieces of the unit tests: a saved tiny pipeline and small ESD configs."""

from __future__ import annotations

from pathlib import Path

import torch

import erase
from erase.testing import tiny_pipeline


def fresh_pipe(seed: int = 0):
    pipe = tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_esd(**overrides):
    values = {"concepts": ["van gogh"], "steps": 3, "lr": 1e-3, "ddim_steps": 4, "seed": 0}
    values.update(overrides)
    return erase.make_config("esd", **values)


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def save_tiny(path: Path, seed: int = 0) -> Path:
    fresh_pipe(seed).save_pretrained(path)
    return path


def generate(pipe, prompt: str = "a cat", seed: int = 0):
    return pipe(prompt, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
