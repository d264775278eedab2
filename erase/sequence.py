"""Erasure requests one after another on one pipeline: a chain of Deltas, each made on the state the ones before
it left, applied in that order and reverted in the reverse one.

A Delta made by request i records the fingerprint of the state before it (`base_fingerprint`, as every Delta
does) and, under `sequence`, the digests of the Deltas applied before it. `DeltaChain.apply` checks both: the
fingerprint cannot tell a runtime patch (a hook) apart from its absence, nor a Delta that changed nothing, so the
recorded predecessors are what proves the order. Reverting the last Delta restores the state before it bit for bit
(`Delta.revert` writes back the values `apply` replaced, cloned).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .delta import Delta, _parameter, fingerprint
from .methods import method_of
from .params import delta_name, select_in
from .runner import Result, run

SEQUENCE_KEY = "sequence"  # a chained Delta's metadata: {"position": i (1-based), "previous": [digests]}


class DeltaChain:
    """Deltas applied one on top of another to `pipe`, each checked against the state the earlier ones left."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._deltas: list[Delta] = []

    @property
    def deltas(self) -> tuple[Delta, ...]:
        return tuple(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def digests(self) -> list[str]:
        """The digests of the applied Deltas, first applied first: the identity of the chain's state."""
        return [d.digest() for d in self._deltas]

    def apply(self, delta: Delta, force: bool = False) -> None:
        """Apply `delta` on top of the chain. It must have been made on the chain's current state: its base
        fingerprint must match and the predecessors it records, if any, must be the applied ones (`force` skips
        both)."""
        position = len(self._deltas) + 1
        if any(d is delta for d in self._deltas) or delta.is_applied(self.pipe):
            raise ValueError(f"delta {delta.digest()} is already applied to this pipeline; a chain applies each "
                             "delta once (revert it first)")  # fmt: skip
        recorded = delta.metadata.get(SEQUENCE_KEY, {}).get("previous")
        if not force and recorded is not None and list(recorded) != self.digests():
            raise ValueError(f"delta {delta.digest()} was made after {len(recorded)} earlier deltas "
                             f"({', '.join(recorded) or 'none'}), but the chain holds {len(self._deltas)} "
                             f"({', '.join(self.digests()) or 'none'}); apply the deltas in the order they were "
                             "made")  # fmt: skip
        if not force:
            try:
                delta.check_base(self.pipe)
            except ValueError as err:
                raise ValueError(f"delta {position} of the chain ({delta.digest()}) was not made on the state the "
                                 f"{len(self._deltas)} deltas before it leave: {err}") from None  # fmt: skip
        delta.apply(self.pipe, force=True)
        self._deltas.append(delta)

    def revert(self, delta: Delta | None = None) -> Delta:
        """Revert the last applied Delta (naming it, if given, must name the last) and return it; the pipeline is
        then bit for bit as it was before that Delta."""
        if not self._deltas:
            raise ValueError("no delta is applied in this chain (nothing to revert)")
        if delta is not None and delta is not self._deltas[-1]:
            held = next((i for i, d in enumerate(self._deltas, 1) if d is delta), None)
            if held is None:
                raise ValueError(f"delta {delta.digest()} is not applied in this chain (nothing to revert)")
            raise ValueError(f"delta {delta.digest()} is number {held} of the {len(self._deltas)} applied; revert the "
                             "later ones first (a chain reverts in reverse order)")  # fmt: skip
        last = self._deltas.pop()
        last.revert(self.pipe)
        return last

    def revert_all(self) -> None:
        """Revert every Delta, last first: the pipeline is bit for bit as before the first."""
        while self._deltas:
            self.revert()

    def run(self, config, **run_kwargs: Any) -> Result:
        """Erase with `config` on the chain's current state (`erase.run`) and add the Delta to the chain, recording
        its predecessors in its metadata and record.

        `erase.run` edits the pipeline in place, so its Delta knows no replaced values to revert to; the declared
        parameters are copied first (the memory of the parameter set once more), the pipeline is put back from the
        copy and the Delta applied through the chain, which leaves the same bits and makes it revertible."""
        spec = method_of(config)
        before_fingerprint = fingerprint(self.pipe)
        names = {} if spec.patches_at_runtime else select_in(self.pipe, config.parameter_set())
        saved = {delta_name(n): p.detach().clone() for n, p in names.items()}  # erase.run may train: no no_grad
        result = run(self.pipe, config, **run_kwargs)
        delta = result.delta
        order = {"position": len(self._deltas) + 1, "previous": self.digests()}
        delta.metadata[SEQUENCE_KEY] = order
        result.record[SEQUENCE_KEY] = order
        if delta.is_applied(self.pipe):  # a runtime patch leaves erase.run attached
            delta.revert(self.pipe)
        else:
            with torch.no_grad():
                for name in delta.tensors:
                    _parameter(self.pipe, name).copy_(saved[name])
        if fingerprint(self.pipe) != before_fingerprint:
            raise RuntimeError(f"{spec.name} changed tensors outside its parameter set; the chain cannot undo it")
        self.apply(delta)
        return result


def apply_sequence(pipe, deltas: Iterable[Delta], force: bool = False) -> DeltaChain:
    """A chain of `deltas` applied to `pipe` in order (each checked against the state the ones before it left)."""
    chain = DeltaChain(pipe)
    for delta in deltas:
        chain.apply(delta, force=force)
    return chain
