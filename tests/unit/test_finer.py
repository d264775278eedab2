"""Finer-scale targets (`Pop_Art:Cats`): parsing, each method's inputs, FU / FR, the reduced answer set, the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import erase
from canvas import combination, finer, toy
from canvas.catalog import get
from canvas.cli import main
from canvas.combination import Combination, finer_scores, parse_combination
from canvas.method_inputs import combination_inputs
from erase.testing import tiny_pipeline

TOY = get("toy")
COMBO = Combination("Pop_Art", "Cats")


# ---------------------------------------------------------------------------------------------------- parsing


def test_a_combination_name_parses_into_its_style_and_object():
    combo = parse_combination(TOY, " Pop_Art : Cats ")
    assert combo == COMBO and combo.name == "Pop_Art:Cats"
    assert combination.is_combination("Pop_Art:Cats") and not combination.is_combination("Pop_Art")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Pop_Art", "malformed combination target 'Pop_Art'; accepted: <Style>:<Object>"),
        ("Pop_Art:Cats:Birds", "malformed combination target"),
        (":Cats", "malformed combination target"),
        ("Nope:Cats", "unknown style 'Nope'; accepted styles of catalog 'toy': Bricks"),
        ("Pop_Art:Dogs", "unknown object 'Dogs'; accepted objects of catalog 'toy': Architectures"),
        ("Seed_Images:Cats", "'Seed_Images' is the photo class, not a benchmark style"),
        ("Cats:Pop_Art", "names the object first; accepted: Pop_Art:Cats"),
    ],
)
def test_bad_combination_names_are_one_line_errors(name, fragment):
    with pytest.raises(ValueError) as err:
        parse_combination(TOY, name)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_combination_is_held_out_only_when_its_style_and_object_both_are():
    assert finer.combination_split(TOY, Combination("Sketch", "Birds")) == "held-out"
    assert finer.combination_split(TOY, Combination("Sketch", "Cats")) == "tuning"  # Cats is a tuning target
    assert finer.combination_split(TOY, Combination("Pop_Art", "Birds")) == "tuning"


# ---------------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return toy.export(tmp_path_factory.mktemp("data"), TOY, indices=range(1, 4))


def _cells(files):
    return {(Path(f).parent.parent.name, Path(f).parent.name) for f in files}


PROMPT = "A Cats image in Pop Art style."  # the template, spelled out independently of the code
ANCHOR = "A Cats image in Photo style."
ROW = {("Pop_Art", o) for o in TOY.objects if o != "Cats"}
COLUMN = {(t, "Cats") for t in TOY.themes if t != "Pop_Art"}  # the photo class included
KEPT = {
    TOY.template.format(object=o, style=t.replace("_", " ").replace("Seed Images", "Photo")) for t, o in ROW | COLUMN
}


@pytest.mark.parametrize("method", erase.available_methods())
def test_every_method_gets_combination_inputs_or_a_one_line_error(method, data_root):
    spec = erase.get_method(method)
    if set(spec.inputs) & {"trigger", "captions"}:
        with pytest.raises(ValueError) as err:
            combination_inputs(method, TOY, COMBO, data_root)
        assert str(err.value).startswith(f"{method} cannot erase a style-object combination (Pop_Art:Cats)")
        assert "\n" not in str(err.value)
        return
    values = combination_inputs(method, TOY, COMBO, data_root)
    preset = finer.finer_preset(finer.FinerConfig(methods=[method], targets=["Pop_Art:Cats"], out="x"), method)
    config = erase.make_config(method, preset, **values)  # a valid config on the preset a finer job uses
    if "concepts" in spec.inputs:
        assert config.concepts == [PROMPT]
    if "images" in spec.inputs:  # the one cell's images at the forget/retain indices
        assert _cells(values["images"]) == {("Pop_Art", "Cats")} and len(values["images"]) == 3
    if "forget_images" in spec.inputs:
        assert _cells(values["forget_images"]) == {("Pop_Art", "Cats")} and len(values["forget_images"]) == 3
        assert values["forget_prompts"] == [PROMPT] * 3 and values["pseudo_prompts"] == [ANCHOR] * 3
        assert _cells(values["retain_images"]) == ROW | COLUMN and len(values["retain_images"]) == 3 * 17
        assert set(values["retain_prompts"]) == KEPT
    for kept in ("domain_preserve", "preserve"):  # UCE / RECE / SPEED / MACE: the style row and the object column
        if kept in values:
            assert set(values[kept]) == KEPT and PROMPT not in values[kept]
            break
    if method == "advunlearn":
        assert set(values["retain_prompts"]) == KEPT
    for anchor in ("guides", "mappings"):
        if anchor in values:
            assert values[anchor] == [ANCHOR]


def test_methods_that_spell_prompts_train_on_the_combination_prompt(data_root):
    ca = erase.make_config("ca", "toy", **combination_inputs("ca", TOY, COMBO, data_root))
    assert ca.prompts() == [ANCHOR] and ca.target_prompt(ANCHOR, 0) == PROMPT  # Pop-Art Cats -> photo Cats
    fmn = erase.make_config("fmn", "toy", **combination_inputs("fmn", TOY, COMBO, data_root))
    assert fmn.prompt_pairs() == [(PROMPT, PROMPT)]
    speed = erase.make_config("speed", "toy", **combination_inputs("speed", TOY, COMBO, data_root))
    assert speed.anchors == [ANCHOR]


def test_user_values_win_and_image_methods_need_a_data_root():
    assert combination_inputs("uce", TOY, COMBO, None, {"preserve": ["x"]})["preserve"] == ["x"]
    with pytest.raises(ValueError, match="reads dataset images: give data_root"):
        combination_inputs("salun", TOY, COMBO, None)


# ---------------------------------------------------------------------------------------------------- FU / FR


def test_fu_and_fr_follow_their_definitions_on_hand_made_predictions():
    s, o = TOY.style_label, TOY.object_label
    # (theme, object, predicted style, predicted object), worked out by hand below
    images = [
        ("Pop_Art", "Cats", "Pop_Art", "Cats"),  # combination seen
        ("Pop_Art", "Cats", "Seed_Images", "Cats"),  # style gone: unlearned
        ("Pop_Art", "Cats", "Pop_Art", "Birds"),  # object gone: unlearned
        ("Pop_Art", "Cats", "Sketch", "Trees"),  # both gone: unlearned
        ("Pop_Art", "Birds", "Pop_Art", "Trees"),  # row: style kept (object does not count)
        ("Pop_Art", "Trees", "Sketch", "Trees"),  # row: style lost
        ("Sketch", "Cats", "Winter", "Cats"),  # column: object kept (style does not count)
        ("Seed_Images", "Cats", "Seed_Images", "Birds"),  # column (photo): object lost
        ("Winter", "Cats", "Winter", "Cats"),  # column: object kept
        ("Bricks", "Trees", "Bricks", "Birds"),  # other: style right, object wrong
    ]
    scores = finer_scores(
        TOY, COMBO, [i[0] for i in images], [i[1] for i in images],
        torch.tensor([s(i[2]) for i in images]), torch.tensor([o(i[3]) for i in images]),
    )  # fmt: skip
    assert scores.fu == pytest.approx(3 / 4)
    assert scores.fr_style == pytest.approx(1 / 2) and scores.fr_object == pytest.approx(2 / 3)
    assert scores.fr == pytest.approx((1 / 2 + 2 / 3) / 2) and scores.fr_other == pytest.approx((1 + 0) / 2)
    assert scores.counts == {"combination": 4, "style_row": 2, "object_column": 3, "other": 1}
    assert scores.percent()["FU"] == pytest.approx(75.0)
    logits = torch.nn.functional.one_hot(torch.tensor([s(i[2]) for i in images]), len(TOY.themes)).float()
    again = finer_scores(TOY, COMBO, [i[0] for i in images], [i[1] for i in images], logits,
                         torch.tensor([o(i[3]) for i in images]))  # fmt: skip
    assert again == scores  # scores (N, C) read as their argmax
    with pytest.raises(ValueError, match="no image of Pop_Art:Cats's object column"):
        finer_scores(TOY, COMBO, ["Pop_Art"] * 2, ["Cats", "Birds"], torch.zeros(2).long(), torch.zeros(2).long())


def test_the_reduced_answer_set_is_the_row_the_column_and_a_few_unrelated_cells():
    config = finer.FinerConfig(methods=["uce"], targets=["Pop_Art:Cats"], out="x", seeds=[188, 288])
    items = finer.finer_items(config, COMBO)
    cells = [(it.theme, it.object) for it in items[::2]]
    assert [it.seed for it in items] == [188, 288] * (len(TOY.objects) + len(TOY.themes) - 1 + 4)
    assert {("Pop_Art", "Cats")} | ROW | COLUMN <= set(cells)
    other = [c for c in cells if c[0] != "Pop_Art" and c[1] != "Cats"]
    assert len(other) == 4 == len(set(other)) and all(t in TOY.styles for t, _ in other)
    order = [(TOY.style_label(t), TOY.object_label(o)) for t, o in cells]
    assert order == sorted(order) and len(set(cells)) == len(cells)
    with pytest.raises(ValueError, match="other cells must be an integer in 0..7, got 8"):
        finer.FinerConfig(methods=["uce"], targets=["Pop_Art:Cats"], out="x", other_cells=8)


# ---------------------------------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pipeline whose tokenizer knows every word of the toy prompts (a combination's concept is a whole
    prompt, which a character-level spelling would push past the tiny tokenizer's length)."""
    words = {w.strip(".") for t in TOY.themes for o in TOY.objects for w in TOY.prompt(t, o).split()}
    pipe = tiny_pipeline(0, words=tuple(sorted(words)))
    path = tmp_path_factory.mktemp("tiny") / "model"
    pipe.save_pretrained(path)
    return path


