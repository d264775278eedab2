"""Where things live on disk: the shipped assets (the toy pipeline, its classifiers, the split manifests) and the
per-user cache folders. One place, so `$ERASEKIT_TOY` and `$ERASEKIT_CACHE` mean the same thing to every reader."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

TOY_ENV = "ERASEKIT_TOY"
CACHE_ENV = "ERASEKIT_CACHE"
ASSETS_PACKAGE = "erasekit_assets"  # the top-level assets/ folder, installed as package data


def assets_dir() -> Path:
    """The shipped assets folder (`assets/` of the repository, or its installed copy)."""
    return Path(str(resources.files(ASSETS_PACKAGE)))


def toy_path() -> Path:
    """Folder of the built-in toy pipeline: `$ERASEKIT_TOY` if set, else the shipped `assets/toy`."""
    override = os.environ.get(TOY_ENV)
    return Path(override).expanduser() if override else assets_dir() / "toy"


def toy_classifiers_path() -> Path:
    """The toy's style/object classifiers, beside the toy in use (`$ERASEKIT_TOY` moves both)."""
    return toy_path().parent / "toy_classifiers"


def splits_dir() -> Path:
    """The shipped split manifests."""
    return assets_dir() / "splits"


def cache_dir(kind: str, override: str | os.PathLike | None = None) -> Path:
    """The cache folder of one kind of artefact (e.g. "ca" anchor images): `override` when given, else
    `$ERASEKIT_CACHE/<kind>`, else `$XDG_CACHE_HOME/erasekit/<kind>` (`~/.cache/erasekit/<kind>`)."""
    if override:
        return Path(override).expanduser()
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "erasekit"
    return Path(root).expanduser() / kind
