"""`RunContext`: what a method gets from `erase.run`, the one typed API methods are written against."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import MethodConfig, TrainingConfig
from .frozen import FrozenOriginal
from .text import PromptEncoder
from .train import GradTransform, LossFn, TrainOutcome, train


@dataclass
class RunContext:
    """The pipeline being edited, the method's config, the declared parameters and the shared tools.

    `params` are the live tensors of the declared parameter set (`config.parameter_set()`; UNet tensors by their
    UNet names, text-encoder ones as `text_encoder.<name>` or `text_encoder_2.<name>`, erase.params), `frozen`
    answers as the original UNet would (`frozen_text[component]` as that text encoder originally would, for each one
    whose tensors train), `encode` caches prompt embeddings (of the text encoders as they were when first asked: a
    method that trains a text encoder encodes live prompts itself). A method that trains a masked subset of its
    parameters sets `grad_masks` (name -> 0/1 tensor) before `train`; weights outside the masks then never move. One
    that changes the whole gradient before each optimizer step (a projection) sets `grad_transform` (erase.train).
    """

    pipe: Any  # a diffusers StableDiffusion-style pipeline
    config: MethodConfig
    params: dict[str, nn.Parameter]
    frozen: FrozenOriginal
    encode: PromptEncoder
    checkpoint_dir: Path | None = None
    accelerator: Any = None  # an accelerate.Accelerator to train under; None: the loop makes its own
    progress: bool = True
    local: bool = False  # train in this process alone even under `accelerate launch` (one job per process)
    grad_masks: dict[str, torch.Tensor] | None = None
    run_key: str | None = None  # the run's identity (erase.runner.run_key): only its own checkpoints are resumed
    last_outcome: TrainOutcome | None = None  # what the last `train` call returned (losses, resume point)
    grad_transform: GradTransform | None = None
    # text encoder ("text_encoder", SDXL's "text_encoder_2") -> the original values of its trained tensors
    frozen_text: dict[str, FrozenOriginal] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)  # what the method measured along the run (JSON values):
    # the runner puts it into the record and the Delta's metadata under "findings" (e.g. RECE's embedding norms)

    def train(self, loss_fn: LossFn, params: dict[str, nn.Parameter] | None = None) -> TrainOutcome:
        """Run the shared training loop with the method's loss over the declared parameters, or over `params`
        (parameters of the UNet by their names in it, e.g. an adapter's while it is attached as a submodule)."""
        if not isinstance(self.config, TrainingConfig):
            raise TypeError(f"{type(self.config).__name__} has no training settings; only fine-tuning methods train")
        for component in self.frozen_text:  # only its declared tensors train; the rest of the encoder stays frozen
            getattr(self.pipe, component).requires_grad_(False)
        outcome = train(
            self.pipe.unet,
            self.params if params is None else params,
            loss_fn,
            self.config,
            accelerator=self.accelerator,
            checkpoint_dir=self.checkpoint_dir,
            local=self.local,
            progress=self.progress,
            grad_masks=self.grad_masks,
            checkpoint_key=self.run_key,
            grad_transform=self.grad_transform,
        )
        self.last_outcome = outcome
        if self.grad_masks is not None:
            moved = restore_outside_masks(self.params, self.frozen.original, self.grad_masks)
            if moved:
                warnings.warn(
                    f"{type(self.config).__name__}: {moved} weights outside the gradient masks had moved and were "
                    "restored",
                    stacklevel=2,
                )
        return outcome


@torch.no_grad()
def restore_outside_masks(
    params: dict[str, nn.Parameter], original: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> int:
    """Put back the original value of every weight outside its mask; returns how many had moved (masked gradients
    keep Adam without weight decay from moving them, but a quantized optimizer might)."""
    moved = 0
    for name, mask in masks.items():
        p = params[name]
        before = original[name].to(device=p.device, dtype=p.dtype)
        outside = ~mask.bool()
        moved += int((p[outside] != before[outside]).sum())
        p.copy_(torch.where(outside, before, p))
    return moved
