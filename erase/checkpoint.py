"""Training checkpoints: the trained tensors, the optimizer state and the losses so far, tied to one run by its key.

A checkpoint is resumed only by the run it belongs to (the same key: method, config, base model, toolkit version;
see erase.runner.run_key), and never when that run stopped on a non-finite loss: resuming it would only fail again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir

STATE_FILE, PARAMS_FILE, OPTIMIZER_FILE = "state.json", "params.safetensors", "optimizer.pt"


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; the parameters (and checkpoint, if any) hold the last good state."""


@dataclass
class TrainState:
    """What a checkpoint says about its run: the losses of the finished steps and the training time they took."""

    losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    key: str | None = None
    failed: str | None = None  # why the run stopped, when it stopped on a non-finite loss


def save(
    accelerator, ckpt: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    """Trained tensors (safetensors), optimizer state and `state`, swapped in atomically as one folder."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(ckpt, replace=True) as tmp:
            save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, tmp / PARAMS_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({"step": len(state.losses), **asdict(state)}))
    accelerator.wait_for_everyone()


def load(
    ckpt: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, key: str | None
) -> TrainState | None:
    """Restore a checkpoint of this run into `params` and `optimizer`; None when there is none.

    Raises ValueError for a checkpoint of another run (another key or other parameters), NonFiniteLossError for
    one whose run diverged."""
    if not (ckpt / STATE_FILE).is_file():
        return None
    try:
        raw = json.loads((ckpt / STATE_FILE).read_text())
        state = TrainState(list(raw["losses"]), float(raw.get("elapsed_s", 0.0)), raw.get("key"), raw.get("failed"))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {ckpt} is unreadable ({err}); remove it to start afresh") from None
    if key is not None and state.key != key:
        raise ValueError(f"checkpoint {ckpt} belongs to another run (key {state.key}, this run {key}: another "
                         "method, config or base model); remove it, or checkpoint this run elsewhere")  # fmt: skip
    if state.failed:
        raise NonFiniteLossError(f"the run checkpointed in {ckpt} stopped on a non-finite loss ({state.failed}) with "
                                 "exactly these settings, so resuming would fail the same way; change them (e.g. a "
                                 f"lower lr) or remove {ckpt}")  # fmt: skip
    saved = load_file(ckpt / PARAMS_FILE)
    if set(saved) != set(params):
        raise ValueError(f"checkpoint {ckpt} trains other parameters than this run; remove it or change the run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return state
