"""Named parameter sets over a pipeline's UNet and text encoders: the one definition of "which weights a method
trains" for every method.

UNet parameters keep their names in the UNet (`down_blocks.0...`); text-encoder parameters are named
`text_encoder.<name in the text encoder>` (SDXL's second: `text_encoder_2.<name>`), so one dict holds them all
without ambiguity (no UNet name starts so) and its keys are the Delta's own names minus the `unet.` prefix
(`delta_name`). The named text-encoder sets cover every text encoder the pipeline has (both on SDXL)."""

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
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline's text encoders, as their names' prefixes
TEXT_PREFIXES = tuple(f"{c}." for c in TEXT_ENCODERS)
TEXT_ENCODER_SETS = {
    "text-encoder": "every text-encoder parameter",
    "text-encoder-layers": "the text encoders' transformer layers and final layer norms, not their embeddings "
    "(AdvUnlearn's text_encoder_full)",
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
    accepted = (f"accepted: {', '.join([*NAMED_SETS, *TEXT_ENCODER_SETS])}, the aliases {', '.join(ALIASES)}, or "
                "glob patterns (text-encoder ones start with 'text_encoder.' or 'text_encoder_2.')")  # fmt: skip
    patterns = _patterns(spec)
    if not patterns:
        raise ValueError(f"empty parameter set {spec!r}; {accepted}")
    for pattern in patterns:
        named = pattern in NAMED_SETS or pattern in TEXT_ENCODER_SETS
        if not named and not any(c in pattern for c in GLOB_CHARACTERS):
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
    if set_name == "text-encoder-layers":
        # transformers names CLIPTextModel's tensors with or without `text_model.`, depending on its version
        return name.removeprefix("text_model.").startswith(("encoder.", "final_layer_norm."))
    return True  # "all", "text-encoder"


def is_text_encoder_pattern(pattern: str) -> bool:
    return pattern in TEXT_ENCODER_SETS or pattern.startswith(TEXT_PREFIXES)


def text_component(name: str) -> str | None:
    """The text encoder (`text_encoder`, `text_encoder_2`) a parameter-set name belongs to; None for a UNet name."""
    component = name.split(".", 1)[0]
    return component if component in TEXT_ENCODERS and "." in name else None


def names_text_encoder(spec: str | Sequence[str]) -> bool:
    """Whether a parameter set names any text-encoder tensor (then only methods that train it may take it)."""
    return any(is_text_encoder_pattern(p) for p in _patterns(spec))


def delta_name(name: str) -> str:
    """A parameter set's name as the Delta names the tensor (`unet.<name>`, or `<text encoder>.<name>`)."""
    return name if text_component(name) else f"unet.{name}"


def select_in(pipe, spec: str | Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters of a pipeline named by `spec`: UNet ones (as `select` over `pipe.unet`) under their UNet names,
    text-encoder ones (named sets `text-encoder`, `text-encoder-layers` over every text encoder the pipeline has, or
    patterns `text_encoder.<glob>` / `text_encoder_2.<glob>`) under `<component>.<name>`. Raises ValueError like
    `select`, also for a text-encoder set on a pipeline without that encoder."""
    check_spec(spec)
    patterns = _patterns(spec)
    text = [p for p in patterns if is_text_encoder_pattern(p)]
    unet = [p for p in patterns if not is_text_encoder_pattern(p)]
    selected = _select(pipe.unet, unet) if unet else {}
    for pattern in text:
        named = pattern in TEXT_ENCODER_SETS
        components = [c for c in TEXT_ENCODERS if getattr(pipe, c, None) is not None] if named else [
            text_component(pattern)]  # fmt: skip
        if not components or getattr(pipe, components[0], None) is None:
            missing = "text_encoder" if named else components[0]
            raise ValueError(f"parameter set {pattern!r} names text-encoder tensors, but the pipeline has no {missing}")
        for component in components:
            prefix = f"{component}."
            local = pattern if named else pattern.removeprefix(prefix)
            found = _select(getattr(pipe, component), [local], prefix)
            selected.update({prefix + n: p for n, p in found.items()})
    return selected


def select(model: nn.Module, spec: str | Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters of `model` named by `spec`: named sets, their aliases (`ALIASES`), or glob patterns over
    parameter names (a list, or one comma-separated string), e.g. `"*attn2.to_k.*,*attn2.to_v.*"`.

    Raises ValueError when the spec is empty or matches nothing, so a typo never trains zero weights, and for
    text-encoder sets, which name tensors of a pipeline (`select_in`), not of one model.
    """
    check_spec(spec)
    patterns = _patterns(spec)
    text = [p for p in patterns if is_text_encoder_pattern(p)]
    if text:
        raise ValueError(f"parameter set {text[0]!r} names text-encoder tensors: select it from the pipeline "
                         "(erase.params.select_in), not from one model")  # fmt: skip
    return _select(model, patterns)


def _select(model: nn.Module, patterns: list[str], prefix: str = "") -> dict[str, nn.Parameter]:
    """`patterns` over `model`'s names; errors show the names with `prefix` (as the user wrote them)."""
    selected: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        named = pattern in NAMED_SETS or pattern in TEXT_ENCODER_SETS
        matched = {
            name: p
            for name, p in model.named_parameters()
            if (_in_named_set(name, pattern) if named else fnmatch.fnmatchcase(name, pattern))
        }
        if not matched:
            raise ValueError(
                f"parameter set {(pattern if named else prefix + pattern)!r} matches no parameter of "
                f"{type(model).__name__}; accepted: {', '.join([*NAMED_SETS, *TEXT_ENCODER_SETS])} or glob patterns "
                f"over names such as {prefix + next(iter(dict(model.named_parameters())), '<none>')!r}"
            )
        selected.update(matched)
    return selected


def count(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())
