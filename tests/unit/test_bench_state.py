"""A bench or answer folder is reused only by the inputs that made it, a bench that failed exits non-zero, and
everything checkable is checked before the first job."""

from __future__ import annotations

import json

import pytest
import yaml

from canvas import answers, bench
from canvas.cli import main
from erase.delta import Delta
from erase.lock import exclusive
from tests.unit.helpers import fresh_pipe, save_tiny

FAST = {"steps": 2, "ddim_steps": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny(root / "a", seed=0), save_tiny(root / "b", seed=1)


def bench_yaml(tmp_path, model, out, **extra) -> list[str]:
    values = {
        "methods": ["esd"], "targets": ["Pop_Art"], "out": str(out), "model": str(model), "catalog": "toy",
        "sampler": "toy", "seeds": [188], "overrides": {"esd": FAST}, "presets": {"esd": "paper"}, "batch_size": 64,
        **extra,
    }  # fmt: skip
    path = tmp_path / f"bench-{len(list(tmp_path.glob('bench-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["bench", "--config", str(path), "--no-progress"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_finished_bench_folder_refuses_another_model(tmp_path, models, capsys):
    a, b = models
    out = tmp_path / "out"
    assert main(bench_yaml(tmp_path, a, out)) == 0
    before = (out / "report.json").read_text()
    assert main(bench_yaml(tmp_path, b, out)) == 2
    assert "base_fingerprint" in one_line(capsys)
    assert (out / "report.json").read_text() == before, "the old rows were not relabelled"
    assert main(bench_yaml(tmp_path, a, out, seeds=[288])) == 2
    assert "seeds" in one_line(capsys)


def test_a_job_whose_erasure_came_from_other_values_is_redone(tmp_path, models, capsys):
    a, _ = models
    out = tmp_path / "out"
    assert main(bench_yaml(tmp_path, a, out)) == 0
    first = json.loads((out / "jobs" / "esd__Pop_Art" / "delta" / "record.json").read_text())
    assert main(bench_yaml(tmp_path, a, out, overrides={"esd": {**FAST, "lr": 2e-3}})) == 0
    assert "redoing it" in capsys.readouterr().out
    again = json.loads((out / "jobs" / "esd__Pop_Art" / "delta" / "record.json").read_text())
    assert again["config"]["lr"] == 2e-3 and again["run_key"] != first["run_key"]
    assert json.loads((out / "report.json").read_text())["rows"][0]["steps"] == 2


def test_a_bench_whose_jobs_all_fail_exits_non_zero_and_says_where(tmp_path, models, capsys):
    a, _ = models
    out = tmp_path / "out"
    assert main(bench_yaml(tmp_path, a, out, overrides={"esd": {**FAST, "concepts": ["van gogh " * 20]}})) == 1
    captured = capsys.readouterr()
    assert "FAILED esd / Pop_Art" in captured.out and "report: " not in captured.out
    assert "1 of 1 jobs failed" in captured.err and str(out / "jobs") in captured.err


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ({"seeds": ["x"]}, "seeds must be"),
        ({"seeds": [True]}, "seeds must be"),
        ({"batch_size": -4}, "batch_size must be a positive integer"),
        ({"presets": {"esd": "nope"}}, "unknown preset 'nope'"),
        ({"overrides": {"esdd": {}}}, "overrides must map method names"),
        ({"data": "/nonexistent/data"}, "/nonexistent/data"),
        ({"classifiers": "/nonexistent/clf"}, "/nonexistent/clf"),
    ],
)
def test_bad_bench_values_are_refused_before_any_job(tmp_path, models, capsys, extra, fragment):
    a, _ = models
    out = tmp_path / "out"
    assert main(bench_yaml(tmp_path, a, out, **extra)) == 2
    if "data" in extra:  # a data set's validation lists every problem it found, one per line after the first
        err = capsys.readouterr().err
        assert fragment in err.splitlines()[0] and "Traceback" not in err
    else:
        assert fragment in one_line(capsys)
    assert not (out / "jobs").exists(), "no job started"


def test_a_missing_model_is_found_before_any_job(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(bench_yaml(tmp_path, tmp_path / "no-model", out)) == 2
    assert "no-model" in one_line(capsys)
    assert not (out / "jobs").exists()


def test_a_malformed_bench_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("methods: [esd\n")
    assert main(["bench", "--config", str(path)]) == 2
    assert "bad.yaml" in one_line(capsys)


def test_a_second_bench_on_one_folder_is_refused(tmp_path, models, capsys):
    a, _ = models
    out = tmp_path / "out"
    with exclusive(out):
        assert main(bench_yaml(tmp_path, a, out)) == 1
    assert "being written by another process" in one_line(capsys)


def test_an_answer_folder_refuses_another_delta(tmp_path, models):
    a, _ = models
    cat = bench.catalogs.get("toy")
    items = answers.answer_items(cat, [188])[:2]
    sampler = answers.preset("toy")
    pipe = fresh_pipe()
    answers.generate(pipe, items, cat, tmp_path / "ans", sampler, shard=(0, 1), progress=False,
                     identity=answers.answer_identity(pipe))  # fmt: skip
    delta = Delta({"unet.conv_in.bias": pipe.unet.conv_in.bias.detach() + 1}, {})
    with pytest.raises(ValueError, match="holds images of other inputs"):
        answers.generate(pipe, items, cat, tmp_path / "ans", sampler, shard=(0, 1), progress=False,
                         identity=answers.answer_identity(pipe, delta))  # fmt: skip
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        answers.generate(pipe, items, cat, tmp_path / "other", sampler, batch_size=-4, shard=(0, 1))
    assert not (tmp_path / "other").exists()


def test_backdoor_eval_keeps_a_zero_threshold(tmp_path, monkeypatch):
    seen = {}
    result = {"attack_success": 0.0, "clean_style_acc": 1.0, "clean_object_acc": 1.0}
    monkeypatch.setattr("canvas.backdoor.evaluate", lambda *a, **k: seen.update(k) or result)
    args = ["backdoor-eval", "--model", "toy", "--trigger", "tq", "--kind", "pixel", "--out", str(tmp_path / "e")]
    main([*args, "--threshold", "0"])
    assert seen.get("threshold") == 0.0
