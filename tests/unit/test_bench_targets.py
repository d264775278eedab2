"""Which targets a bench runs: names and keywords (`resolve_targets`), from the command line and YAML; the Inception
variant's validation; finished rows of older benches read under today's split and feature-space names."""

import json
from dataclasses import replace

import pytest

from canvas import bench, splits, targets
from canvas.catalog import TOY_OBJECTS, TOY_STYLES, get
from canvas.cli import main

TOY = get("toy")
TUNING = ("Pop_Art", "Watercolor", "Cats", "Towers")  # written in the shipped manifest


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["styles"], list(TOY_STYLES)),
        (["objects"], list(TOY_OBJECTS)),
        (["all"], [*TOY_STYLES, *TOY_OBJECTS]),
        (["tuning"], list(TUNING)),
        (["Cats", "tuning"], ["Cats", "Pop_Art", "Watercolor", "Towers"]),  # order kept, each target once
        (["held-out,Cats"], [t for t in (*TOY_STYLES, *TOY_OBJECTS) if t not in TUNING] + ["Cats"]),
        (["Sketch", "objects", "Sketch"], ["Sketch", *TOY_OBJECTS]),
    ],
)
def test_resolve_targets(specs, expected):
    got = targets.resolve_targets(TOY, specs)
    assert got == expected
    assert len(got) == len(set(got))


def test_held_out_keyword_is_every_target_but_the_tuning_ones():
    held_out = set(targets.resolve_targets(TOY, ["held-out"]))
    assert held_out == set(TOY_STYLES + TOY_OBJECTS) - set(TUNING)
    assert held_out | set(targets.resolve_targets(TOY, ["tuning"])) == set(targets.resolve_targets(TOY, ["all"]))
    assert all(splits.target_split(TOY, t) == "held-out" for t in held_out)


@pytest.mark.parametrize(
    ("specs", "fragment"),
    [
        (["Nope"], "unknown target 'Nope'; accepted: the keywords styles, objects, all, tuning, held-out, or a style "
                   "or object of catalog 'toy': Bricks, "),
        (["Style"], "unknown target 'Style'"),
        (["Seed_Images"], "the photo class is not a benchmark style"),
        ([" , "], "no targets given"),
    ],
)  # fmt: skip
def test_unknown_target_words_are_one_line(specs, fragment):
    with pytest.raises(ValueError) as err:
        targets.resolve_targets(TOY, specs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


class _FakeBench:
    """Stands in for the bench: records the config the command line built, runs nothing."""

    configs: list = []

    def __init__(self, config, progress=True):
        self.configs.append(config)

    def run(self):
        return {"rows": [], "failed": [], "fid_features": "toy-style-features"}


def test_keywords_from_the_command_line_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "Bench", _FakeBench)
    out = str(tmp_path / "b")
    assert main(["bench", "--methods", "esd", "--targets", "tuning,Sketch", "--out", out]) == 0
    assert _FakeBench.configs[-1].targets == ["Pop_Art", "Watercolor", "Cats", "Towers", "Sketch"]
    for value in ("held-out", ["objects", "Pop_Art"]):
        yaml_file = tmp_path / "bench.yaml"
        yaml_file.write_text(json.dumps({"methods": ["esd"], "targets": value, "out": out}))  # JSON is YAML
        assert main(["bench", "--config", str(yaml_file)]) == 0
        expected = targets.resolve_targets(TOY, [value] if isinstance(value, str) else value)
        assert _FakeBench.configs[-1].targets == expected
    assert _FakeBench.configs[-1].targets == [*TOY_OBJECTS, "Pop_Art"]


def test_inception_variant_needs_weights_and_defaults_to_tf2015(tmp_path, capsys):
    def config(**kw):
        return bench.BenchConfig(methods=["esd"], targets=["Sketch"], out=str(tmp_path), **kw)

    assert config().inception_variant is None
    assert config(inception="w.pth").inception_variant == "tf2015"
    assert config(inception="w.pth", inception_variant="torchvision").inception_variant == "torchvision"
    with pytest.raises(ValueError, match="needs Inception weights"):
        config(inception_variant="torchvision")
    with pytest.raises(ValueError, match="unknown Inception variant 'tf'; accepted: tf2015, torchvision"):
        config(inception="w.pth", inception_variant="tf")
    argv = ["bench", "--methods", "esd", "--targets", "Sketch", "--out", str(tmp_path), "--inception-variant"]
    assert main([*argv, "torchvision"]) == 2
    assert "needs Inception weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "keras"])  # argparse's choices


def test_rows_of_an_older_bench_get_their_split_and_todays_feature_space(tmp_path):
    runner = bench.Bench(bench.BenchConfig(methods=["esd"], targets=["Cats"], out=str(tmp_path)))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"method": "esd", "target": "Cats", "fid_features": "toy-style-classifier-head-input"}))
    row = runner.stored_row(path, "Cats")
    assert row["split"] == "tuning" and row["fid_features"] == "toy-style-features"


def test_a_manifest_without_target_splits_stops_the_bench_before_any_job(tmp_path, monkeypatch):
    old = replace(splits.unlearncanvas_v1(), tuning_targets=None)
    monkeypatch.setattr(splits, "load", lambda name=splits.DEFAULT_NAME: old)
    monkeypatch.setattr(bench.Bench, "load_base", lambda self: pytest.fail("the model was loaded"))
    runner = bench.Bench(bench.BenchConfig(methods=["esd"], targets=["Sketch"], out=str(tmp_path / "b")))
    with pytest.raises(splits.SplitsError, match="predates tuning targets"):
        runner.run()
    assert not (tmp_path / "b" / "jobs").exists()
