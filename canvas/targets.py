"""Which targets a bench runs: target names and keywords (`styles`, `objects`, `all`, `tuning`, `held-out`), and
the one target name of a job that erases several at once."""

from __future__ import annotations

from canvas import metrics, splits
from canvas.catalog import Catalog
from canvas.metrics import TOGETHER

TARGET_KEYWORDS = ("styles", "objects", "all", "tuning", "held-out")


def resolve_targets(catalog: Catalog, specs: list[str]) -> list[str]:
    """Target names from names and keywords, in the order given, each target once: `styles` / `objects` (every
    style / object of the catalog), `all` (both), `tuning` / `held-out` (the targets of that split in the splits
    manifest). An entry may itself be a comma list, as in `--targets held-out,Cats`."""
    words = [w.strip() for spec in specs for w in str(spec).split(",") if w.strip()]
    if not words:
        raise ValueError(f"no targets given: name styles and/or objects of catalog {catalog.name!r}, or use the "
                         f"keywords {', '.join(TARGET_KEYWORDS)}")  # fmt: skip
    resolved: list[str] = []
    for word in words:
        resolved.extend(_expand(catalog, word))
    return list(dict.fromkeys(resolved))


def together_target(catalog: Catalog, group: str | list[str]) -> str:
    """One job's targets erased at once ("A,B,C", keywords allowed) as its target name "A+B+C": two or more
    distinct targets of one kind (canvas.metrics.target_kind says why not)."""
    names = resolve_targets(catalog, [group] if isinstance(group, str) else list(group))
    if len(names) < 2:
        raise ValueError(f"a together job erases two or more targets at once, got {group!r}")
    target = TOGETHER.join(names)
    metrics.target_kind(catalog, target)
    return target


def _expand(catalog: Catalog, word: str) -> tuple[str, ...]:
    """One word of `resolve_targets`: a keyword's targets, or a single target name."""
    expansions = {
        "styles": lambda: catalog.styles,
        "objects": lambda: catalog.objects,
        "all": lambda: (*catalog.styles, *catalog.objects),
        "tuning": lambda: splits.tuning_targets(catalog),
        "held-out": lambda: splits.held_out_targets(catalog),
    }
    if word in expansions:
        return tuple(expansions[word]())
    if catalog.is_style(word) or catalog.is_object(word):
        return (word,)
    hint = " (the photo class is not a benchmark style)" if word == catalog.photo else ""
    names = ", ".join((*catalog.styles, *catalog.objects))
    raise ValueError(f"unknown target {word!r}{hint}; accepted: the keywords {', '.join(TARGET_KEYWORDS)}, or a "
                     f"style or object of catalog {catalog.name!r}: {names}")  # fmt: skip
