"""State that outlives a command: checkpoints resume only their own run, a diverged run is never resumed, one writer
per output, and a result that trained but could not be written is kept, not lost."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import erase
from erase import train
from erase.cli import main
from erase.delta import Delta
from erase.lock import exclusive
from erase.paths import cache_dir
from tests.unit.helpers import fresh_pipe, save_tiny, small_esd

FAST = ["--set", "steps=4", "--set", "ddim_steps=3", "--set", "lr=1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))


def run_args(model_dir, out, concept="van gogh", *extra):
    return ["run", "esd", "--model", str(model_dir), "--concept", concept, "--out", str(out), *FAST, *extra]


def interrupt_at(monkeypatch, step: int):
    """Ctrl-C while step `step` is being computed (the sample seeds of a step are drawn at its start)."""
    real = train.sample_seed

    def seed(s, k, i):
        if k == step:
            raise KeyboardInterrupt
        return real(s, k, i)

    monkeypatch.setattr(train, "sample_seed", seed)
    return real


def test_ctrl_c_then_the_same_command_resumes_bit_identically(tmp_path, model_dir, monkeypatch, capsys):
    assert main(run_args(model_dir, tmp_path / "whole")) == 0
    real = interrupt_at(monkeypatch, 2)
    assert main(run_args(model_dir, tmp_path / "cut")) == 130
    assert "resumes after the steps it had finished" in capsys.readouterr().err
    assert not (tmp_path / "cut").exists()
    monkeypatch.setattr(train, "sample_seed", real)
    assert main(run_args(model_dir, tmp_path / "cut")) == 0
    record = json.loads((tmp_path / "cut" / "record.json").read_text())
    assert record["resumed_from_step"] == 2 and len(record["losses"]) == 4
    whole, cut = Delta.load(tmp_path / "whole"), Delta.load(tmp_path / "cut")
    assert all(torch.equal(whole.tensors[k], cut.tensors[k]) for k in whole.tensors)
    assert not list((tmp_path / "cache" / "runs").iterdir()), "the run's folder is removed once written"


def test_another_config_never_resumes_a_foreign_checkpoint(tmp_path, model_dir, monkeypatch):
    real = interrupt_at(monkeypatch, 2)
    assert main(run_args(model_dir, tmp_path / "out")) == 130
    monkeypatch.setattr(train, "sample_seed", real)
    assert main(run_args(model_dir, tmp_path / "out", "cat", "--set", "lr=2e-3")) == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["resumed_from_step"] == 0 and record["config"]["concepts"] == ["cat"]
    assert record["config"]["lr"] == 2e-3


def test_the_library_refuses_a_checkpoint_of_another_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _interrupted_run(tmp_path)
    with pytest.raises(ValueError, match="belongs to another run"):
        erase.run(fresh_pipe(), small_esd(steps=3, lr=5e-4), checkpoint_dir=tmp_path, progress=False)
    resumed = erase.run(fresh_pipe(), small_esd(steps=3), checkpoint_dir=tmp_path, progress=False)
    assert resumed.record["resumed_from_step"] == 1


def _interrupted_run(folder):
    """An ESD run interrupted in its second step, with its first kept in `folder`."""
    real = train.sample_seed
    train.sample_seed = lambda s, k, i: (_ for _ in ()).throw(KeyboardInterrupt) if k == 1 else real(s, k, i)
    try:
        erase.run(fresh_pipe(), small_esd(steps=3), checkpoint_dir=folder, progress=False)
    finally:
        train.sample_seed = real


def test_a_diverged_run_is_never_resumed_into_the_same_failure(tmp_path, model_dir, capsys):
    diverge = run_args(model_dir, tmp_path / "out", "van gogh", "--set", "lr=1e30")
    assert main(diverge) == 1
    assert "non-finite" in capsys.readouterr().err
    assert main(diverge) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would fail the same way" in err, err
    assert main(run_args(model_dir, tmp_path / "out")) == 0  # a sane lr is another run: it starts afresh


def test_a_second_writer_of_one_output_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    with exclusive(out):
        assert main(run_args(model_dir, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "being written by another process" in err
    assert not out.exists()
    assert main(run_args(model_dir, out)) == 0  # released: and no stale lock file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


def full_disk_under(monkeypatch, *roots):
    """Writing a Delta anywhere below one of `roots` fails as a full disk would."""
    real = Delta.save

    def save(self, directory):
        if any(root in directory.parents for root in roots):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory)

    monkeypatch.setattr(Delta, "save", save)
    return real


def test_a_trained_result_that_cannot_be_written_is_kept_and_written_by_the_rerun(tmp_path, model_dir, monkeypatch,
                                                                                   capsys):  # fmt: skip
    out = tmp_path / "disk" / "out"
    real = full_disk_under(monkeypatch, out.parent)
    assert main(run_args(model_dir, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "kept in" in err, err
    assert not (tmp_path / "disk").exists() or not list((tmp_path / "disk").iterdir()), "debris beside --out"
    monkeypatch.setattr(Delta, "save", real)
    calls = []
    monkeypatch.setattr(erase.runner, "run", lambda *a, **k: calls.append(1))
    assert main(run_args(model_dir, out)) == 0
    assert not calls and "without retraining" in capsys.readouterr().out
    assert len(json.loads((out / "record.json").read_text())["losses"]) == 4


def test_a_result_that_can_be_neither_written_nor_kept_says_it_is_lost(tmp_path, model_dir, monkeypatch, capsys):
    out = tmp_path / "disk" / "out"
    full_disk_under(monkeypatch, out.parent, cache_dir("runs"))
    assert main(run_args(model_dir, out)) == 1
    assert "the trained result is lost" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_train_over_fp32_master_weights(dtype):
    pipe = fresh_pipe()
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    result = erase.run(pipe, small_esd(steps=2), progress=False)
    assert all(torch.isfinite(torch.tensor(result.record["losses"])))
    assert result.delta.tensors and all(t.dtype == dtype for t in result.delta.tensors.values())
    assert all(p.dtype == dtype for p in pipe.unet.parameters()), "trained tensors are cast back"


def test_a_config_file_with_one_concept_text_is_one_concept(tmp_path, model_dir):
    config = tmp_path / "c.yaml"
    config.write_text("concepts: van gogh\n")
    out = tmp_path / "out"
    assert main(["run", "esd", "--model", str(model_dir), "--config", str(config), "--out", str(out), *FAST]) == 0
    assert json.loads((out / "record.json").read_text())["config"]["concepts"] == ["van gogh"]


@pytest.mark.parametrize("line,field", [("steps: true", "steps"), ("lr: true", "lr"), ("seed: abc", "seed")])
def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, model_dir, capsys, line, field):
    config = tmp_path / "c.yaml"
    config.write_text(f"{line}\nconcepts: [van gogh]\n")
    assert main(["run", "esd", "--model", str(model_dir), "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field} must be" in err
    assert not (tmp_path / "o").exists()


def test_programming_errors_are_not_reported_as_usage_errors(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(erase.runner, "run", lambda *a, **k: None.missing)  # a bug, not the user's input
    with pytest.raises(AttributeError):
        main(run_args(model_dir, tmp_path / "out"))
