"""Named parameter sets over a UNet: the one definition of "which weights a method trains" for every method."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

NAMED_SETS = {
    "kv": "cross-attention keys and values (attn2.to_k, attn2.to_v)",
    "xattn": "every cross-attention module (attn2.*)",
    "noxattn": "everything except cross-attention",
    "all": "every parameter",
}


def _in_named_set(name: str, set_name: str) -> bool:
    if set_name == "kv":
        return ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}"
    if set_name == "xattn":
        return ".attn2." in f".{name}"
    if set_name == "noxattn":
        return ".attn2." not in f".{name}"
    return True  # "all"


def select(model: nn.Module, spec: str | Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters of `model` named by `spec`: one of the named sets, or glob patterns over parameter names
    (a list, or one comma-separated string), e.g. `"*attn2.to_k.*,*attn2.to_v.*"`.

    Raises ValueError when the spec is empty or matches nothing, so a typo never trains zero weights.
    """
    patterns = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not patterns:
        raise ValueError(f"empty parameter set {spec!r}; accepted: {', '.join(NAMED_SETS)} or glob patterns")
    selected: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        matched = {
            name: p
            for name, p in model.named_parameters()
            if (_in_named_set(name, pattern) if pattern in NAMED_SETS else fnmatch.fnmatchcase(name, pattern))
        }
        if not matched:
            raise ValueError(
                f"parameter set {pattern!r} matches no parameter of {type(model).__name__}; "
                f"accepted: {', '.join(NAMED_SETS)} or glob patterns over names such as "
                f"{next(iter(dict(model.named_parameters())), '<none>')!r}"
            )
        selected.update(matched)
    return selected


def count(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())
