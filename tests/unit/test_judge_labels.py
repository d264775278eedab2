"""scripts/judge_labels.py: which images of a target an answer set holds, and how the judge's labels are counted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from canvas import catalog as catalogs
from canvas.answers import AnswerItem

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "judge_labels.py"
spec = importlib.util.spec_from_file_location("judge_labels", SCRIPT)
judge_labels = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = judge_labels  # its dataclass looks its module up there
spec.loader.exec_module(judge_labels)

CAT = catalogs.get("toy")


def test_target_cells_are_the_object_in_every_theme_or_the_style_on_every_object():
    cells = judge_labels.target_cells(CAT, "Birds", [188, 288])
    assert {(it.theme, it.seed) for it in cells} == {(t, s) for t in CAT.themes for s in (188, 288)}
    assert {it.object for it in cells} == {"Birds"} and len(cells) == len(CAT.themes) * 2
    style = judge_labels.target_cells(CAT, "Mosaic", [188])
    assert {it.object for it in style} == set(CAT.objects) and {it.theme for it in style} == {"Mosaic"}
    with pytest.raises(ValueError, match="unknown target 'Dogs'"):
        judge_labels.target_cells(CAT, "Dogs", [188])


def test_count_labels_keeps_the_target_apart_and_names_the_cells_still_showing_it():
    items = [AnswerItem("Bricks", "Birds", 188), AnswerItem("Bricks", "Birds", 288),
             AnswerItem("Crayon", "Birds", 188), AnswerItem("Winter", "Birds", 188)]  # fmt: skip
    labels = ["Birds", "Butterfly", "Birds", "Butterfly"]
    result = judge_labels.count_labels("x", CAT, "Birds", items, labels)
    assert (result.kept, result.total) == (2, 4)
    assert result.others == {"Butterfly": 2}
    assert result.still == ["Bricks", "Crayon"]
    style_items = [AnswerItem("Mosaic", "Cats", 188), AnswerItem("Mosaic", "Trees", 188)]
    style = judge_labels.count_labels("y", CAT, "Mosaic", style_items, ["Mosaic", "Sketch"])
    assert (style.kept, style.others, style.still) == (1, {"Sketch": 1}, ["Cats"])
    with pytest.raises(ValueError, match="2 items but 1 labels"):
        judge_labels.count_labels("z", CAT, "Mosaic", style_items, ["Mosaic"])
