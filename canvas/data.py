"""Read UnlearnCanvas images from the folder layout or from parquet shards, and validate a copy of the dataset.

Folder layout: `<root>/<Theme>/<Object>/<idx>.jpg` (the photo class is the theme `Seed_Images`).
Parquet layout (the Hugging Face copy): columns `image` (bytes, or a `{"bytes": ...}` struct) and `text`, the caption
`A {object} image in {style words} style.`; theme and object are parsed back from the caption, and the index is the
row's position among rows of the same (theme, object), 1-based, in shard-name then row order (the copy keeps no file
names). Both readers answer `dataset[theme, object, idx] -> PIL.Image` so everything downstream ignores the layout.

`validate` reports every problem (missing or extra folder, wrong image count, unreadable image, bad caption) in one
pass instead of stopping at the first, because a 24,000-image download is expensive to re-check one fix at a time.
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from canvas.catalog import Catalog, style_words

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CAPTION = re.compile(r"^\s*an?\s+(?P<object>.+?)\s+image\s+in\s+(?P<style>.+?)\s+style\s*\.?\s*$", re.IGNORECASE)


class DatasetError(ValueError):
    """The dataset copy does not match the catalog and split it is used with."""


@dataclass(frozen=True, order=True)
class ItemKey:
    """One image of the dataset: theme (style or photo class), object, 1-based index."""

    theme: str
    object: str
    index: int


# ---------------------------------------------------------------------------------------------------- captions


def parse_caption(caption: str, catalog: Catalog) -> tuple[str, str]:
    """(theme, object) named by a benchmark caption; a ValueError says whether the form or a name is wrong."""
    theme_words, obj_words = _caption_words(caption)
    theme = _themes_by_words(catalog).get(_norm(theme_words))
    obj = {_norm(o): o for o in catalog.objects}.get(_norm(obj_words))
    if theme is None:
        raise ValueError(f"caption {caption!r} names style {theme_words!r}, not a theme of catalog {catalog.name!r}")
    if obj is None:
        raise ValueError(f"caption {caption!r} names object {obj_words!r}, not an object of catalog {catalog.name!r}")
    return theme, obj


def _caption_words(caption: Any) -> tuple[str, str]:
    match = _CAPTION.match(caption) if isinstance(caption, str) else None
    if match is None:
        raise ValueError(f"caption {caption!r} is not of the form 'A {{object}} image in {{style}} style.'")
    return match["style"], match["object"]


def _norm(words: str) -> str:
    return " ".join(words.replace("_", " ").split()).casefold()


def _themes_by_words(catalog: Catalog) -> dict[str, str]:
    table = {_norm(style_words(t, catalog.photo)): t for t in catalog.themes}
    table.update({_norm(t): t for t in catalog.themes})  # `Seed Images` is accepted for the photo class too
    return table


# ---------------------------------------------------------------------------------------------------- readers


class FolderDataset:
    """The folder layout `<root>/<Theme>/<Object>/<idx>.jpg`; images load lazily, one file each."""

    layout = "folder"

    def __init__(self, root: str | os.PathLike[str], catalog: Catalog) -> None:
        self.root = Path(root)
        self.catalog = catalog
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist")

    def path(self, theme: str, obj: str, idx: int) -> Path:
        """The file of one image (`.jpg` unless only a `.jpeg`/`.png` of that index exists)."""
        _check_key(self.catalog, theme, obj, idx)
        folder = self.root / theme / obj
        for suffix in IMAGE_SUFFIXES:
            if (folder / f"{idx}{suffix}").is_file():
                return folder / f"{idx}{suffix}"
        return folder / f"{idx}.jpg"

    def keys(self) -> list[ItemKey]:
        """Every image present on disk for the catalog's themes and objects, sorted."""
        keys = []
        for theme in self.catalog.themes:
            for obj in self.catalog.objects:
                keys.extend(ItemKey(theme, obj, i) for i in _folder_indices(self.root / theme / obj)[0])
        return sorted(set(keys))

    def load(self, theme: str, obj: str, idx: int) -> Image.Image:
        path = self.path(theme, obj, idx)
        if not path.is_file():
            raise KeyError(f"no image {path}")
        return _open_rgb(path)

    def __getitem__(self, key: tuple[str, str, int] | ItemKey) -> Image.Image:
        return self.load(*_as_tuple(key))

    def __iter__(self) -> Iterator[tuple[ItemKey, Image.Image]]:
        for key in self.keys():
            yield key, self.load(key.theme, key.object, key.index)

    def __len__(self) -> int:
        return len(self.keys())


