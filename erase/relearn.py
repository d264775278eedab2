"""Relearning: fine-tune a (possibly erased) model for a few steps on images of a concept, to see whether it returns.

An erasure that only hides a concept gives it back after a handful of ordinary fine-tuning steps; one that removed
it needs about as many steps as the base model needs to learn a concept it never saw. `relearn` fine-tunes `pipe`
as it is with the standard denoising loss `‖e(x_t, c) − ε‖²` (the v-prediction target on a v-model) on the VAE
latents of the given images paired with their prompts, and calls `on_checkpoint(k)` after each k of a schedule of
cumulative steps (one run: k = 10 is the k = 5 model trained 5 steps more, same optimizer state).

What the papers fine-tune: the whole UNet with AdamW at lr 1e-5 and the plain denoising loss on images of the
erased concept (Meta-Unlearning, Gao et al. 2024, simulates relearning so: sail-sg/Meta-Unlearning src/meta.py,
`gather_parameters_full` and `optim.AdamW(..., lr=args.learning_rate)`, default 1e-5, weight decay 1e-4); concept
resurgence (Suriyakumar et al. 2024, "Unstable Unlearning") fine-tunes an erased SD the same way on unrelated
images. Hence the defaults (`paper` preset): every UNet weight, AdamW, 1e-5.

A plain loop rather than erase.train's: that loop has no hook between optimizer steps, and running it segment by
segment would either restart Adam's moments at each k (a different run from one uninterrupted one) or round-trip
the whole optimizer state through checkpoint files at every k; it also keeps fp32 master weights in the model
during its run, which a checkpoint's generation (fp16 VAE and text encoder) could not run on. Here the model keeps
its own dtype (half-precision weights train through fp32 master copies outside it), and every random draw comes from
the one `generator` given, in a fixed order, so the same generator seed gives the same weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import diffusion_loss, encode_latents, image_files, image_size, to_tensor
from .params import check_spec, select
from .text import PromptEncoder

OPTIMIZERS = ("adam", "adamw")
ImageSource = Sequence[Image.Image] | str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class Relearning:
    """How to relearn: `schedule` (strictly increasing step counts > 0, the checkpoints), `lr`, `batch_size` images
    per step (drawn at random with replacement), the UNet parameter set `params` (erase.params), the optimizer."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Meta-Unlearning's simulated relearning (src/meta.py: whole UNet, AdamW lr 1e-5, weight decay 1e-4, batch
        # 10 in scripts/esd_meta.sh); their grad clip and lr scheduler are left out (constant lr, no clipping).
        "paper": {"lr": 1e-5, "batch_size": 10, "params": "all", "optimizer": "adamw", "weight_decay": 1e-4},
        # Ours for the toy (1.5 M-parameter UNet), chosen on a tuning target only: Pop_Art erased by UCE's toy
        # preset, scripts/relearn_toy.py, schedule 5/10/25/50, seeds 188/288 (16 images a point), whole UNet, Adam,
        # batch 4. Target rate at k = 0/5/10/25/50, erased on Pop_Art | on unrelated | base on the unseen style:
        #   lr 1e-4: .06 .44 .25 .25 .81 | .06 .06 .06 .00 .12 | .00 .00 .00 .19 .31   <- chosen
        #   lr 3e-4: .06 .44 .44 .38 .75 | .06 .31 .00 .00 .12 | .00 .25 .38 .44 .19
        #   lr 1e-3: .06 .00 .06 .12 .50 | .06 .06 .00 .06 .06 | .00 .44 .44 .50 .44
        #   lr 3e-3: .06 .00 .00 .00 .00 | .06 .00 .00 .00 .00 | .00 .00 .25 .44 .44
        # 1e-4 separates the curves most: the erased style returns within 5 steps and to 0.81 by 50, unrelated
        # tuning leaves it gone, a new style takes 25+ steps; larger rates damage more than they teach.
        "toy": {"lr": 1e-4, "batch_size": 4, "params": "all", "optimizer": "adam"},
    }  # fmt: skip

    schedule: tuple[int, ...] = (5, 10, 25, 50)
    lr: float = 1e-5
    batch_size: int = 4
    params: str = "all"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    preset: str | None = None

    def __post_init__(self) -> None:
        schedule = self.schedule
        if isinstance(schedule, int | str) or not isinstance(schedule, Sequence) or not schedule:
            raise ValueError(f"schedule must be a non-empty list of step counts, got {schedule!r}")
        for k in schedule:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"schedule steps must be integers >= 1, got {k!r} in {list(schedule)!r}")
        if any(b <= a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"schedule must be strictly increasing (cumulative steps), got {list(schedule)!r}")
        object.__setattr__(self, "schedule", tuple(schedule))
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, int | float) or not (
            self.weight_decay >= 0
        ):  # fmt: skip
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        check_spec(self.params)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Relearning:
        """A preset's settings (`paper`, `toy`) with `overrides` on top."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown relearning preset {name!r}; accepted: {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], "preset": name, **overrides})

    @property
    def steps(self) -> int:
        return self.schedule[-1]

    def with_schedule(self, schedule: Sequence[int]) -> Relearning:
        return replace(self, schedule=tuple(schedule))


@dataclass
class RelearnOutcome:
    """The run's per-step losses, and `restore()`, which puts the trained tensors back as they were before it."""

    losses: list[float] = field(default_factory=list)
    trained_tensors: int = 0
    _snapshot: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the values from before the run back into the model (once: the snapshot is released)."""
        if not self._snapshot:
            raise ValueError("nothing to restore: restore() was called already (or the run trained nothing)")
        for name, value in self._snapshot.items():
            self._params[name].copy_(value)
        self._snapshot.clear()


def image_latents(pipe, images: ImageSource) -> torch.Tensor:
    """Scaled VAE latents (B, 4, h, w) of PIL images or image files, resized to the pipeline's size."""
    if isinstance(images, str | os.PathLike) or (images and not isinstance(images[0], Image.Image)):
        pictures = [Image.open(p).convert("RGB") for p in image_files(images)]
    else:
        pictures = list(images)
    if not pictures:
        raise ValueError("relearning needs at least one image, got none")
    return encode_latents(pipe.vae, to_tensor(pictures, image_size(pipe))).to(pipe.unet.device)


