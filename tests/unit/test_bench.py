"""The bench on a tiny pipeline with the toy catalog: report layout, resume after a kill, failing jobs recorded."""

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import erase
from canvas import bench, data, fid, splits
from canvas.cli import main
from tests.unit.helpers import save_tiny

FAST = {"steps": 2, "ddim_steps": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _config(model_dir, out, targets=("Pop_Art", "Cats")):
    return bench.BenchConfig(
        methods=["esd"], targets=list(targets), out=str(out), model=str(model_dir), catalog="toy", sampler="toy",
        seeds=[188], overrides={"esd": FAST}, presets={"esd": "paper"}, batch_size=64,
    )  # fmt: skip


def test_bench_writes_the_report_and_resumes_after_a_kill(tmp_path, model_dir, monkeypatch):
    calls = []
    real_run, real_generate = erase.run, bench.answers.generate

    def counting_run(pipe, config, **kw):
        calls.append(config.concepts[0])
        return real_run(pipe, config, **kw)

    def killed_on_cats(pipe, items, *args, **kwargs):
        if any(it.object == "Cats" for it in items) and "jobs" in str(args[1]) and "Cats" in str(args[1]):
            raise KeyboardInterrupt
        return real_generate(pipe, items, *args, **kwargs)

    monkeypatch.setattr(erase, "run", counting_run)
    monkeypatch.setattr(bench.answers, "generate", killed_on_cats)
    targets = ("Sketch", "Cats")  # a held-out style and a tuning object of the toy
    with pytest.raises(KeyboardInterrupt):
        bench.Bench(_config(model_dir, tmp_path, targets), progress=False).run()
    spelled = ["Sketch style", "An image of Cats."]  # ESD's spelling (UnlearnCanvas's), on the toy too
    assert calls == spelled
    monkeypatch.setattr(bench.answers, "generate", real_generate)
    result = bench.Bench(_config(model_dir, tmp_path, targets), progress=False).run()
    assert calls == spelled, "resumed jobs must not erase again"
    rows = {r["target"]: r for r in result["rows"]}
    assert set(rows) == {"Sketch", "Cats"} and rows["Sketch"]["kind"] == "style"
    assert (
        (rows["Sketch"]["split"], rows["Cats"]["split"])
        == ("held-out", "tuning")
        == tuple(splits.target_split(bench.catalogs.get("toy"), t) for t in targets)
    )
    for row in rows.values():
        assert 0 <= row["UA"] <= 100 and row["FID"] is not None and row["time_s"] > 0 and row["storage_gb"] > 0
        card = (tmp_path / "jobs" / f"esd__{row['target']}" / "delta" / "README.md").read_text()
        assert f"| UA | {row['UA']:.4g} |" in card and f"| CRA | {row['CRA']:.4g} |" in card, "the card has its scores"
    written = json.loads((tmp_path / "report.json").read_text())
    assert {r["target"] for r in written["rows"]} == {"Sketch", "Cats"}
    assert [(t["method"], t["split"], t["n_style"], t["n_object"]) for t in written["table"]] == [
        ("esd", "held-out", 1, 0), ("esd", "tuning", 0, 1)
    ]  # fmt: skip
    assert written["table"][0]["style_UA"] == rows["Sketch"]["UA"] and written["table"][0]["style_UA_std"] == 0
    space = "toy-style-features"  # no --inception: the toy classifier's features, named as the judge does
    assert (
        written["fid_features"]
        == result["fid_features"]
        == space
        == bench.Judge(bench.catalogs.get("toy")).feature_space
    )
    column = f"FID[{space}]"
    assert written["table"][0][column] == pytest.approx(rows["Sketch"]["FID"])  # held-out only
    assert all(r[column] == rows[r["target"]]["FID"] and r["fid_features"] == space for r in written["rows"])
    assert column in (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    assert column in (tmp_path / "rows.csv").read_text().splitlines()[0].split(",")
    assert (tmp_path / "report.md").read_text().count(f"| {column} |") == 3  # held-out, tuning, per target
    assert (tmp_path / "report.md").is_file() and (tmp_path / "ua_vs_retain.png").is_file()
    assert {p.name for p in (tmp_path / "grids").iterdir()} == {"esd__Sketch.png", "esd__Cats.png"}
    for target in targets:  # the killed job kept its erase time and added the later stages' on resume
        stages = json.loads((tmp_path / "jobs" / f"esd__{target}" / "stages.json").read_text())
        assert set(stages) == {"erase", "answers", "scoring"} and all(v > 0 for v in stages.values())


def test_toy_jobs_take_the_preset_of_their_kind(monkeypatch):
    config = bench.BenchConfig(methods=["esd", "uce"], targets=["Sketch", "Cats"], out="unused")
    monkeypatch.setitem(erase.ESDConfig.PRESETS, "toy-object", {"steps": 3})
    assert bench.job_preset(config, "esd", "object") == "toy-object"
    assert bench.job_preset(config, "esd", "style") == "toy"
    assert bench.job_preset(config, "uce", "object") == "toy"  # no toy-object preset: the toy one
    config.presets = {"esd": "paper"}
    assert bench.job_preset(config, "esd", "object") == "paper"


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path, model_dir, monkeypatch):
    real_run = erase.run

    def fails_on_cats(pipe, config, **kw):
        if config.concepts == ["An image of Cats."]:
            raise RuntimeError("simulated failure")
        return real_run(pipe, config, **kw)

    monkeypatch.setattr(erase, "run", fails_on_cats)
    result = bench.Bench(_config(model_dir, tmp_path), progress=False).run()
    assert [r["target"] for r in result["rows"]] == ["Pop_Art"]
    assert result["failed"] == [{"method": "esd", "target": "Cats", "error": "RuntimeError: simulated failure"}]
    assert "simulated failure" in (tmp_path / "report.md").read_text()


def test_bad_bench_inputs_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in [
        (["--methods", "nope", "--targets", "Pop_Art"], "unknown method 'nope'"),
        (["--methods", "esd", "--targets", "Nope"], "Nope"),
        (["--methods", "esd", "--targets", "Seed_Images"], "Seed_Images"),
        (["--methods", "esd"], "--targets or --together is required"),
    ]:
        assert main(["bench", "--model", "toy", "--out", str(tmp_path / "b"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_two_launched_processes_run_one_job_each(tmp_path, model_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.unit.test_distributed import _free_port

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(root / "tests" / "unit" / "ddp_bench.py"), str(model_dir), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["target"] for r in report["rows"]} == {"Pop_Art", "Cats"} and not report["failed"]
    records = [json.loads((tmp_path / "jobs" / f"esd__{t}" / "delta" / "record.json").read_text())
               for t in ("Pop_Art", "Cats")]  # fmt: skip
    assert all(len(r["losses"]) == 2 for r in records)
    assert {p.name for p in tmp_path.glob("process*")} == {"process0_of_2", "process1_of_2"}


def _parquet_dataset(folder, cat, indices):
    """A tiny parquet copy of the toy catalog in two shards: a distinct 32 px JPEG per image, the (theme, object)
    groups in shuffled order, so storage order is not the bench's (theme, object, index) order."""
    groups = [(t, o) for t in cat.themes for o in cat.objects]
    random.Random(0).shuffle(groups)
    stored = {}
    for t, o in groups:
        for i in indices:
            buffer = io.BytesIO()
            colour = (cat.style_label(t) * 23, cat.object_label(o) * 31, i * 50)
            Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG", quality=95)
            stored[t, o, i] = buffer.getvalue()
    folder.mkdir()
    keys = list(stored)
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        column = pa.array([stored[k] for k in part], pa.binary())
        table = pa.table({"image": column, "text": [cat.prompt(t, o) for t, o, _ in part]})
        pq.write_table(table, folder / f"train-0000{n}.parquet", row_group_size=40)
    return stored


def test_the_bench_reads_a_parquet_dataset(tmp_path, model_dir):
    """--data as parquet shards: methods get files written once from the shards, FID's real set is read from them."""
    from canvas.judge import to_unit_tensor

    cat = bench.catalogs.get("toy")
    roles = splits.load()
    stored = _parquet_dataset(tmp_path / "shards", cat, bench.bench_indices(roles))
    shards = str(tmp_path / "shards")
    config = _config(model_dir, tmp_path / "out", targets=["Pop_Art"])
    config = bench.BenchConfig(**{**vars(config), "methods": ["fmn", "salun"], "data": shards, "presets": {}})
    config.overrides = {"fmn": {"steps": 2}, "salun": {"steps": 2}}
    fmn = bench.job_config(config, "fmn", "Pop_Art")
    salun = bench.job_config(config, "salun", "Pop_Art")
    cache = tmp_path / "out" / "data"
    (copy,) = cache.iterdir()
    assert copy.name.startswith("parquet-") and not (cache / "toy").exists()
    assert len(fmn.images) == len(cat.objects) * len(roles.fmn_reference)
    files = [*fmn.images, *salun.forget_images, *salun.retain_images]
    assert len(salun.forget_images) == len(cat.objects) * len(roles.forget_retain)
    for file in files:
        path = Path(file)
        assert path.parent.parent.parent == copy
        assert path.read_bytes() == stored[path.parent.parent.name, path.parent.name, int(path.stem)]
    assert {Path(f).parent.parent.name for f in fmn.images} == {"Pop_Art"}

    config.methods = ["salun"]  # FMN's token positions need the real tokenizer's words; its inputs were checked above
    # The tiny tokenizer (16 tokens) cannot hold the benchmark prompts, and methods refuse a prompt they would cut.
    short = {"forget_prompts": "a van gogh painting", "pseudo_prompts": "a photo", "retain_prompts": "a photo"}
    config.overrides["salun"].update(short)
    run = bench.Bench(config, progress=False)
    dataset = run.dataset()
    assert isinstance(dataset, data.ParquetDataset)
    judge = bench.Judge(cat)
    bank = judge.real_bank(tmp_path / "bank.npz", roles.fid_reference, dataset)
    keys = [(t, o, i) for t in cat.themes for o in cat.objects for i in roles.fid_reference]
    assert list(zip(bank.themes, bank.objects)) == [(t, o) for t, o, _ in keys]
    assert bank.meta["data"] == dataset.identity
    decoded = [data.decode_image(stored[k]) for k in keys]
    expected = torch.cat([judge(to_unit_tensor(decoded[s : s + 128]))[2] for s in range(0, len(keys), 128)])
    assert torch.allclose(torch.from_numpy(bank.features), expected, atol=1e-5), "rows follow (theme, object, index)"

    result = run.run()
    assert not result["failed"], result["failed"]
    assert [r["method"] for r in result["rows"]] == ["salun"]
    real = fid.FeatureBank.load(tmp_path / "out" / "cache" / "real_features.npz")
    np.testing.assert_array_equal(real.features, bank.features)
    assert list(cache.iterdir()) == [copy], "the copy is written once and reused by every job"


def test_a_parquet_dataset_missing_images_is_refused(tmp_path, model_dir):
    cat = bench.catalogs.get("toy")
    _parquet_dataset(tmp_path / "shards", cat, bench.method_indices(splits.load()))  # no FID reference indices 4-5
    config = bench.BenchConfig(**{**vars(_config(model_dir, tmp_path / "out")), "data": str(tmp_path / "shards")})
    with pytest.raises(data.DatasetError, match="wrong count.*missing 4-5"):
        bench.job_config(config, "fmn", "Pop_Art")


def test_a_folder_dataset_gives_the_methods_its_own_files(tmp_path, model_dir):
    from canvas import toy

    cat = bench.catalogs.get("toy")
    root = toy.export(tmp_path / "canvas", cat, indices=bench.bench_indices(splits.load()))
    config = bench.BenchConfig(**{**vars(_config(model_dir, tmp_path / "out")), "data": str(root)})
    images = bench.job_config(config, "fmn", "Pop_Art").images
    assert images and all(Path(f).parent.parent == root / "Pop_Art" and Path(f).is_file() for f in images)
    assert isinstance(bench.Bench(config, progress=False).dataset(), data.FolderDataset)
    assert not (tmp_path / "out" / "data").exists(), "nothing copied for a folder dataset"
