"""Low-rank adapters added to chosen Linear / Conv2d modules of a host model through forward hooks.

While attached, each wrapped module m answers `m(x) + multiplier · (alpha / rank) · up(down(x))`: the host's own
weights never change, and `detach()` removes every hook, so the host is exactly as before. `multiplier` is one
number, or one value per batch row (a gate that depends on each sample's prompt). The adapter is an `nn.Module`
itself, so it can be made a submodule of the host while it trains (optimizers, DDP and checkpoints then see its
parameters by their names in the host) and taken out again afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class LowRank(nn.Module):
    """`up(down(x))` for one wrapped module: `down` (rank, in[, kh, kw]) reads like the module (a convolution keeps
    its kernel, stride and padding), `up` (out, rank[, 1, 1]) maps back to its outputs."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Parameter(torch.empty(rank, base.in_features))
            self.up = nn.Parameter(torch.zeros(base.out_features, rank))
            self.conv: dict | None = None
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(
                    f"a low-rank adapter wraps plain convolutions, not groups={base.groups}, "
                    f"padding_mode={base.padding_mode!r}"
                )
            self.down = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size))
            self.up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))
            self.conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        else:
            raise ValueError(f"a low-rank adapter wraps Linear or Conv2d modules, not {type(base).__name__}")

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """The usual LoRA start: `down` as PyTorch initialises a layer (uniform in ±1/sqrt(fan_in), i.e.
        kaiming_uniform with a=sqrt(5)), `up` zero, so the adapter starts as the identity."""
        fan_in = self.down[0].numel()
        bound = 1 / math.sqrt(fan_in)
        values = torch.rand(self.down.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.down.copy_(values)
        self.up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)  # no-ops when they match
        if self.conv is None:
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, None, **self.conv), up)


class LowRankAdapter(nn.Module):
    """Rank-`rank` additions to the modules `names` of `host` (see the module docstring); `attach()` installs them."""

    def __init__(self, host: nn.Module, names: Sequence[str], rank: int, alpha: float):
        super().__init__()
        modules = dict(host.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module {missing[0]!r} in {type(host).__name__} to attach an adapter to")
        if not names:
            raise ValueError(f"no module of {type(host).__name__} selected for the adapter")
        self.names = tuple(names)
        self.layers = nn.ModuleList(LowRank(modules[n], rank) for n in self.names)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.multiplier: float | torch.Tensor = 1.0
        self.enabled = True
        self._targets = [modules[n] for n in self.names]  # a plain list: not registered as submodules
        self._hooks: list = []

    @classmethod
    def from_tensors(cls, host: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float) -> LowRankAdapter:
        """The adapter whose `tensors()` were `tensors` (`<module>.down`, `<module>.up`), on the host's device."""
        names = [k[: -len(".down")] for k in tensors if k.endswith(".down")]
        if not names or set(tensors) != {f"{n}.{part}" for n in names for part in ("down", "up")}:
            raise ValueError("adapter tensors must come in pairs <module>.down / <module>.up")
        adapter = cls(host, names, rank=int(tensors[f"{names[0]}.down"].shape[0]), alpha=alpha)
        reference = next(host.parameters())
        adapter.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for name, layer in zip(adapter.names, adapter.layers):
                for part in ("down", "up"):
                    value, param = tensors[f"{name}.{part}"], getattr(layer, part)
                    if value.shape != param.shape:
                        raise ValueError(
                            f"adapter tensor {name}.{part} has shape {tuple(value.shape)}; the module "
                            f"needs {tuple(param.shape)}"
                        )
                    param.copy_(value)
        return adapter.requires_grad_(False)

    def reset(self, generator: torch.Generator) -> None:
        for layer in self.layers:
            layer.reset(generator)

    def tensors(self) -> dict[str, torch.Tensor]:
        """`<module>.down` and `<module>.up` of every wrapped module, detached copies on the CPU."""
        return {
            f"{name}.{part}": getattr(layer, part).detach().cpu().clone()
            for name, layer in zip(self.names, self.layers)
            for part in ("down", "up")
        }

    def attach(self) -> None:
        if self._hooks:
            raise RuntimeError("the adapter is already attached")
        self._hooks = [m.register_forward_hook(self._hook(layer)) for m, layer in zip(self._targets, self.layers)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The host answers as without the adapter inside the block (the original model, for frozen targets)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def _hook(self, layer: LowRank):
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            extra = layer(args[0])
            multiplier = self.multiplier
            if isinstance(multiplier, torch.Tensor):
                if multiplier.shape != (extra.shape[0],):
                    raise RuntimeError(
                        f"the adapter has {tuple(multiplier.shape)} row multipliers for a batch of "
                        f"{extra.shape[0]} rows"
                    )
                multiplier = multiplier.to(extra.dtype).view(-1, *([1] * (extra.ndim - 1)))
            return output + extra * (multiplier * self.scale)

        return add


def wrappable(host: nn.Module, container: str, weights: Sequence[str] | None = None) -> list[str]:
    """Names of the Linear and Conv2d modules inside every module of class `container` (e.g. Transformer2DModel),
    in model order; with `weights` (parameter names), only the modules whose `.weight` is among them."""
    chosen = set(weights) if weights is not None else None
    names: list[str] = []
    for prefix, module in host.named_modules():
        if type(module).__name__ != container:
            continue
        for child, sub in module.named_modules():
            name = f"{prefix}.{child}" if prefix else child
            if isinstance(sub, nn.Linear | nn.Conv2d) and (chosen is None or f"{name}.weight" in chosen):
                names.append(name)
    return list(dict.fromkeys(names))
