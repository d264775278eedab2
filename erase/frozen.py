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
        params = dict(model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"not parameters of {type(model).__name__}: {unknown[:3]}")
        self.original = {n: params[n].detach().clone() for n in names}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original.values())

    @torch.no_grad()
    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """`model(*args, **kwargs)` as the original model would answer, without gradients."""
        model = _unwrap(model)
        # Cast to the live dtype/device so a model moved after the snapshot still works.
        live = dict(model.named_parameters())
        values = {n: t.to(device=live[n].device, dtype=live[n].dtype) for n, t in self.original.items()}
        return torch.func.functional_call(model, values, args, kwargs, strict=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/compile wrappers, whose parameter names we recorded."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
