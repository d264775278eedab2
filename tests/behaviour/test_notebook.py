"""The example notebook (examples/erase_and_measure.ipynb) runs top to bottom in a fresh kernel, and what it reports
holds: both methods erase its held-out style and keep the rest, within the notebook's time budget.

It runs on a copy in a temporary folder (its working directory, so its relative `runs/` folder lands there), with this
checkout first on the kernel's import path and the test settings (HF_HUB_OFFLINE, ERASEKIT_TEST_THREADS) inherited.
The checks read the `metrics.json` it writes. Thresholds, against the notebook's measured run at 1 torch thread
(Sketch, 2 seeds, 176 images per method; closed-form edits and fixed seeds, so a rerun repeats it up to float
rounding):
- UA >= 80 for each method (measured 100 for UCE and SPEED): the goal of the erasure behaviour tests; of the 16
  Sketch images at most 3 may keep the style.
- IRA >= 55 for UCE (measured 67.4; its toy style IRA over the held-out styles is 62-88 in docs/results/toy.md: its
  edit spills onto Bricks and Watercolor, which the notebook's kept sheet shows) and >= 85 for SPEED (measured 97.2);
  12 points under each, some 17 of the 144 other-style images.
- CRA >= 90 for each (measured 99.4 for both): objects survive a style erasure.
- The base model: the judge sees Sketch in >= 7 of its 8 Sketch images in the notebook's sheet (measured 8) and the
  asked-for style in >= 8 of the 9 others (measured 9); else "the style is gone" would hold before any erasure.
- Under 90 s of CPU time in the kernel, the notebook's budget (measured 27-31 s). Wall time is printed, not checked:
  30-39 s on the 2 shared cores when quiet, far more when other processes load them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "erase_and_measure.ipynb"
UA_MIN = {"uce": 80.0, "speed": 80.0}
IRA_MIN = {"uce": 55.0, "speed": 85.0}
CRA_MIN = 90.0
CPU_BUDGET_S = 90.0


@pytest.mark.slow
def test_the_notebook_runs_and_its_methods_erase_the_held_out_style(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    # the kernel imports this checkout, not whichever erasekit the environment has installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.perf_counter()
    client.execute()  # a cell that raises fails here (CellExecutionError, with the cell and its traceback)
    wall = time.perf_counter() - started
    result = json.loads((tmp_path / "runs" / "erase_and_measure" / "metrics.json").read_text())
    print(json.dumps({**result, "test_wall_seconds": wall}, indent=1))

    assert result["split"] == "held-out", result["target"]
    assert result["images_per_model"] == 11 * 8 * len(result["seeds"])  # every theme x object at each seed
    assert result["base_sees_target"] >= 7 / 8 and result["base_sees_kept"] >= 8 / 9, result
    assert set(result["scores"]) == set(UA_MIN)
    for method, row in result["scores"].items():
        assert row["UA"] >= UA_MIN[method], f"{method}: UA {row['UA']:.1f}"
        assert row["IRA"] >= IRA_MIN[method], f"{method}: IRA {row['IRA']:.1f}"
        assert row["CRA"] >= CRA_MIN, f"{method}: CRA {row['CRA']:.1f}"
    assert result["notebook_cpu_seconds"] < CPU_BUDGET_S, f"{result['notebook_cpu_seconds']:.1f} s of CPU"


def test_the_committed_notebook_is_executed_and_clean():
    """What GitHub shows: every code cell run once, in order, with its outputs, none an error or a stderr notice,
    and the file small enough to open in a browser."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c["outputs"]]
    assert all(c["outputs"] for c in code[1:]), "every code cell after the settings prints or shows something"
    assert not [o for o in outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # two before/after sheets and the bar chart
    assert NOTEBOOK.stat().st_size < 1_000_000