class ParquetDataset:
    """Parquet shards with `image` and `text` columns; rows are indexed once from the captions, images load lazily.

    Rows whose caption cannot be parsed, or names a theme/object outside the catalog, are left out of the index and
    listed in `skipped` as (shard, row, reason); `validate` reports them.
    """

    layout = "parquet"

    def __init__(self, source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], catalog: Catalog) -> None:
        import pyarrow.parquet as pq

        self.catalog = catalog
        self.files = _parquet_files(source)
        self._index: dict[ItemKey, tuple[int, int, int]] = {}
        self.skipped: list[tuple[str, int, str]] = []
        self._cached: tuple[tuple[int, int], list[Any]] | None = None
        counters: Counter[tuple[str, str]] = Counter()
        for f, path in enumerate(self.files):
            shard = pq.ParquetFile(path)
            _check_columns(shard, path)
            row = 0
            for group in range(shard.num_row_groups):
                texts = shard.read_row_group(group, columns=["text"]).column("text").to_pylist()
                for offset, text in enumerate(texts):
                    try:
                        theme, obj = parse_caption(text, catalog)
                    except ValueError as err:
                        self.skipped.append((str(path), row + offset, str(err)))
                        continue
                    counters[theme, obj] += 1
                    self._index[ItemKey(theme, obj, counters[theme, obj])] = (f, group, offset)
                row += len(texts)

    def keys(self) -> list[ItemKey]:
        return sorted(self._index)

    def location(self, theme: str, obj: str, idx: int) -> tuple[Path, int, int]:
        """(shard, row group, row within the group) of one image."""
        f, group, row = self._locate(theme, obj, idx)
        return self.files[f], group, row

    def load(self, theme: str, obj: str, idx: int) -> Image.Image:
        f, group, row = self._locate(theme, obj, idx)
        return decode_image(self._row_group_images(f, group)[row], f"{self.files[f]} row group {group} row {row}")

    def _locate(self, theme: str, obj: str, idx: int) -> tuple[int, int, int]:
        _check_key(self.catalog, theme, obj, idx)
        try:
            return self._index[ItemKey(theme, obj, idx)]
        except KeyError:
            raise KeyError(f"no image {theme}/{obj}/{idx} in {len(self.files)} parquet shard(s)") from None

    def _row_group_images(self, f: int, group: int) -> list[Any]:
        """The `image` column of one row group; the last one read is kept, so reading in order decodes each once."""
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != (f, group):
            table = pq.ParquetFile(self.files[f]).read_row_group(group, columns=["image"])
            self._cached = ((f, group), table.column("image").to_pylist())
        return self._cached[1]

    def __getitem__(self, key: tuple[str, str, int] | ItemKey) -> Image.Image:
        return self.load(*_as_tuple(key))

    def __iter__(self) -> Iterator[tuple[ItemKey, Image.Image]]:
        for key, _ in sorted(self._index.items(), key=lambda kv: kv[1]):  # storage order: each row group read once
            yield key, self.load(key.theme, key.object, key.index)

    def __len__(self) -> int:
        return len(self._index)


