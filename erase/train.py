"""The one training loop every fine-tuning method shares.

A method supplies the parameters to train and a loss function; this loop owns everything else: accelerate (one
process or many), mixed precision, gradient accumulation and checkpointing, the optimizer, resumable checkpoints,
the non-finite-loss guard and the progress bar. Randomness is per sample, seeded by (seed, step, sample index), so
a resumed run and a run split over several processes draw exactly the same samples as one uninterrupted process.
A loss function that keeps state along the run (ESD's trajectory pool) gives a `resume(samples)` attribute: a resumed
run calls it with the number of samples this process drew in the finished steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .checkpoint import NonFiniteLossError, TrainState
from .frozen import unwrap
from .processes import process_state
from .sampling import sample_seed

# loss_fn(model, generators) -> mean loss over the samples, one torch.Generator per sample of this micro-batch.
LossFn = Callable[[nn.Module, list[torch.Generator]], torch.Tensor]
# grad_transform(params, step): changes the trained parameters' `.grad` in place before the optimizer step.
GradTransform = Callable[[dict[str, nn.Parameter], int], None]

OPTIMIZERS = ("adam", "adamw", "adam8bit")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainSettings:
    """The loop's knobs, declared once: every fine-tuning method's config inherits them (erase.config)."""

    steps: int = 1000
    lr: float = 1e-5
    seed: int = 0
    batch_size: int = 1  # samples per optimizer step, over all processes and accumulation micro-steps
    grad_accum: int = 1
    optimizer: str = "adam"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # 0: only on a non-finite loss

    def __post_init__(self) -> None:
        _check_int(self, "steps", 0)
        _check_int(self, "batch_size", 1)
        _check_int(self, "grad_accum", 1)
        _check_int(self, "checkpoint_every", 0)
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(settings: TrainSettings, name: str, minimum: int) -> None:
    value = getattr(settings, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class TrainOutcome:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from step 0 (resumed ones included)
    resumed_from: int = 0
    previous_s: float = 0.0  # training time of the segments before this one (a resumed run)


def make_accelerator(settings: TrainSettings, device: torch.device, local: bool = False):
    """An Accelerator for this run; under `accelerate launch` it joins the launched process group.

    `local=True` trains in this process alone even inside a launched group (a benchmark running one job per
    process), with the same mixed precision and accumulation behaviour.
    """
    if local:
        return LocalAccelerator(settings, device)
    if process_state().num_processes == 1:
        # One process may run many erasures with different precisions; accelerate keeps a process-wide state.
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.grad_accum,
        cpu=device.type == "cpu",
        # Methods may train tensors a given loss does not reach (e.g. to_v under an attention-map loss).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class LocalAccelerator:
    """The part of accelerate's interface the loop uses, for one process that must not join a process group."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, settings: TrainSettings, device: torch.device):
        self.device = device
        self.grad_accum = settings.grad_accum
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision)
        self.sync_gradients = True
        self._micro = 0

    def prepare(self, *objects):
        return objects[0] if len(objects) == 1 else objects  # as accelerate's

    @contextmanager
    def accumulate(self, model):
        self._micro += 1
        self.sync_gradients = self._micro % self.grad_accum == 0
        yield

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        pass


def _optimizer(settings: TrainSettings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "adam8bit":
        try:
            bnb = importlib.import_module("bitsandbytes")  # optional: only this optimizer needs it
        except ImportError:
            raise ValueError("optimizer 'adam8bit' needs bitsandbytes: pip install 'erasekit[gpu]'") from None
        return bnb.optim.Adam8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=settings.lr, weight_decay=settings.weight_decay)


