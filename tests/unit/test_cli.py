"""The `erase` command: a full run and apply on a saved tiny pipeline, and bad inputs as one-line errors."""

import json
import pickle

import pytest
import torch

from erase.cli import main
from erase.delta import Delta
from tests.unit.helpers import fresh_pipe, generate, save_tiny

FAST = ["--set", "steps=2", "--set", "ddim_steps=3", "--set", "lr=1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


class Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(pytest.evil_marker),))


def test_run_then_apply_end_to_end(tmp_path, model_dir, capsys):
    out = tmp_path / "esd"
    assert main(["run", "esd", "--model", str(model_dir), "--concept", "van gogh", "--out", str(out), *FAST]) == 0
    assert {p.name for p in out.iterdir()} == {"delta.safetensors", "delta.json", "record.json", "README.md"}
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["steps"] == 2 and len(record["losses"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["esd"], "no checkpoint or temp folder left behind"
    assert main(["apply", "--model", str(model_dir), "--delta", str(out), "--out", str(tmp_path / "full")]) == 0
    from diffusers import StableDiffusionPipeline

    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "full", local_files_only=True)
    exported.set_progress_bar_config(disable=True)
    erased = fresh_pipe()
    Delta.load(out).apply(erased)
    assert torch.equal(generate(exported), generate(erased))
    assert "esd" in capsys.readouterr().out


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    assert "esd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0


def _bad_inputs(tmp_path, model_dir):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    evil = tmp_path / "evil.ckpt"
    pytest.evil_marker = str(tmp_path / "EXECUTED")
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    other_delta = tmp_path / "other_delta"
    Delta({"unet.conv_in.bias": torch.zeros(16)}, {"base_fingerprint": "0123456789abcdef"}).save(other_delta)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    model, run = str(model_dir), ["run", "esd", "--concept", "van gogh", *FAST]
    return {
        "missing path": ([*run, "--model", str(tmp_path / "nope"), "--out", "{out}"], "nope"),
        "unknown method": (["run", "esdd", "--model", model, "--out", "{out}"], "unknown method 'esdd'"),
        "unknown variant": ([*run, "--model", model, "--set", "params=esd-q", "--out", "{out}"], "esd-q"),
        "empty concept": (["run", "esd", "--model", model, "--concept", " ", "--out", "{out}"], "concepts"),
        "negative steps": ([*run, "--model", model, "--set", "steps=-3", "--out", "{out}"], "steps"),
        "nan lr": ([*run, "--model", model, "--set", "lr=nan", "--out", "{out}"], "lr"),
        "bad --set": ([*run, "--model", model, "--set", "stepz=3", "--out", "{out}"], "stepz"),
        "corrupt safetensors": ([*run, "--model", str(corrupt), "--model-config", model, "--out", "{out}"],
                                "corrupt.safetensors"),
        "code-carrying pickle": ([*run, "--model", str(evil), "--model-config", model, "--out", "{out}"], "evil.ckpt"),
        "delta for another base": (["apply", "--model", model, "--delta", str(other_delta), "--out", "{out}"],
                                   "made on base model"),
        "unwritable output dir": ([*run, "--model", model, "--out", str(a_file / "sub" / "out")], "not writable"),
        "missing delta": (["apply", "--model", model, "--delta", str(tmp_path / "none"), "--out", "{out}"],
                          "no delta.safetensors"),
    }  # fmt: skip


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path, model_dir, capsys):
    work = tmp_path / "work"
    work.mkdir()
    for name, (argv, fragment) in _bad_inputs(tmp_path, model_dir).items():
        out = work / name.replace(" ", "_")
        argv = [a.replace("{out}", str(out)) for a in argv]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and fragment in err, f"{name}: {err!r}"
        assert "Traceback" not in err
        assert not list(work.iterdir()), f"{name}: left {list(work.iterdir())}"
    assert not (tmp_path / "EXECUTED").exists(), "the pickle's code ran"


def test_run_erases_several_concepts_and_refuses_one_twice(tmp_path, model_dir, capsys):
    out = tmp_path / "uce"
    argv = ["run", "uce", "--model", str(model_dir), "--concept", "van gogh", "--concept", "cat", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "record.json").read_text())["config"]["concepts"] == ["van gogh", "cat"]
    assert main([*argv[:-1], str(tmp_path / "again"), "--concept", "Cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "concepts must be distinct, got 'Cat' twice" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "again").exists()
