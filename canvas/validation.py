"""Validate a copy of the UnlearnCanvas dataset (either layout `canvas.data` reads) against a catalog and split.

`validate` reports every problem (missing or extra folder, wrong image count, unreadable image, bad caption) in one
pass instead of stopping at the first, because a 24,000-image download is expensive to re-check one fix at a time.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canvas import splits
from canvas.catalog import Catalog
from canvas.data import (
    IMAGE_SUFFIXES,
    DatasetError,
    caption_words,
    check_columns,
    decode_image,
    folder_indices,
    layout_of,
    norm_words,
    open_rgb,
    parquet_files,
    parquet_module,
    themes_by_words,
)


@dataclass(frozen=True)
class Problem:
    """One finding of `validate`: its kind (see `Problem.KINDS`), where, and what."""

    kind: str
    where: str
    detail: str = ""

    KINDS = ("missing folder", "extra folder", "wrong count", "unreadable image", "bad caption", "bad file")

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ValidationReport:
    """Everything `validate` found; `ok` ignores extras when they were allowed."""

    root: str
    layout: str
    expected_images: int
    found_images: int = 0
    problems: list[Problem] = field(default_factory=list)
    allow_extra: bool = False

    def of_kind(self, kind: str) -> list[Problem]:
        if kind not in Problem.KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; accepted: {', '.join(Problem.KINDS)}")
        return [p for p in self.problems if p.kind == kind]

    @property
    def errors(self) -> list[Problem]:
        """Problems that make the copy unusable (extras count only when not allowed)."""
        return [p for p in self.problems if not (self.allow_extra and p.kind == "extra folder")]

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        head = (
            f"{self.layout} dataset {self.root}: {self.found_images}/{self.expected_images} expected images found, "
            f"{len(self.errors)} problem(s)"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def raise_if_failed(self) -> ValidationReport:
        if not self.ok:
            raise DatasetError(str(self))
        return self


def validate(
    source: str | os.PathLike[str],
    catalog: Catalog,
    indices: Iterable[int] | None = None,
    *,
    check_images: bool = True,
    allow_extra: bool = False,
    raise_on_error: bool = False,
) -> ValidationReport:
    """Check a dataset copy against a catalog and an index set (default: every index of the v1 splits).

    Names every missing or extra theme/object folder, every (theme, object) whose images are not exactly `indices`,
    every image that does not decode (when `check_images`), and every parquet caption that does not parse. Extra
    folders or images (e.g. the 10 styles UnlearnCanvas-60 adds, when checking against UnlearnCanvas-50) are listed
    but tolerated with `allow_extra`.
    """
    if indices is None:
        indices = splits.load().indices
    wanted = sorted(set(indices))
    path = Path(source)
    expected = len(catalog.themes) * len(catalog.objects) * len(wanted)
    layout = layout_of(path, catalog)
    report = ValidationReport(str(path), layout, expected, allow_extra=allow_extra)
    if not path.exists():
        report.problems.append(Problem("missing folder", str(path), "dataset root does not exist"))
    elif layout == "parquet":
        _validate_parquet(path, catalog, wanted, check_images, report)
    else:
        _validate_folder(path, catalog, wanted, check_images, report)
    if raise_on_error:
        report.raise_if_failed()
    return report


def _validate_folder(root: Path, catalog: Catalog, wanted: list[int], check: bool, report: ValidationReport) -> None:
    add = report.problems.append
    for theme in _compare_dirs(root, catalog.themes, report):
        for obj in _compare_dirs(root / theme, catalog.objects, report):
            folder = root / theme / obj
            found, strays = folder_indices(folder)
            missing = sorted(set(wanted) - set(found))
            extra = sorted(set(found) - set(wanted))
            duplicates = sorted(i for i, n in Counter(found).items() if n > 1)
            if missing or duplicates or ((extra or strays) and not report.allow_extra):
                add(
                    Problem(
                        "wrong count",
                        str(folder),
                        _count_detail(len(found), wanted, missing, extra, duplicates, strays),
                    )
                )
            for idx in sorted(set(found) & set(wanted)):
                report.found_images += 1
                if check:
                    for suffix in IMAGE_SUFFIXES:
                        file = folder / f"{idx}{suffix}"
                        if file.is_file():
                            _check_decodes(lambda file=file: open_rgb(file), str(file), report)


def _compare_dirs(parent: Path, names: Sequence[str], report: ValidationReport) -> list[str]:
    """Expected sub-folders present in `parent`; missing and extra ones go into the report."""
    present = {p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for name in names:
        if name not in present:
            report.problems.append(Problem("missing folder", str(parent / name)))
    for name in sorted(present - set(names)):
        report.problems.append(Problem("extra folder", str(parent / name), "not in the catalog"))
    return [n for n in names if n in present]


def _validate_parquet(path: Path, catalog: Catalog, wanted: list[int], check: bool, report: ValidationReport) -> None:
    pq = parquet_module()
    add = report.problems.append
    counts: Counter[tuple[str, str]] = Counter()
    extras: Counter[str] = Counter()
    themes, objects = themes_by_words(catalog), {norm_words(o): o for o in catalog.objects}
    wanted_set = set(wanted)
    for file in parquet_files(path):
        try:
            shard = pq.ParquetFile(file)
            check_columns(shard, file)
        except Exception as err:  # any unreadable shard is a finding, not a crash
            add(Problem("bad file", str(file), str(err)))
            continue
        row = 0
        for group in range(shard.num_row_groups):
            columns = ["text", "image"] if check else ["text"]
            table = shard.read_row_group(group, columns=columns)
            cells = table.column("image").to_pylist() if check else [None] * table.num_rows
            for text, cell in zip(table.column("text").to_pylist(), cells):
                where = f"{file} row {row}"
                row += 1
                try:
                    theme_words, obj_words = caption_words(text)
                except ValueError as err:
                    add(Problem("bad caption", where, str(err)))
                    continue
                theme, obj = themes.get(norm_words(theme_words)), objects.get(norm_words(obj_words))
                if theme is None or obj is None:
                    extras[f"{theme or theme_words}/{obj or obj_words}"] += 1
                    continue
                counts[theme, obj] += 1
                report.found_images += counts[theme, obj] in wanted_set
                if check:
                    _check_decodes(lambda cell=cell, where=where: decode_image(cell, where), where, report)
    for theme in catalog.themes:
        for obj in catalog.objects:
            n = counts[theme, obj]
            missing, extra = sorted(wanted_set - set(range(1, n + 1))), sorted(set(range(1, n + 1)) - wanted_set)
            if n == 0:
                add(Problem("missing folder", f"{theme}/{obj}", "no rows with this caption"))
            elif missing or (extra and not report.allow_extra):
                add(Problem("wrong count", f"{theme}/{obj}", _count_detail(n, wanted, missing, extra, [])))
    for name, n in sorted(extras.items()):
        add(Problem("extra folder", name, f"{n} rows; not in catalog {catalog.name!r}"))


def _count_detail(
    n: int, wanted: list[int], missing: list[int], extra: list[int], dup: list[int], strays: Sequence[str] = ()
) -> str:
    parts = [f"{n} images, expected {len(wanted)}"]
    parts += [f"{label} {_ranges(v)}" for label, v in (("missing", missing), ("extra", extra), ("duplicate", dup)) if v]
    if strays:
        parts.append(f"stray files {', '.join(sorted(strays))}")
    return "; ".join(parts)


def _check_decodes(open_fn: Any, where: str, report: ValidationReport) -> None:
    try:
        open_fn()
    except Exception as err:  # PIL raises many types for broken files; all are findings
        report.problems.append(Problem("unreadable image", where, f"{type(err).__name__}: {err}"))


def _ranges(values: Iterable[int]) -> str:
    """`[1, 2, 3, 7]` -> `1-3, 7`, so long index lists stay readable in a report."""
    values = sorted(values)
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