def enable_memory_efficient_attention(model: nn.Module) -> bool:
    """xformers on CUDA when installed (diffusers already defaults to SDPA); returns whether it was enabled.

    Methods that need attention probabilities install their own processors on the layers they read
    (erase.attention), which take precedence inside their block."""
    device = next(model.parameters()).device
    if device.type != "cuda" or not hasattr(model, "enable_xformers_memory_efficient_attention"):
        return False
    if importlib.util.find_spec("xformers") is None:  # optional
        return False
    model.enable_xformers_memory_efficient_attention()
    return True


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    loss_fn: LossFn,
    settings: TrainSettings,
    *,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
    local: bool = False,
    progress: bool = True,
    grad_masks: dict[str, torch.Tensor] | None = None,
    checkpoint_key: str | None = None,
    grad_transform: GradTransform | None = None,
) -> TrainOutcome:
    """Train `params` of `model` in place to minimise `loss_fn` (keys name them for checkpoints; tensors of another
    module, such as the text encoder's, may be among them: their gradients are averaged across processes as DDP
    averages the model's).

    The trained tensors are fp32 master weights during the loop (optimizers need them; a half-precision model's
    tensors are cast back on exit; without `mixed_precision` such a model runs under autocast to its own dtype).
    `grad_masks` (name -> 0/1 tensor) trains only the masked entries: every gradient is multiplied by its mask.
    `grad_transform(params, step)`, for a method whose update needs the whole gradient at once (a projection, not a
    per-tensor hook), runs once per optimizer step on the complete gradient: accumulated, synchronised across
    processes (so every process changes it alike), masked; before clipping (a positive rescaling, which keeps the
    directions a projection guarantees) and the step. Under fp16 with accelerate it sees the loss-scaled gradient.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps, on Ctrl-C (one process) and on a
    non-finite loss (marked failed, so it is never resumed); a checkpoint there is resumed only when it carries
    `checkpoint_key` (erase.checkpoint).
    """
    device = next(model.parameters()).device
    accelerator = accelerator or make_accelerator(settings, device, local)
    share = settings.batch_size // (accelerator.num_processes * settings.grad_accum)
    if share * accelerator.num_processes * settings.grad_accum != settings.batch_size:
        raise ValueError(
            f"batch_size {settings.batch_size} is not divisible by processes x grad_accum "
            f"({accelerator.num_processes} x {settings.grad_accum})"
        )
    model.requires_grad_(False)
    inside = {id(p) for p in model.parameters()}
    outside = [p for p in params.values() if id(p) not in inside]  # e.g. text-encoder tensors: DDP syncs none of them
    stored_dtypes = {n: p.dtype for n, p in params.items()}
    half = next((d for d in stored_dtypes.values() if d in (torch.float16, torch.bfloat16)), None)
    precision = accelerator.autocast if settings.mixed_precision != "no" or half is None else (
        lambda: torch.autocast(device.type, dtype=half))  # fmt: skip
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    hooks = [params[n].register_hook(lambda grad, m=mask: grad * m) for n, mask in (grad_masks or {}).items()]
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    processors = dict(model.attn_processors) if hasattr(model, "attn_processors") else None
    enable_memory_efficient_attention(model)
    optimizer = _optimizer(settings, list(params.values()))
    if len(outside) < len(params):
        prepared, optimizer = accelerator.prepare(model, optimizer)
    else:  # none of the model's own tensors train (text-encoder ones only): a DDP wrapper would have nothing to sync
        prepared, optimizer = model, accelerator.prepare(optimizer)

    outcome = TrainOutcome()
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    resumed = checkpoint.load(ckpt, params, optimizer, checkpoint_key) if ckpt is not None else None
    previous_s = 0.0
    if resumed is not None:
        outcome.losses, previous_s = resumed.losses, resumed.elapsed_s
        outcome.resumed_from = len(outcome.losses)
        if outcome.resumed_from > settings.steps:
            raise ValueError(f"checkpoint in {ckpt} is at step {outcome.resumed_from}, past steps={settings.steps}")
        if hasattr(loss_fn, "resume"):  # a loss with state along the run (e.g. a sample pool) skips what was drawn
            loss_fn.resume(outcome.resumed_from * share * settings.grad_accum)
    started = time.perf_counter()

    def keep(failed: str | None = None) -> None:
        state = TrainState(outcome.losses, previous_s + time.perf_counter() - started, checkpoint_key, failed)
        checkpoint.save(accelerator, ckpt, params, optimizer, state)

    bar = tqdm(
        total=settings.steps, initial=outcome.resumed_from, desc="erase",
        disable=not (progress and accelerator.is_main_process),
    )  # fmt: skip
    rank, world = accelerator.process_index, accelerator.num_processes
    step, stepped = outcome.resumed_from, -1  # the step being run, and the last one whose optimizer step was taken
    try:
        for step in range(outcome.resumed_from, settings.steps):
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(settings.grad_accum):
                first = (micro * world + rank) * share
                generators = [
                    torch.Generator().manual_seed(sample_seed(settings.seed, step, i))
                    for i in range(first, first + share)
                ]
                with accelerator.accumulate(prepared):
                    with precision():
                        loss = loss_fn(prepared, generators)
                    if not _all_finite(accelerator, loss):
                        failed = f"non-finite loss {loss.item()} at step {step}"
                        if ckpt is not None:
                            keep(failed)
                        raise NonFiniteLossError(
                            f"{failed}; parameters hold the state after step {step - 1}"
                            + (f", kept in {ckpt} (marked failed: it is never resumed)" if ckpt else "")
                        )
                    accelerator.backward(loss)
                    step_loss += loss.detach().float() / settings.grad_accum
                    if outside and world > 1 and accelerator.sync_gradients:
                        _average_gradients(accelerator, outside)
                    if grad_transform is not None and accelerator.sync_gradients:
                        grad_transform(params, step)
                    if settings.max_grad_norm and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
                    if accelerator.sync_gradients:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        stepped = step
            outcome.losses.append(accelerator.reduce(step_loss, reduction="mean").item())
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.losses[-1]:.4g}")
            if ckpt is not None and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
                keep()
    except KeyboardInterrupt:
        if ckpt is not None and world == 1:  # keep the finished steps; the rerun resumes after them
            if stepped == step and len(outcome.losses) == step:  # stopped between the optimizer step and its loss
                outcome.losses.append(step_loss.item())
            keep()
        raise
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        for n, p in params.items():
            p.requires_grad_(False)
            p.data = p.data.to(stored_dtypes[n])
        if settings.gradient_checkpointing:
            unwrap(prepared).disable_gradient_checkpointing()
        if processors is not None:
            model.set_attn_processor(processors)
        model.eval()
    outcome.previous_s = previous_s
    return outcome


def _average_gradients(accelerator, params: list[nn.Parameter]) -> None:
    """Average across processes the gradients of trained tensors outside the wrapped model, as DDP does inside it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).all().float().reshape(1)
    if accelerator.num_processes > 1:  # every process must stop together or the others hang in all-reduce
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)
