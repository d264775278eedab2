"""Delta: exactly the tensors an erasure changed, plus what is needed to trust and re-apply them.

Tensor names carry their component (`unet.down_blocks...`, `text_encoder....`), so one file serves every method.
Saved as `delta.safetensors` (the tensors) and `delta.json` (method, config, versions, base fingerprint). An
inference-time or adapter method changes no weight: its Delta carries a `Runtime` patch instead (erase.runtime),
whose tensors are stored in the same file under `runtime.` and whose kind and settings under "runtime" in the JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir, atomic_write, write_json
from .conditioning import architecture
from .runtime import Handle, Runtime

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ARCHITECTURES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
TENSORS_FILE, META_FILE = "delta.safetensors", "delta.json"
RUNTIME_PREFIX = "runtime."


def fingerprint(pipe, components: tuple[str, ...] = COMPONENTS) -> str:
    """A cheap identity of a base model: names, shapes and a strided sample of every parameter's values.

    Values are compared in float16, so the same weights loaded in fp32 or fp16 give the same fingerprint
    (bf16 rounds differently and does not).
    """
    digest = hashlib.sha256()
    for component in components:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, p in sorted(module.named_parameters()):
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // 64)
            sample = flat[::stride][:64].to(device="cpu", dtype=torch.float16)
            digest.update(f"{component}.{name}:{tuple(p.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def component_fingerprints(pipe) -> dict[str, str]:
    """The fingerprint of each component on its own: a Delta that changes only the text encoder fits every
    pipeline with the same text encoder, whatever its UNet."""
    return {c: fingerprint(pipe, (c,)) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def _parameter(pipe, full_name: str) -> nn.Parameter:
    component, _, name = full_name.partition(".")
    module = getattr(pipe, component, None) if component in COMPONENTS else None
    params = dict(module.named_parameters()) if module is not None else {}
    if name not in params:
        raise ValueError(f"delta tensor {full_name!r} has no matching parameter in this pipeline")
    return params[name]


@dataclass
class Delta:
    """New values of the changed tensors, keyed `<component>.<parameter name>`, with metadata, and the runtime
    patch of an inference-time or adapter method (None for the others)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    runtime: Runtime | None = None
    _originals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    _handles: dict[int, Handle] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_changes(
        cls,
        before: dict[str, torch.Tensor],
        after: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        runtime: Runtime | None = None,
    ) -> Delta:
        """Keep exactly the tensors whose values differ (bitwise) between `before` and `after`."""
        changed = {n: after[n].detach().cpu().clone() for n in after if not torch.equal(before[n], after[n])}
        return cls(changed, metadata, runtime)

    def digest(self) -> str:
        """A hash of the tensors' names, shapes, dtypes and bytes: what a delta changes, exactly."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        if self.runtime is not None:
            self.runtime.update_digest(h)
        return h.hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        """Storage of the tensors and of the runtime patch, the UnlearnCanvas storage figure (the rest of the JSON
        metadata aside)."""
        runtime = self.runtime.nbytes if self.runtime is not None else 0
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + runtime

    def save(self, directory: str | Path) -> Path:
        """Write delta.safetensors and delta.json into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = dict(self.tensors)
        metadata = dict(self.metadata)
        if self.runtime is not None:
            tensors.update({RUNTIME_PREFIX + k: v for k, v in self.runtime.tensors.items()})
            metadata["runtime"] = {"kind": self.runtime.kind, "settings": self.runtime.settings}
        atomic_write(directory / TENSORS_FILE, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))
        write_json(directory / META_FILE, metadata)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Delta:
        directory = Path(directory)
        tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(f"no {path.name} in {directory} (a delta folder holds {TENSORS_FILE} and "
                                        f"{META_FILE})")  # fmt: skip
        try:
            tensors = load_file(tensors_path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{tensors_path} is not a readable safetensors file: {err}") from None
        try:
            metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"{meta_path} must hold a JSON object (method, config, base_fingerprint, ...), "
                             f"got a {type(metadata).__name__}")  # fmt: skip
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise ValueError(f"{tensors_path}: tensor {name!r} is {tensor.dtype}, not a float weight")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{tensors_path}: tensor {name!r} holds NaN or infinite values")
        return cls(*_split_runtime(tensors, metadata, meta_path))

    def check_base(self, pipe) -> None:
        """Refuse a pipeline other than the delta's base, and a delta that does not say what its base was. A delta
        of weights only that records its components' fingerprints needs only the components it changes to match
        (an erased text encoder plugs into another pipeline with the same text encoder); else the whole base."""
        expected = self.metadata.get("base_fingerprint")
        force = "or force it (force=True; `erase apply --force`)"
        if not isinstance(expected, str) or not expected:
            raise ValueError(f"this delta does not record its base model (no base_fingerprint in its metadata), so it "
                             f"cannot be checked against this pipeline; {force}")  # fmt: skip
        recorded = self.metadata.get("component_fingerprints")
        touched = {name.partition(".")[0] for name in self.tensors}
        if self.runtime is None and isinstance(recorded, dict) and touched and touched <= set(recorded):
            actual = component_fingerprints(pipe)
            wrong = sorted(c for c in touched if recorded[c] != actual.get(c))
            if wrong:
                c = wrong[0]
                raise ValueError(f"this delta changes the {', '.join(sorted(touched))}, made on base model {expected} "
                                 f"whose {c} is {recorded[c]}, but the pipeline's {c} is {actual.get(c)}; apply it "
                                 f"to a model with the same {c}, {force}")  # fmt: skip
            return
        actual = fingerprint(pipe)
        if expected != actual:
            raise ValueError(f"this delta was made on base model {expected}, but the pipeline is {actual}; apply it "
                             f"to the model it was made from, {force}")  # fmt: skip

    @torch.no_grad()
    def apply(self, pipe, force: bool = False) -> None:
        """Write the delta's values into `pipe` (keeping the replaced ones for `revert`)."""
        made_on, here = self.metadata.get("architecture"), architecture(pipe)
        if made_on is not None and made_on != here:  # even forced: the tensors would not fit
            raise ValueError(f"this delta was made on an {ARCHITECTURES.get(made_on, made_on)} model and cannot be "
                             f"applied to an {ARCHITECTURES[here]} pipeline")  # fmt: skip
        if not force:
            self.check_base(pipe)
        targets = {name: _parameter(pipe, name) for name in self.tensors}
        for name, p in targets.items():
            if p.shape != self.tensors[name].shape:
                raise ValueError(f"delta tensor {name!r} has shape {tuple(self.tensors[name].shape)}, "
                                 f"the pipeline's {tuple(p.shape)}")  # fmt: skip
        if self.runtime is not None and id(pipe) in self._handles:
            raise ValueError("this delta's runtime patch is already attached to this pipeline; revert it first")
        self._originals.setdefault(id(pipe), {n: p.detach().clone() for n, p in targets.items()})
        for name, p in targets.items():
            p.copy_(self.tensors[name].to(device=p.device, dtype=p.dtype))
        if self.runtime is not None:
            self._handles[id(pipe)] = self.runtime.attach(pipe)

    def is_applied(self, pipe) -> bool:
        """Whether `apply` wrote this delta into `pipe` and `revert` has not undone it yet."""
        return id(pipe) in self._originals

    @torch.no_grad()
    def revert(self, pipe) -> None:
        """Restore the values `apply` replaced on this pipeline."""
        originals = self._originals.pop(id(pipe), None)
        if originals is None:
            raise ValueError("this delta was not applied to this pipeline (nothing to revert)")
        handle = self._handles.pop(id(pipe), None)
        if handle is not None:
            handle.remove()
        for name, value in originals.items():
            _parameter(pipe, name).copy_(value)

    @contextmanager
    def applied(self, pipe, force: bool = False) -> Iterator[Any]:
        """`with delta.applied(pipe):` the pipeline is the erased model inside the block and the base model again
        after it, an exception included; `answers.generate(..., apply=delta.applied)` takes it as it is."""
        self.apply(pipe, force=force)
        try:
            yield pipe
        finally:
            self.revert(pipe)

    def export(self, pipe, directory: str | Path, force: bool = False) -> Path:
        """Apply onto `pipe` and save the complete diffusers pipeline into `directory` (written beside, then
        renamed into place, so a crash leaves no half-written pipeline)."""
        directory = Path(directory)
        if self.runtime is not None:
            raise ValueError(f"this delta is a runtime patch ({self.runtime.kind}), not weights: a diffusers "
                             "folder cannot carry it; apply the delta to the base model instead")  # fmt: skip
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise FileExistsError(f"{directory} exists and is not an empty folder; choose a new output folder")
        self.apply(pipe, force=force)
        try:
            with atomic_dir(directory) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            self.revert(pipe)
        return directory


def _split_runtime(
    tensors: dict[str, torch.Tensor], metadata: dict[str, Any], meta_path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Runtime | None]:
    """Weights, metadata and the runtime patch of a loaded delta (the `runtime.` tensors and JSON entry)."""
    described = metadata.pop("runtime", None)
    runtime_tensors = {k[len(RUNTIME_PREFIX) :]: v for k, v in tensors.items() if k.startswith(RUNTIME_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(RUNTIME_PREFIX)}
    if described is None:
        if runtime_tensors:
            raise ValueError(f"{meta_path} describes no runtime patch, but the delta holds runtime tensors")
        return weights, metadata, None
    if (
        not isinstance(described, dict)
        or not isinstance(described.get("kind"), str)
        or not isinstance(described.get("settings", {}), dict)
    ):
        raise ValueError(f"{meta_path}: 'runtime' must be an object with a text 'kind' and an object 'settings', "
                         f"got {described!r}")  # fmt: skip
    return weights, metadata, Runtime(described["kind"], runtime_tensors, described.get("settings", {}))
