"""What every method config shares: training fields, presets, and building a config from text (`--set k=v`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .train import TrainSettings, check_training_fields


@dataclass
class TrainingConfig:
    """Fields of every fine-tuning method: `steps`, `lr`, `seed`, `params` (parameter set) and the loop's knobs."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    steps: int = 1000
    lr: float = 1e-5
    seed: int = 0
    params: str | None = None  # parameter set (named set or globs); None: the method's own choice
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "adam"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    preset: str | None = None  # the named preset the values came from, recorded for reports

    def __post_init__(self) -> None:
        check_training_fields(self)

    def parameter_set(self) -> str:
        return self.params or "all"

    def train_settings(self, progress: bool = True) -> TrainSettings:
        names = {f.name for f in fields(TrainSettings)}
        return TrainSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}, progress=progress)


def texts(name: str, value: Any) -> list[str]:
    """`value` (one text or a list) as a list of non-empty texts; ValueError naming the field otherwise."""
    values = [value] if isinstance(value, str) else list(value or [])
    if not values or any(not isinstance(v, str) or not v.strip() for v in values):
        raise ValueError(f"{name} must be one or more non-empty texts, got {value!r}")
    return values


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