def relearn(
    pipe,
    images: ImageSource,
    prompts: str | Sequence[str],
    settings: Relearning,
    generator: torch.Generator,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: bool = True,
) -> RelearnOutcome:
    """Fine-tune `pipe.unet`'s `settings.params` in place for `settings.steps` steps on `images` with `prompts`
    (one for all, or one per image), calling `on_checkpoint(k)` after step k for each k of the schedule, with the
    UNet in eval mode under no_grad (generate and score there; leave the weights as they are).

    The caller restores the model: `outcome.restore()` writes back the trained tensors' values from before the run
    (a CPU snapshot of the parameter set, taken first). Should the run fail, it restores them itself and re-raises,
    so a failed run never leaves a half-trained model.
    """
    latents = image_latents(pipe, images)
    prompts = [prompts] * len(latents) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(latents) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"give one prompt for all images or one per image ({len(latents)}), got {len(prompts)}")
    emb = PromptEncoder.of(pipe)(prompts).to(pipe.unet.device, pipe.unet.dtype)
    unet, scheduler = pipe.unet, pipe.scheduler
    params = select(unet, settings.params)
    outcome = RelearnOutcome(trained_tensors=len(params), _params=params)
    outcome._snapshot = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    masters = {n: p if p.dtype == torch.float32 else p.detach().float().clone() for n, p in params.items()}
    was_training, grads = unet.training, {n: p.requires_grad for n, p in unet.named_parameters()}
    optimizer = (torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam)(
        list(masters.values()), lr=settings.lr, weight_decay=settings.weight_decay
    )
    checkpoints = set(settings.schedule)
    bar = tqdm(total=settings.steps, desc="relearn", disable=not progress)
    try:
        unet.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for step in range(1, settings.steps + 1):
            unet.train()
            pick = torch.randint(len(latents), (settings.batch_size,), generator=generator)
            loss = diffusion_loss(unet, scheduler, latents[pick.to(latents.device)], emb[pick.to(emb.device)],
                                  generator)  # fmt: skip
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite relearning loss {loss.item()} at step {step}")
            loss.backward()
            for name, p in params.items():
                if masters[name] is not p:  # half-precision weight: its fp32 master takes the gradient
                    masters[name].grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, p in params.items():
                    if masters[name] is not p:
                        p.copy_(masters[name])
            outcome.losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.losses[-1]:.4g}")
            if step in checkpoints and on_checkpoint is not None:
                unet.eval()
                with torch.no_grad():
                    on_checkpoint(step)
    except BaseException:
        outcome.restore()
        raise
    finally:
        bar.close()
        for name, p in unet.named_parameters():
            p.requires_grad_(grads[name])
        unet.train(was_training)
    return outcome
