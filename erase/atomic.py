"""Atomic file writes: write beside the target, then rename, so a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` on a temporary file in `path`'s folder (created if needed), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str | bytes) -> Path:
    mode = "wb" if isinstance(text, bytes) else "w"

    def write(tmp: str) -> None:
        with open(tmp, mode) as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


def save_image(image, path: str | os.PathLike, **options: Any) -> Path:
    """A PIL image saved atomically; the format follows the suffix (e.g. `quality=95` for JPEG)."""
    return atomic_write(path, lambda tmp: image.save(tmp, **options))


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill `tmp`, a new folder beside `out`; on success it is renamed to `out`.

    On any error the temporary folder is removed and `out` is untouched. `out` must be absent or an empty folder,
    unless `replace=True`, which swaps out an existing folder (moved aside first, removed after the swap).
    """
    path = Path(path)
    if path.exists() and not replace and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; choose a new output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            if replace:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            else:
                path.rmdir()
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
