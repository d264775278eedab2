"""What every method config shares (`MethodConfig`; fine-tuning ones add the loop's `TrainSettings`), presets, and
building a config from text (`--set k=v`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .params import check_spec
from .train import TrainSettings


@dataclass
class MethodConfig:
    """Fields of every method: `seed`, `params` (the parameter set; None: the method's `DEFAULT_PARAMS`) and the
    `preset` the values came from (recorded for reports). `PRESETS` maps preset names to field values."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PARAMS: ClassVar[str] = "all"

    seed: int = 0
    params: str | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        check_scalar_types(self)
        if self.params is not None:
            check_spec(self.params)

    def parameter_set(self) -> str:
        return self.params or self.DEFAULT_PARAMS


@dataclass
class TrainingConfig(TrainSettings, MethodConfig):
    """A fine-tuning method's config: its own fields plus the training loop's, declared once in `TrainSettings`
    (the config is itself the loop's settings)."""

    def __post_init__(self) -> None:
        MethodConfig.__post_init__(self)
        TrainSettings.__post_init__(self)


def steps_before_epochs(config: Any, default: int) -> None:
    """For configs with `steps` and `epochs` (data-driven methods): check `epochs`, and let given `steps` win (also
    over a preset's epochs, which are then dropped); with neither, `default` steps. Call before the loop settings'
    own checks; `steps_of_epochs` turns the epochs into steps once the forget set's size is known."""
    if config.epochs is not None and (not isinstance(config.epochs, int) or isinstance(config.epochs, bool)
                                      or config.epochs < 1):  # fmt: skip
        raise ValueError(f"epochs must be a positive integer or None, got {config.epochs!r}")
    if config.steps is None:
        config.steps = default
    else:
        config.epochs = None


def steps_of_epochs(config: Any, count: int) -> None:
    """With `epochs` set: steps = epochs · ceil(count / batch_size), the batches of that many passes over `count`
    forget images (the loop draws samples at random, so an epoch is that many samples, not one pass over each)."""
    if config.epochs is not None:
        config.steps = config.epochs * math.ceil(count / config.batch_size)


@dataclass
class ForgetRetainConfig(TrainingConfig):
    """A data-driven method's config (SalUn, EraseDiff, Scissorhands): forget images relabelled from their prompts to
    pseudo prompts, retain images kept by the diffusion loss, and `steps` or `epochs` over the forget set.

    Prompts are each one template for every image, `{object}` / `{style}` filled from the image's folders
    (<Style>/<Object>/<idx>.jpg), or a list with one prompt per image (erase.images.image_prompts)."""

    DEFAULT_STEPS: ClassVar[int] = 100

    steps: int | None = None  # None: from `epochs` when set, else DEFAULT_STEPS; given steps win over epochs
    epochs: int | None = None  # steps = epochs · ceil(forget images / batch_size)
    forget_images: str | list[str] | None = None  # folder(s) or files
    forget_prompts: str | list[str] = "A {object} image in {style} style."
    pseudo_prompts: str | list[str] = "A {object} image in Photo style."  # c', the concept forget images map to
    retain_images: str | list[str] | None = None
    retain_prompts: str | list[str] = "A {object} image in {style} style."

    def __post_init__(self) -> None:
        steps_before_epochs(self, self.DEFAULT_STEPS)
        super().__post_init__()


SCALARS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a text"}


def _scalar_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int to Python, never a number to a config
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, str)


def check_scalar_types(config: Any) -> None:
    """Every field annotated int, float, bool or str (optionally `| None`) holds that type: booleans are not
    numbers, "3" is not an integer, NaN is not a number. Raises ValueError naming the field, value and type."""
    for f in fields(config):
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        kind = annotation.removesuffix("|None")
        if kind not in SCALARS:
            continue
        value = getattr(config, f.name)
        if (value is None and optional) or _scalar_ok(kind, value):
            continue
        accepted = SCALARS[kind] + (" or None" if optional else "")
        raise ValueError(f"{f.name} must be {accepted}, got {value!r}")


def texts(name: str, value: Any, allow_empty: bool = False) -> list[str]:
    """`value` (one text or a list; one text is one item, never its characters) as a list of non-empty texts;
    ValueError naming the field otherwise (also for no texts at all, unless `allow_empty`)."""
    if value is not None and not isinstance(value, str | list | tuple):
        raise ValueError(f"{name} must be one or more non-empty texts, got {value!r}")
    values = [value] if isinstance(value, str) else list(value or [])
    if (not values and not allow_empty) or any(not isinstance(v, str) or not v.strip() for v in values):
        raise ValueError(f"{name} must be one or more non-empty texts, got {value!r}")
    return values


def concept_texts(value: Any) -> list[str]:
    """A config's `concepts`: one or more non-empty texts, each once (a concept given twice would be weighted
    twice by a solve and sampled twice as often by a loop: almost surely a mistake in a list of many)."""
    concepts = texts("concepts", value)
    seen: set[str] = set()
    for concept in concepts:
        key = " ".join(concept.lower().split())
        if key in seen:
            raise ValueError(f"concepts must be distinct, got {concept!r} twice in {concepts!r}")
        seen.add(key)
    return concepts


def build_config(cls: type, preset: str | None = None, **values: Any):
    """`cls` with its defaults, then the named preset's values, then `values` (which win)."""
    presets = getattr(cls, "PRESETS", {})
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {cls.__name__}; accepted: {', '.join(presets) or 'none'}")
    accepted = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - accepted)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {cls.__name__}; "
                         f"accepted: {', '.join(sorted(accepted))}")  # fmt: skip
    merged = {**(presets.get(preset, {}) if preset else {}), **values}
    if preset is not None:
        merged["preset"] = preset
    return cls(**merged)


def parse_assignments(cls: type, assignments: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings into typed config values, following the field annotations of `cls`."""
    types = {f.name: str(f.type) for f in fields(cls) if f.init}
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in types:
            raise ValueError(f"unknown config field {key!r}; accepted: {', '.join(sorted(types))}")
        parsed[key] = coerce(key, types[key], raw.strip())
    return parsed


def coerce(key: str, annotation: str, raw: str) -> Any:
    """Turn the text `raw` into the type named by `annotation` (int, float, bool, str, lists, optionals)."""
    optional = "None" in annotation
    if optional and raw.lower() in ("none", "null", ""):
        return None
    base = annotation.replace(" | None", "").replace("None | ", "")
    try:
        if base == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(raw)
        if base == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if base.startswith(("list", "tuple")):
            value = json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
            return list(value)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"{key}={raw!r}: expected {annotation}") from None
    return raw
