"""What a wheel ships: every file of assets/ is package data (so an installed toolkit finds the toy), and the
code finds the assets through the installed package, not through the repository's layout."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from erase import paths

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]


def test_every_asset_file_is_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"][paths.ASSETS_PACKAGE] == "assets"
    patterns = setuptools["package-data"][paths.ASSETS_PACKAGE]
    files = [p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()]
    shipped = [
        f for f in files if f.endswith(".py") or any(fnmatch.fnmatch(f, p.replace("**/", "*")) for p in patterns)
    ]
    missing = sorted(set(files) - set(shipped) - {f for f in files if "__pycache__" in f})
    assert not missing, f"assets a wheel would leave out: {missing}"


def test_assets_are_found_through_the_package(monkeypatch, tmp_path):
    assert (paths.assets_dir() / "toy" / "model_index.json").is_file()
    assert (paths.splits_dir() / "unlearncanvas-v1.json").is_file()
    monkeypatch.setenv(paths.TOY_ENV, str(tmp_path / "build" / "toy"))
    assert paths.toy_path() == tmp_path / "build" / "toy"
    assert paths.toy_classifiers_path() == tmp_path / "build" / "toy_classifiers"  # $ERASEKIT_TOY moves both
