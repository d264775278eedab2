"""Read UnlearnCanvas images from the folder layout or from parquet shards (`canvas.validation` checks a copy).

Folder layout: `<root>/<Theme>/<Object>/<idx>.jpg` (the photo class is the theme `Seed_Images`).
Parquet layout (the Hugging Face copy): columns `image` (bytes, or a `{"bytes": ...}` struct) and `text`, the caption
`A {object} image in {style words} style.`; theme and object are parsed back from the caption, and the index is the
row's position among rows of the same (theme, object), 1-based, in shard-name then row order (the copy keeps no file
names). Both readers answer `dataset[theme, object, idx] -> PIL.Image` so everything downstream ignores the layout;
`as_folder` gives consumers that take image file paths (data-driven methods) a folder of either layout's images.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from canvas.catalog import Catalog, style_words
from erase.atomic import atomic_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SOURCE_RECORD = "source.json"  # in an `as_folder` copy: what it was written from
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
    theme_words, obj_words = caption_words(caption)
    theme = themes_by_words(catalog).get(norm_words(theme_words))
    obj = {norm_words(o): o for o in catalog.objects}.get(norm_words(obj_words))
    if theme is None:
        raise ValueError(f"caption {caption!r} names style {theme_words!r}, not a theme of catalog {catalog.name!r}")
    if obj is None:
        raise ValueError(f"caption {caption!r} names object {obj_words!r}, not an object of catalog {catalog.name!r}")
    return theme, obj


def caption_words(caption: Any) -> tuple[str, str]:
    """(style words, object words) of a caption of the benchmark's form; a ValueError otherwise."""
    match = _CAPTION.match(caption) if isinstance(caption, str) else None
    if match is None:
        raise ValueError(f"caption {caption!r} is not of the form 'A {{object}} image in {{style}} style.'")
    return match["style"], match["object"]


def norm_words(words: str) -> str:
    """Words compared case- and spacing-blind, underscores as spaces (`Pop_Art` = `pop art`)."""
    return " ".join(words.replace("_", " ").split()).casefold()


def themes_by_words(catalog: Catalog) -> dict[str, str]:
    """Normalised style words (and theme names) -> theme."""
    table = {norm_words(style_words(t, catalog.photo)): t for t in catalog.themes}
    table.update({norm_words(t): t for t in catalog.themes})  # `Seed Images` is accepted for the photo class too
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

    @property
    def identity(self) -> str:
        """What the images are read from, for cache keys: the resolved root folder."""
        return f"folder:{self.root.resolve()}"

    def read_order(self, keys: Iterable[ItemKey]) -> list[ItemKey]:
        """`keys` in the order cheapest to read: files cost the same in any order, so as given."""
        return list(keys)

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
                keys.extend(ItemKey(theme, obj, i) for i in folder_indices(self.root / theme / obj)[0])
        return sorted(set(keys))

    def load(self, theme: str, obj: str, idx: int) -> Image.Image:
        path = self.path(theme, obj, idx)
        if not path.is_file():
            raise KeyError(f"no image {path}")
        return open_rgb(path)

    def __getitem__(self, key: tuple[str, str, int] | ItemKey) -> Image.Image:
        return self.load(*_as_tuple(key))

    def __iter__(self) -> Iterator[tuple[ItemKey, Image.Image]]:
        for key in self.keys():
            yield key, self.load(key.theme, key.object, key.index)

    def __len__(self) -> int:
        return len(self.keys())


def parquet_module():
    """pyarrow.parquet, an optional dependency that only parquet data sets need."""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ValueError("reading parquet shards needs pyarrow: pip install 'erasekit[canvas]'") from None


class ParquetDataset:
    """Parquet shards with `image` and `text` columns; rows are indexed once from the captions, images load lazily.

    Rows whose caption cannot be parsed, or names a theme/object outside the catalog, are left out of the index and
    listed in `skipped` as (shard, row, reason); `validate` reports them.
    """

    layout = "parquet"

    def __init__(self, source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], catalog: Catalog) -> None:
        pq = parquet_module()
        self.catalog = catalog
        self.files = parquet_files(source)
        self._sources = [_source_record(path) for path in self.files]  # before indexing: a later rewrite is noticed
        self._index: dict[ItemKey, tuple[int, int, int]] = {}
        self.skipped: list[tuple[str, int, str]] = []
        self._cached: tuple[tuple[int, int], list[Any]] | None = None
        counters: Counter[tuple[str, str]] = Counter()
        for f, path in enumerate(self.files):
            shard = pq.ParquetFile(path)
            check_columns(shard, path)
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

    def sources(self) -> list[dict[str, Any]]:
        """Each shard's resolved path, size and modification time when it was indexed: a rewritten shard reads as a
        new source without hashing gigabytes of images."""
        return [dict(record) for record in self._sources]

    @property
    def identity(self) -> str:
        """What the images are read from, for cache keys: the shards (`sources`) and the catalog numbering the rows."""
        record = json.dumps({"sources": self.sources(), "catalog": self.catalog.name}, sort_keys=True)
        return "parquet:" + hashlib.sha256(record.encode()).hexdigest()[:16]

    def read_order(self, keys: Iterable[ItemKey]) -> list[ItemKey]:
        """`keys` in storage order, so each row group is read and decompressed once."""
        return sorted(keys, key=lambda k: self._locate(k.theme, k.object, k.index))

    def raw(self, theme: str, obj: str, idx: int) -> bytes:
        """The image's bytes as stored (usually a JPEG file), for writing it out without re-encoding."""
        f, group, row = self._locate(theme, obj, idx)
        return cell_bytes(self._row_group_images(f, group)[row], f"{self.files[f]} row group {group} row {row}")

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
        pq = parquet_module()
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


