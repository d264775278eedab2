"""`erase.run(pipe, config) -> Result`: snapshot the declared parameters, run the method, keep what changed."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from ._version import __version__
from .context import RunContext
from .delta import Delta, fingerprint
from .frozen import FrozenOriginal
from .meter import Meter
from .methods import method_of
from .params import select
from .text import PromptEncoder


@dataclass
class Result:
    delta: Delta
    record: dict[str, Any]


def versions() -> dict[str, str]:
    return {
        "erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }  # fmt: skip


def run(
    pipe,
    config,
    *,
    checkpoint_dir: str | Path | None = None,
    accelerator=None,
    progress: bool = True,
    local: bool = False,
) -> Result:
    """Erase with `config`'s method on `pipe` (modified in place) and return the Delta and the run record.

    With `checkpoint_dir`, training checkpoints there and a rerun with the same arguments resumes. `local=True`
    trains in this process alone even under `accelerate launch` (one job per process).
    """
    spec = method_of(config)
    unet = pipe.unet
    params = select(unet, config.parameter_set())
    base_fingerprint = fingerprint(pipe)
    frozen = FrozenOriginal(unet, list(params))
    ctx = RunContext(
        pipe, config, params, frozen, PromptEncoder(pipe.tokenizer, pipe.text_encoder, strict=True),
        Path(checkpoint_dir) if checkpoint_dir else None, accelerator, progress, local,
    )  # fmt: skip
    with Meter(unet.device) as meter:
        if spec.kind == "fine-tune":
            losses = ctx.train(spec.make_loss(ctx))
        else:
            spec.edit(ctx)
            losses = []
    before = {f"unet.{n}": t for n, t in frozen.original.items()}
    after = {f"unet.{n}": p.detach() for n, p in params.items()}
    config_dict = dataclasses.asdict(config)
    metadata = {
        "method": spec.name, "config": config_dict, "versions": versions(), "base_fingerprint": base_fingerprint,
        "parameter_set": config.parameter_set(),
    }  # fmt: skip
    delta = Delta.from_changes(before, after, metadata)
    record = {
        **metadata,
        "wall_time_s": meter.wall_time_s,
        "peak_memory_bytes": meter.peak_memory_bytes,
        "memory_kind": meter.memory_kind,
        "storage_bytes": delta.nbytes,
        "losses": losses,
        "trained_tensors": len(params),
        "changed_tensors": len(delta.tensors),
        "device": str(unet.device),
        "dtype": str(unet.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }
    return Result(delta, record)
