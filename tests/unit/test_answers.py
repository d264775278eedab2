"""Answer sets: naming, resumption with identical pixels, sharding equal to one run."""

import numpy as np
import pytest
from PIL import Image

from canvas import answers, catalog
from tests.unit.helpers import fresh_pipe

CAT = catalog.get("toy")
FAST = answers.SamplerPreset("test", steps=2, guidance=3.0)


def _items():
    return answers.answer_items(CAT, seeds=[188, 288], themes=CAT.themes[:3], objects=CAT.objects[:2])


def _pixels(directory, items):
    return {it.filename: np.asarray(Image.open(directory / it.filename)) for it in items}


def test_items_follow_unlearncanvas_naming():
    items = answers.answer_items(CAT)
    assert len(items) == len(CAT.themes) * len(CAT.objects) * 5
    assert items[0].filename == f"{CAT.themes[0]}_{CAT.objects[0]}_seed188.jpg"
    with pytest.raises(ValueError, match="not a theme"):
        answers.answer_items(CAT, themes=["Nope"])


def test_resume_regenerates_exactly_the_missing_images(tmp_path, monkeypatch):
    pipe, items = fresh_pipe(), _items()
    answers.generate(pipe, items, CAT, tmp_path, FAST, batch_size=4, progress=False)
    first = _pixels(tmp_path, items)
    removed = [items[1].filename, items[9].filename]
    for name in removed:
        (tmp_path / name).unlink()
    (tmp_path / items[5].filename).write_bytes(b"truncated")  # an unreadable image counts as missing
    removed.append(items[5].filename)
    untouched = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.jpg") if p.name not in removed}
    answers.generate(pipe, items, CAT, tmp_path, FAST, batch_size=4, progress=False)
    again = _pixels(tmp_path, items)
    assert all(np.array_equal(again[k], first[k]) for k in first), "regenerated images must be pixel-identical"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.jpg") if p.name not in removed} == untouched
    loaded_items, paths, manifest = answers.load_answer_set(tmp_path)
    assert loaded_items == items and manifest["sampler"]["steps"] == 2 and len(paths) == len(items)


def test_two_shards_equal_one_run(tmp_path):
    pipe, items = fresh_pipe(), _items()
    answers.generate(pipe, items, CAT, tmp_path / "one", FAST, batch_size=4, progress=False)
    for index in (0, 1):
        answers.generate(pipe, items, CAT, tmp_path / "two", FAST, batch_size=4, shard=(index, 2), progress=False)
    one, two = _pixels(tmp_path / "one", items), _pixels(tmp_path / "two", items)
    assert all(np.array_equal(one[k], two[k]) for k in one)


def test_shard_parsing():
    assert answers.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            answers.parse_shard(bad)