def open_dataset(source: str | os.PathLike[str], catalog: Catalog) -> FolderDataset | ParquetDataset:
    """A reader for `source`: a parquet file, or a folder of parquet shards, or the folder layout."""
    path = Path(source)
    if path.is_file() or (path.is_dir() and any(path.glob("*.parquet")) and not _has_theme_folder(path, catalog)):
        return ParquetDataset(path, catalog)
    return FolderDataset(path, catalog)


def decode_image(cell: Any, where: str = "image") -> Image.Image:
    """A parquet `image` cell (raw bytes, or a struct with `bytes`) as an RGB image; errors name the cell."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DatasetError(f"{where}: image cell holds {type(data).__name__}; accepted: bytes or {{'bytes': ...}}")
    return _open_rgb(io.BytesIO(bytes(data)))


# ---------------------------------------------------------------------------------------------------- validation


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
        from canvas.splits import load

        indices = load().indices
    wanted = sorted(set(indices))
    path = Path(source)
    expected = len(catalog.themes) * len(catalog.objects) * len(wanted)
    parquet = path.is_file() or (path.is_dir() and any(path.glob("*.parquet")) and not _has_theme_folder(path, catalog))
    report = ValidationReport(str(path), "parquet" if parquet else "folder", expected, allow_extra=allow_extra)
    if not path.exists():
        report.problems.append(Problem("missing folder", str(path), "dataset root does not exist"))
    elif parquet:
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
            found, strays = _folder_indices(folder)
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
                            _check_decodes(lambda file=file: _open_rgb(file), str(file), report)


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
    import pyarrow.parquet as pq

    add = report.problems.append
    counts: Counter[tuple[str, str]] = Counter()
    extras: Counter[str] = Counter()
    themes, objects = _themes_by_words(catalog), {_norm(o): o for o in catalog.objects}
    wanted_set = set(wanted)
    for file in _parquet_files(path):
        try:
            shard = pq.ParquetFile(file)
            _check_columns(shard, file)
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
                    theme_words, obj_words = _caption_words(text)
                except ValueError as err:
                    add(Problem("bad caption", where, str(err)))
                    continue
                theme, obj = themes.get(_norm(theme_words)), objects.get(_norm(obj_words))
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


# ---------------------------------------------------------------------------------------------------- helpers


def _folder_indices(folder: Path) -> tuple[list[int], list[str]]:
    """Indices of the images in one object folder (repeats kept, so duplicates show) and the stray file names."""
    if not folder.is_dir():
        return [], []
    found, strays = [], []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit() and int(p.stem) > 0:
            found.append(int(p.stem))
        else:
            strays.append(p.name)
    return found, strays


def _open_rgb(source: Path | io.BytesIO) -> Image.Image:
    with Image.open(source) as image:
        image.load()  # decode fully now: a truncated file must fail here, not in a later batch
        return image.convert("RGB")


def _parquet_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    else:
        files = [Path(s) for s in source]
    if not files:
        raise DatasetError(f"no .parquet files in {source}")
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DatasetError(f"parquet shard(s) not found: {', '.join(absent)}")
    return files


def _check_columns(shard: Any, path: Path) -> None:
    names = set(shard.schema_arrow.names)
    if not {"image", "text"} <= names:
        raise DatasetError(f"{path} has columns {sorted(names)}; required: 'image' and 'text'")


def _has_theme_folder(path: Path, catalog: Catalog) -> bool:
    return any((path / theme).is_dir() for theme in catalog.themes)


def _check_key(catalog: Catalog, theme: str, obj: str, idx: int) -> None:
    catalog.style_label(theme)
    catalog.object_label(obj)
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 1:
        raise ValueError(f"image index must be a positive integer (1-based), got {idx!r}")


def _as_tuple(key: tuple[str, str, int] | ItemKey) -> tuple[str, str, int]:
    if isinstance(key, ItemKey):
        return key.theme, key.object, key.index
    if not (isinstance(key, tuple) and len(key) == 3):
        raise KeyError(f"a dataset item is (theme, object, index), got {key!r}")
    return key


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
