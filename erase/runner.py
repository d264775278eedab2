"""`erase.run(pipe, config) -> Result`: snapshot the declared parameters, run the method, keep what changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from ._version import __version__
from .conditioning import architecture
from .context import RunContext
from .delta import Delta, component_fingerprints, fingerprint
from .frozen import FrozenOriginal
from .images import prediction_type
from .meter import Meter
from .methods import method_of
from .params import delta_name, select_in, text_component
from .text import PromptEncoder
from .train import TrainOutcome


@dataclass
class Result:
    delta: Delta
    record: dict[str, Any]


def versions() -> dict[str, str]:
    return {
        "erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }  # fmt: skip


# Config fields that do not shape the result: runs differing only in them are the same run.
NOT_IN_KEY = ("checkpoint_every",)


def run_key(config, base_fingerprint: str) -> str:
    """The identity of a run: its method, every config value that shapes the result, the base model and the
    toolkit version. A checkpoint or cached result is reused only by a run with the same key."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_KEY}
    payload = {"method": method_of(config).name, "config": values, "base": base_fingerprint, "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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

    With `checkpoint_dir`, training checkpoints there (see erase.train for when) and a rerun of the same run
    (the same `run_key`) resumes; a checkpoint of another run there is refused. `local=True` trains in this process
    alone even under `accelerate launch` (one job per process). The record's `wall_time_s` counts every segment.
    """
    spec = method_of(config)
    prediction_type(pipe.scheduler)  # an unknown prediction type is refused here, not deep inside a training loop
    unet = pipe.unet
    # A runtime patch trains no base weight: its parameter set (if any) says where the patch goes, not what moves.
    params = {} if spec.patches_at_runtime else select_in(pipe, config.parameter_set())
    text_names: dict[str, list[str]] = {}  # text encoder -> its trained tensors' names in it
    for name in params:
        if component := text_component(name):
            text_names.setdefault(component, []).append(name.removeprefix(f"{component}."))
    if outside := [c for c in text_names if c not in spec.components]:
        raise ValueError(f"parameter set {config.parameter_set()!r} names {outside[0]} tensors, but {spec.name} "
                         f"edits only its components ({', '.join(spec.components)})")  # fmt: skip
    base_fingerprint, base_components = fingerprint(pipe), component_fingerprints(pipe)
    frozen = FrozenOriginal(unet, [n for n in params if not text_component(n)])
    ctx = RunContext(
        pipe, config, params, frozen, PromptEncoder.of(pipe, strict=True),
        Path(checkpoint_dir) if checkpoint_dir else None, accelerator, progress, local,
        run_key=run_key(config, base_fingerprint),
        frozen_text={c: FrozenOriginal(getattr(pipe, c), names) for c, names in text_names.items()},
    )  # fmt: skip
    outcome = TrainOutcome()
    runtime = None
    with Meter(unet.device) as meter:
        if spec.kind == "fine-tune":
            outcome = ctx.train(spec.make_loss(ctx))
        elif spec.kind == "closed-form":
            spec.edit(ctx)
            outcome = ctx.last_outcome or outcome  # one that trains a stage (MACE's LoRAs) through ctx.train
        else:
            runtime = spec.build(ctx)
            outcome = ctx.last_outcome or outcome  # an adapter trains through ctx.train
    before = {f"unet.{n}": t for n, t in frozen.original.items()}
    for component, original in ctx.frozen_text.items():
        before.update({f"{component}.{n}": t for n, t in original.original.items()})
    after = {delta_name(n): p.detach() for n, p in params.items()}
    config_dict = dataclasses.asdict(config)
    metadata = {"findings": ctx.findings} if ctx.findings else {}
    metadata |= {
        "method": spec.name, "config": config_dict, "versions": versions(), "base_fingerprint": base_fingerprint,
        "component_fingerprints": base_components, "parameter_set": config.parameter_set(),
        "architecture": architecture(pipe),
    }  # fmt: skip
    delta = Delta.from_changes(before, after, metadata, runtime)
    if runtime is not None:
        if fingerprint(pipe) != base_fingerprint:
            raise RuntimeError(f"{spec.name} is a runtime patch but changed the base model's weights")
        delta.apply(pipe)  # the pipeline leaves carrying the erasure, as after every other method
    record = {
        **metadata,
        "wall_time_s": meter.wall_time_s + outcome.previous_s,
        "peak_memory_bytes": meter.peak_memory_bytes,
        "memory_kind": meter.memory_kind,
        "storage_bytes": delta.nbytes,
        "losses": outcome.losses,
        "resumed_from_step": outcome.resumed_from,
        "run_key": ctx.run_key,
        "trained_tensors": len(params),
        "changed_tensors": len(delta.tensors),
        "device": str(unet.device),
        "dtype": str(unet.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }
    return Result(delta, record)
