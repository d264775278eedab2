"""Which image indices serve which purpose, written down once as a versioned JSON manifest.

UnlearnCanvas ships no split file: its public code scatters index ranges over scripts (and its eval loader is off by
one). Every consumer here reads the roles from one `Splits` object instead, loaded from
`assets/splits/unlearncanvas-v1.json`, so a change of split is a new manifest version rather than a silent edit.

The manifest also splits the unlearning *targets* of each catalog: the tuning targets presets may be tuned on, and
the held-out rest, on which results are reported (`tuning_targets`, `held_out_targets`, `target_split`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from canvas.metrics import TOGETHER, targets_of
from erase.atomic import write_text
from erase.catalog import Catalog
from erase.catalog import get as get_catalog
from erase.catalog import names as catalog_names
from erase.paths import splits_dir

SCHEMA = "erasekit.splits"
VERSION = 1
DEFAULT_NAME = "unlearncanvas-v1"

ROLES = ("finetune", "held_out", "fid_reference", "forget_retain", "fmn_reference")
TUNING, HELD_OUT = "tuning", "held-out"  # the two target splits
TARGET_SPLITS = (TUNING, HELD_OUT)

# catalog -> the targets presets may be tuned on (styles, then objects); every other target is held out
_TUNING_TARGETS = {
    "toy": ("Pop_Art", "Watercolor", "Cats", "Towers"),
    "unlearncanvas-50": ("Pop_Art", "Van_Gogh", "Watercolor", "Cats", "Towers"),
    "unlearncanvas-60": ("Pop_Art", "Van_Gogh", "Watercolor", "Cats", "Towers"),
}

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
    "tuning_targets": (
        "Unlearning targets presets may be tuned on, per catalog; every other target of the catalog is held out, and "
        "results are means over held-out targets only. toy: fixed for the toy presets (scripts/tune_toy.py tunes on "
        "these). unlearncanvas-50: our choice, the paper names no tuning targets; unlearncanvas-60 lists the same "
        "ones, so both catalogs report the same held-out targets of the 50 styles."
    ),
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
    # catalog name -> its tuning targets; None: a manifest written before target splits existed
    tuning_targets: dict[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        for name in ("indices", *ROLES):
            object.__setattr__(self, name, _index_tuple(getattr(self, name), name))
        _check(self)
        if self.tuning_targets is not None:
            object.__setattr__(self, "tuning_targets", _tuning_map(self.tuning_targets))

    def role(self, name: str) -> tuple[int, ...]:
        """Indices of a role by name (one of `ROLES`)."""
        if name not in ROLES:
            raise SplitsError(f"unknown split role {name!r}; accepted: {', '.join(ROLES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("indices", *ROLES):
            data[key] = list(data[key])
        tuning = data.pop("tuning_targets")
        if tuning is not None:
            data["tuning_targets"] = {name: list(targets) for name, targets in tuning.items()}
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
        expected = {"schema", "name", "version", "indices", "notes", "tuning_targets", *ROLES}
        missing = sorted(expected - {"notes", "tuning_targets"} - set(data))
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            raise SplitsError(f"manifest fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        if not isinstance(data["name"], str) or not data["name"]:
            raise SplitsError(f"manifest name must be a non-empty string, got {data['name']!r}")
        notes = data.get("notes", {})
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise SplitsError(f"manifest notes must map strings to strings, got {notes!r}")
        fields = {key: data[key] for key in ("indices", *ROLES)}
        tuning = data.get("tuning_targets")  # absent in manifests written before target splits
        return cls(name=data["name"], version=data["version"], notes=dict(notes), tuning_targets=tuning, **fields)


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
        tuning_targets=dict(_TUNING_TARGETS),
    )


def tuning_targets(catalog: Catalog | str, manifest: Splits | None = None) -> tuple[str, ...]:
    """The targets of `catalog` presets may be tuned on, in catalog order (styles, then objects).

    `manifest` defaults to the shipped one (`load()`). A manifest without tuning targets, or without this catalog,
    is an error rather than "everything held out": silently counting a tuning target as a result is the mistake
    this split exists to prevent."""
    cat = get_catalog(catalog) if isinstance(catalog, str) else catalog
    manifest = manifest or load()
    if manifest.tuning_targets is None:
        raise SplitsError(f"splits manifest {manifest.name!r} predates tuning targets (no 'tuning_targets' field); "
                          "rewrite it with `canvas splits --out FILE` or add the field")  # fmt: skip
    if cat.name not in manifest.tuning_targets:
        raise SplitsError(f"splits manifest {manifest.name!r} lists tuning targets for "
                          f"{', '.join(manifest.tuning_targets) or 'no catalog'}, not {cat.name!r}; add it "
                          "(an empty list makes every target held out)")  # fmt: skip
    chosen = set(manifest.tuning_targets[cat.name])
    return tuple(t for t in (*cat.styles, *cat.objects) if t in chosen)


def held_out_targets(catalog: Catalog | str, manifest: Splits | None = None) -> tuple[str, ...]:
    """Every target of `catalog` that is not a tuning target, in catalog order (styles, then objects)."""
    cat = get_catalog(catalog) if isinstance(catalog, str) else catalog
    tuning = set(tuning_targets(cat, manifest))
    return tuple(t for t in (*cat.styles, *cat.objects) if t not in tuning)


def target_split(catalog: Catalog | str, target: str, manifest: Splits | None = None) -> str:
    """`"tuning"` or `"held-out"`: which target split `target` (a style or object of `catalog`) belongs to.
    Targets erased together ("A+B") are held out only when every one of them is."""
    cat = get_catalog(catalog) if isinstance(catalog, str) else catalog
    if TOGETHER in target:
        each = {target_split(cat, t, manifest) for t in targets_of(target)}
        return TUNING if TUNING in each else HELD_OUT
    if not (cat.is_style(target) or cat.is_object(target)):
        raise SplitsError(f"{target!r} is neither a style nor an object of catalog {cat.name!r}; accepted: "
                          f"{', '.join((*cat.styles, *cat.objects))}")  # fmt: skip
    return TUNING if target in tuning_targets(cat, manifest) else HELD_OUT


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
    """JSON with one line per field (index lists stay on one line, so the manifest reads like a table); mappings
    (notes, tuning targets) get one line per entry."""
    lines = [f"  {json.dumps(key)}: {_dumps_value(value)}" for key, value in data.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _dumps_value(value: Any) -> str:
    if not isinstance(value, dict):
        return json.dumps(value)
    entries = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
    return "{\n" + ",\n".join(entries) + "\n  }" if entries else "{}"


def _tuning_map(value: Any) -> dict[str, tuple[str, ...]]:
    """Validated `tuning_targets`: known catalogs, each mapped to distinct styles / objects of that catalog."""
    if not isinstance(value, dict):
        raise SplitsError(f"tuning_targets must map catalog names to lists of targets, got {value!r}")
    out = {}
    for name, targets in value.items():
        if name not in catalog_names():
            raise SplitsError(f"tuning_targets names catalog {name!r}; accepted: {', '.join(catalog_names())}")
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
            raise SplitsError(f"tuning_targets[{name!r}] must be a list of target names, got {targets!r}")
        cat = get_catalog(name)
        unknown = [t for t in targets if not (isinstance(t, str) and (cat.is_style(t) or cat.is_object(t)))]
        if unknown:
            raise SplitsError(f"tuning_targets[{name!r}] holds {unknown!r}, not styles or objects of catalog "
                              f"{name!r}; accepted: {', '.join((*cat.styles, *cat.objects))}")  # fmt: skip
        if len(set(targets)) != len(targets):
            raise SplitsError(f"tuning_targets[{name!r}] repeats a target: {list(targets)}")
        out[name] = tuple(targets)
    return out


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
