"""Runtime patches: what an inference-time method (a hook) or an adapter method adds to a pipeline instead of
changing its weights.

A `Runtime` is data (a kind, tensors, JSON settings), so it is saved and loaded with the Delta that carries it;
attaching it is the kind's own function, registered by the method's module (`register`). Attached, it returns a
`Handle` whose `remove()` leaves the pipeline exactly as before. Anyone holding the base weights can skip a runtime
patch: it hides a concept at generation time, it does not remove it from the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Handle(Protocol):
    def remove(self) -> None: ...


@dataclass
class Runtime:
    """A patch of kind `kind` (a registered attach function), its tensors and its JSON-serialisable settings."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """What must be stored for it: its tensors' bytes and its settings' JSON (a hook has no tensors)."""
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return tensor_bytes + len(self.settings_json().encode())

    def settings_json(self) -> str:
        return json.dumps(self.settings, sort_keys=True)

    def update_digest(self, digest: Any) -> None:
        """Feed the kind, settings and tensors into a hashlib digest."""
        digest.update(f"runtime:{self.kind}:{self.settings_json()}".encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")

    def attach(self, pipe) -> Handle:
        """Install the patch on `pipe`; `handle.remove()` takes it off again."""
        if self.kind not in ATTACHERS:
            raise ValueError(f"unknown runtime patch kind {self.kind!r}; accepted: {', '.join(ATTACHERS) or 'none'}")
        return ATTACHERS[self.kind](pipe, self)


AttachFn = Callable[[Any, Runtime], Handle]
ATTACHERS: dict[str, AttachFn] = {}


def register(kind: str, attach: AttachFn) -> None:
    """Make `kind` attachable (called once by the method module that defines it)."""
    if kind in ATTACHERS and ATTACHERS[kind] is not attach:
        raise ValueError(f"runtime patch kind {kind!r} is already registered")
    ATTACHERS[kind] = attach
