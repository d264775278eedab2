"""scripts/attack_table.py's read-only attack rows and its sequential part: a folder that is another run's is read
as it is and never written, a job without an attack's results is a clear error, and a method whose sequence fails
is a row with its error while the other methods still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import scripts.attack_table as table
from canvas.attacks import RESULTS


def _job(bench: Path, method: str, target: str, pre: float, asr: float) -> None:
    job = bench / "jobs" / f"{method}__{target}"
    (job / "attacks" / "ringabell").mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"method": method, "target": target, "kind": "style", "UA": 1.0}))
    (job / "attacks" / "ringabell" / RESULTS).write_text(json.dumps({"pre_asr": pre, "asr": asr, "rows": []}))


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stored_attack_rows_read_each_job_in_order_and_write_nothing(tmp_path):
    _job(tmp_path, "uce", "Bricks", 0.0, 25.0)
    _job(tmp_path, "uce", "Mosaic", 0.0, 75.0)
    _job(tmp_path, "mace", "Bricks", 50.0, 50.0)
    before = _files(tmp_path)
    rows = table.stored_attack_rows(tmp_path, ["mace", "uce"], ["Bricks"], ["ringabell"])
    assert [(r["method"], r["target"], r["preASR[ringabell]"], r["ASR[ringabell]"]) for r in rows] == [
        ("mace", "Bricks", 50.0, 50.0),
        ("uce", "Bricks", 0.0, 25.0),
    ]
    assert table.attack_markdown(rows, ["ringabell"])[2] == "| mace | style | Bricks | 50.0 -> 50.0 |"
    assert _files(tmp_path) == before


def test_stored_attack_rows_name_a_job_without_an_attack(tmp_path):
    _job(tmp_path, "uce", "Bricks", 0.0, 25.0)
    with pytest.raises(SystemExit, match=r"uce__Bricks holds no finished inversion"):
        table.stored_attack_rows(tmp_path, ["uce"], ["Bricks"], ["ringabell", "inversion"])
    with pytest.raises(SystemExit, match=r"uce__Mosaic holds no finished scores"):
        table.stored_attack_rows(tmp_path, ["uce"], ["Mosaic"], [])


def test_a_failing_sequence_is_a_row_and_the_others_run(tmp_path, monkeypatch):
    ran = []

    def fake_run(config, progress):
        ran.append(config.method)
        if config.method == "speed":
            raise RuntimeError("no anchor | here\nsecond line")
        last = {t: 100.0 for t in config.targets}
        return {"summary": {"SU": 100.0}, "requests": [{"UA": last}]}

    monkeypatch.setattr(table, "run_sequence", fake_run)
    summaries = table.sequence_summaries(["uce", "speed", "mace"], ["Mosaic", "Sketch"], tmp_path, [188], False)
    assert ran == ["uce", "speed", "mace"]
    assert summaries["speed"] == {"error": "RuntimeError: no anchor / here"}
    assert summaries["mace"] == {"SU": 100.0, "UA_last": {"Mosaic": 100.0, "Sketch": 100.0}}
    bad = table.sequence_summaries(["nope"], ["Mosaic", "Sketch"], tmp_path, [188], False)
    assert bad["nope"]["error"].startswith("ValueError: unknown method 'nope'")