Dataset = FolderDataset | ParquetDataset


def _source_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def layout_of(source: str | os.PathLike[str], catalog: Catalog) -> Literal["folder", "parquet"]:
    """`parquet` for a parquet file or a folder of shards without theme folders, else `folder`."""
    path = Path(source)
    shards = path.is_dir() and any(path.glob("*.parquet")) and not any((path / t).is_dir() for t in catalog.themes)
    return "parquet" if path.is_file() or shards else "folder"


def open_dataset(source: str | os.PathLike[str], catalog: Catalog) -> Dataset:
    """A reader for `source`: a parquet file, or a folder of parquet shards, or the folder layout."""
    if layout_of(source, catalog) == "parquet":
        return ParquetDataset(source, catalog)
    return FolderDataset(source, catalog)


def as_folder(dataset: Dataset, keys: Iterable[ItemKey], cache_root: str | os.PathLike[str]) -> Path:
    """A root `<root>/<Theme>/<Object>/<idx>.jpg` holding the images `keys`, for consumers of image file paths.

    A folder dataset is its own root. Parquet images are written once into `cache_root/parquet-<digest>`, the digest
    of the shards (`sources`), the catalog and the keys: byte for byte as stored, not re-encoded (a non-JPEG cell
    keeps its format under the `.jpg` name; PIL reads files by content), atomically, and reused only when the
    folder's record says it was written from the same shards and keys. Concurrent writers (one per process) agree:
    the first to finish wins and the others use its folder.
    """
    if isinstance(dataset, FolderDataset):
        return dataset.root
    wanted = sorted(set(keys))
    record = {"sources": dataset.sources(), "catalog": dataset.catalog.name, "keys": [astuple(k) for k in wanted]}
    record = json.loads(json.dumps(record))  # tuples as lists, as read back from the file
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root) / f"parquet-{digest}"
    if _written_from(folder, record):
        return folder
    try:
        with atomic_dir(folder, replace=folder.exists()) as tmp:
            for key in dataset.read_order(wanted):
                path = tmp / key.theme / key.object / f"{key.index}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(dataset.raw(key.theme, key.object, key.index))
            (tmp / SOURCE_RECORD).write_text(json.dumps(record, sort_keys=True))
    except OSError:
        if not _written_from(folder, record):  # not another process's finished copy: a real failure
            raise
    return folder


def _written_from(folder: Path, record: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / SOURCE_RECORD).read_text()) == record
    except (OSError, ValueError):
        return False


def cell_bytes(cell: Any, where: str = "image") -> bytes:
    """The bytes of a parquet `image` cell (raw bytes, or a struct with `bytes`); errors name the cell."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DatasetError(f"{where}: image cell holds {type(data).__name__}; accepted: bytes or {{'bytes': ...}}")
    return bytes(data)


def decode_image(cell: Any, where: str = "image") -> Image.Image:
    """A parquet `image` cell (raw bytes, or a struct with `bytes`) as an RGB image; errors name the cell."""
    return open_rgb(io.BytesIO(cell_bytes(cell, where)))


# ---------------------------------------------------------------------------------------------------- helpers


def folder_indices(folder: Path) -> tuple[list[int], list[str]]:
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


def open_rgb(source: Path | io.BytesIO) -> Image.Image:
    """An RGB image decoded in full now: a truncated file must fail here, not in a later batch."""
    with Image.open(source) as image:
        image.load()  # decode fully now: a truncated file must fail here, not in a later batch
        return image.convert("RGB")


def parquet_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The shards of a parquet file, a folder (searched recursively, sorted) or a list; missing ones are an error."""
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


def check_columns(shard: Any, path: Path) -> None:
    """A shard must have the `image` and `text` columns."""
    names = set(shard.schema_arrow.names)
    if not {"image", "text"} <= names:
        raise DatasetError(f"{path} has columns {sorted(names)}; required: 'image' and 'text'")


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
