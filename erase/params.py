"""Named parameter sets over a UNet: the one definition of "which weights a method trains" for every method."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

NAMED_SETS = {
    "kv": "cross-attention keys and values (attn2.to_k, attn2.to_v)",
    "xattn": "every cross-attention module (attn2.*)",
    "noxattn": "everything except cross-attention",
    "esd-u": "everything except cross-attention, the time embedding and the output layers (conv_norm_out, conv_out): "
    "the CompVis code's 'noxattn' (ESD-u of the paper-era code, EraseDiff's NSFW recipe)",
    "all": "every parameter",
}


# The names the papers and their code give to parameter sets, each one of the named sets above.
ALIASES = {
    "esd-x": "xattn",  # ESD's variants
    "esd-x-strict": "kv",
    "esd-all": "all",
    "attention": "xattn",  # CA's parameter groups ("kv" and "xattn" as above)
    "full": "all",
}
GLOB_CHARACTERS = "*?[."  # every parameter name has a dot, so a pattern without these is no name at all


def _patterns(spec: str | Sequence[str]) -> list[str]:
    """The spec's patterns (a list, or one comma-separated string), aliases resolved to their named set."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [ALIASES.get(p.strip(), p.strip()) for p in parts if isinstance(p, str) and p.strip()]


def check_spec(spec: str | Sequence[str]) -> None:
    """Reject a spec that cannot name parameters (before any model is loaded): empty, not text, or a bare word
    that is neither a named set nor an alias (e.g. a misspelt variant)."""
    texts = [spec] if isinstance(spec, str) else spec
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"parameter set must be text (named sets or glob patterns), got {spec!r}")
    accepted = f"accepted: {', '.join(NAMED_SETS)}, the aliases {', '.join(ALIASES)}, or glob patterns"
    patterns = _patterns(spec)
    if not patterns:
        raise ValueError(f"empty parameter set {spec!r}; {accepted}")
    for pattern in patterns:
        if pattern not in NAMED_SETS and not any(c in pattern for c in GLOB_CHARACTERS):
            raise ValueError(f"parameter set {pattern!r} is neither a named set nor a pattern over names; {accepted}")


def _in_named_set(name: str, set_name: str) -> bool:
    if set_name == "kv":
        return ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}"
    if set_name == "xattn":
        return ".attn2." in f".{name}"
    if set_name == "noxattn":
        return ".attn2." not in f".{name}"
    if set_name == "esd-u":
        # The CompVis code skips `out.*` (LDM's GroupNorm out.0 and conv out.2) and `time_embed*`.
        return ".attn2." not in f".{name}" and not name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
    return True  # "all"


def select(model: nn.Module, spec: str | Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters of `model` named by `spec`: named sets, their aliases (`ALIASES`), or glob patterns over
    parameter names (a list, or one comma-separated string), e.g. `"*attn2.to_k.*,*attn2.to_v.*"`.

    Raises ValueError when the spec is empty or matches nothing, so a typo never trains zero weights.
    """
    check_spec(spec)
    patterns = _patterns(spec)
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
