"""Which image indices serve which purpose, written down once as a versioned JSON manifest.

UnlearnCanvas ships no split file: its public code scatters index ranges over scripts (and its eval loader is off by
one). Every consumer here reads the roles from one `Splits` object instead, loaded from
`assets/splits/unlearncanvas-v1.json`, so a change of split is a new manifest version rather than a silent edit.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from erase.atomic import write_text
from erase.paths import splits_dir

SCHEMA = "erasekit.splits"
VERSION = 1
DEFAULT_NAME = "unlearncanvas-v1"

ROLES = ("finetune", "held_out", "fid_reference", "forget_retain", "fmn_reference")

_NOTES = {
    "source": "UnlearnCanvas (Zhang et al., NeurIPS 2024 D&B) public code; there is no official split file.",
    "finetune": "Fine-tuning the base model on the dataset.",
    "held_out": (
        "Never used for fine-tuning. The public code's eval loader has an off-by-one and reads 18 and 19; "
        "18 is a fine-tuning image, so we use 19 and 20 as the paper intends."
    ),
    "fid_reference": "FID 'real' set: these indices of every (theme, object).",
    "forget_retain": "Forget / retain images of data-based methods (SalUn, EraseDiff, Scissorhands).",
    "fmn_reference": "FMN reference images: this index of each object of the target style.",
}


class SplitsError(ValueError):
    """A manifest that does not describe a usable split."""


@dataclass(frozen=True)
class Splits:
    """Index roles of one dataset version; indices are 1-based file names (`<idx>.jpg`)."""

    name: str
    indices: tuple[int, ...]  # every index a complete (theme, object) folder holds
    finetune: tuple[int, ...]
    held_out: tuple[int, ...]
    fid_reference: tuple[int, ...]
    forget_retain: tuple[int, ...]
    fmn_reference: tuple[int, ...]
    version: int = VERSION
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("indices", *ROLES):
            object.__setattr__(self, name, _index_tuple(getattr(self, name), name))
        _check(self)

    def role(self, name: str) -> tuple[int, ...]:
        """Indices of a role by name (one of `ROLES`)."""
        if name not in ROLES:
            raise SplitsError(f"unknown split role {name!r}; accepted: {', '.join(ROLES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("indices", *ROLES):
            data[key] = list(data[key])
        return {"schema": SCHEMA, "version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: Any) -> Splits:
        """Parse and validate a manifest's JSON object; every error names the bad field and what is accepted."""
        if not isinstance(data, dict):
            raise SplitsError(f"a splits manifest is a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise SplitsError(f"manifest schema is {data.get('schema')!r}; accepted: {SCHEMA!r}")
        if data.get("version") != VERSION:
            raise SplitsError(f"manifest version is {data.get('version')!r}; this toolkit reads version {VERSION}")
        expected = {"schema", "name", "version", "indices", "notes", *ROLES}
        missing = sorted(expected - {"notes"} - set(data))
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            raise SplitsError(f"manifest fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        if not isinstance(data["name"], str) or not data["name"]:
            raise SplitsError(f"manifest name must be a non-empty string, got {data['name']!r}")
        notes = data.get("notes", {})
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise SplitsError(f"manifest notes must map strings to strings, got {notes!r}")
        fields = {key: data[key] for key in ("indices", *ROLES)}
        return cls(name=data["name"], version=data["version"], notes=dict(notes), **fields)


def unlearncanvas_v1() -> Splits:
    """The index roles the UnlearnCanvas code uses, with its eval off-by-one corrected (see `notes`)."""
    return Splits(
        name=DEFAULT_NAME,
        indices=tuple(range(1, 21)),
        finetune=tuple(range(1, 19)),
        held_out=(19, 20),
        fid_reference=tuple(range(1, 6)),
        forget_retain=(1, 2, 3),
        fmn_reference=(1,),
        notes=dict(_NOTES),
    )


def write_manifest(path: str | os.PathLike[str], splits: Splits | None = None) -> Path:
    """Write `splits` (default: UnlearnCanvas v1) as JSON, atomically, so a crash never leaves half a manifest."""
    splits = splits or unlearncanvas_v1()
    return write_text(path, _dumps(splits.to_dict()))


def read_manifest(path: str | os.PathLike[str]) -> Splits:
    """Read and validate a manifest; the error names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitsError(f"no splits manifest at {path}") from None
    except json.JSONDecodeError as err:
        raise SplitsError(f"{path} is not valid JSON: {err}") from None
    try:
        return Splits.from_dict(data)
    except SplitsError as err:
        raise SplitsError(f"{path}: {err}") from None


def load(name: str = DEFAULT_NAME) -> Splits:
    """A shipped manifest by name (`assets/splits/<name>.json`), or a path to any manifest file."""
    candidate = Path(name)
    if candidate.suffix == ".json" or candidate.exists():
        return read_manifest(candidate)
    path = splits_dir() / f"{name}.json"
    if not path.exists():
        if name == DEFAULT_NAME:  # installed without the assets folder: the definition in code is the same
            return unlearncanvas_v1()
        shipped = sorted(p.stem for p in splits_dir().glob("*.json")) if splits_dir().is_dir() else []
        raise SplitsError(f"unknown splits {name!r}; shipped: {', '.join(shipped) or DEFAULT_NAME}")
    return read_manifest(path)


def _dumps(data: dict[str, Any]) -> str:
    """JSON with one line per field (index lists stay on one line, so the manifest reads like a table)."""
    lines = [
        f"  {json.dumps(key)}: {json.dumps(value, indent=None if key != 'notes' else 4)}" for key, value in data.items()
    ]
    return "{\n" + ",\n".join(lines).replace("\n}", "\n  }") + "\n}\n"


def _index_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SplitsError(f"split {name!r} must be a list of positive integers, got {value!r}")
    items = tuple(value)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise SplitsError(f"split {name!r} holds {bad!r}; accepted: positive integers (file indices, 1-based)")
    if not items:
        raise SplitsError(f"split {name!r} is empty; every role needs at least one index")
    if len(set(items)) != len(items) or list(items) != sorted(items):
        raise SplitsError(f"split {name!r} must be sorted without repeats, got {list(items)}")
    return items


def _check(splits: Splits) -> None:
    """Roles lie inside `indices`; fine-tune and held-out are disjoint and together cover every index."""
    available = set(splits.indices)
    for role in ROLES:
        outside = sorted(set(getattr(splits, role)) - available)
        if outside:
            raise SplitsError(f"split {role!r} uses {outside}, outside indices {list(splits.indices)}")
    overlap = sorted(set(splits.finetune) & set(splits.held_out))
    if overlap:
        raise SplitsError(f"held_out indices {overlap} are also fine-tuning indices; the two must be disjoint")
    uncovered = sorted(available - set(splits.finetune) - set(splits.held_out))
    if uncovered:
        raise SplitsError(f"indices {uncovered} are neither fine-tuning nor held out")