def test_finer_runs_resumes_and_records_failing_jobs(tmp_path, model_dir, monkeypatch, capsys):
    calls = []
    real_run = erase.run

    def counting_run(pipe, config, **kw):
        calls.append(type(config).__name__)
        return real_run(pipe, config, **kw)

    monkeypatch.setattr(erase, "run", counting_run)
    argv = ["finer", "--methods", "uce,skd-cag", "--targets", "Sketch:Birds", "--out", str(tmp_path),
            "--model", str(model_dir), "--catalog", "toy", "--sampler", "toy", "--seeds", "188",
            "--other-cells", "2", "--no-progress"]  # fmt: skip
    assert main(argv) != 0  # skd-cag cannot erase a combination: its job fails, uce's finishes
    out = capsys.readouterr().out
    assert "| uce | Sketch:Birds | held-out |" in out and "| none | Sketch:Birds | held-out |" in out
    assert "FAILED skd-cag / Sketch:Birds: ValueError: skd-cag cannot erase" in out
    error = json.loads((tmp_path / "jobs" / "skd-cag__Sketch__Birds" / "error.json").read_text())
    assert error["target"] == "Sketch:Birds"
    row = json.loads((tmp_path / "jobs" / "uce__Sketch__Birds" / "metrics.json").read_text())
    assert row["counts"] == {"combination": 1, "style_row": 7, "object_column": 10, "other": 2}
    assert row["FR"] == pytest.approx((row["FR_style"] + row["FR_object"]) / 2)
    assert (tmp_path / "grids" / "uce__Sketch__Birds.png").is_file()
    assert calls == ["UCEConfig"]
    main(argv)  # resumed: the finished job is not erased again
    assert calls == ["UCEConfig"]
    config = finer.FinerConfig(methods=["uce"], targets=["Sketch:Birds"], out=str(tmp_path), model=str(model_dir),
                               catalog="toy", sampler="toy", seeds=[188], other_cells=2,
                               overrides={"uce": {"erase_scale": 2.0}})  # fmt: skip
    finer.Finer(config, progress=False).run()  # other inputs: the job is redone
    assert calls == ["UCEConfig", "UCEConfig"]
    with pytest.raises(ValueError, match="holds images of other inputs"):  # another seed list, same folder
        finer.Finer(
            finer.FinerConfig(
                methods=["uce"],
                targets=["Sketch:Birds"],
                out=str(tmp_path),
                model=str(model_dir),
                catalog="toy",
                sampler="toy",
                seeds=[288],
                other_cells=2,
            ),
            progress=False,
        ).run()
