"""Predictions of the original model without a second UNet in memory.

Only the tensors a method trains can differ from the original, so we keep a copy of just those and run the same
module with them substituted (`torch.func.functional_call`). The trained Parameters are never mutated, so autograd
graphs built on them stay valid, and memory grows by the size of the trained set, not by a whole UNet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FrozenOriginal:
    """The original values of a model's trainable tensors, and calls of the model with them in place."""

    def __init__(self, model: nn.Module, names: list[str] | tuple[str, ...]):
        params = dict(unwrap(model).named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"not parameters of {type(model).__name__}: {unknown[:3]}")
        self._live = {n: params[n] for n in names}  # the Parameter objects, whose dtype/device may change later
        self.original = {n: params[n].detach().clone() for n in names}
        self._cast: dict[str, torch.Tensor] = {}
        self._cast_key: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original.values())

    def _values(self) -> dict[str, torch.Tensor]:
        """The originals in the live parameters' dtype and device (re-cast only when those change)."""
        key = tuple((p.dtype, p.device) for p in self._live.values())
        if key != self._cast_key:
            self._cast = {n: t.to(device=p.device, dtype=p.dtype) for (n, t), p in zip(self.original.items(),
                          self._live.values())}  # fmt: skip
            self._cast_key = key
        return self._cast

    @torch.no_grad()
    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """`model(*args, **kwargs)` as the original model would answer, without gradients."""
        # tie_weights=False: no UNet or text-encoder weight is tied, and looking for ties walks every tensor per call
        return torch.func.functional_call(unwrap(model), self._values(), args, kwargs, strict=False, tie_weights=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/compile wrappers, whose parameter names we recorded."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
