"""Each erasure method, with its `toy` preset, erases a style on the toy and keeps the others, through the whole
bench (erase -> Delta -> answer set of every theme x object x 5 seeds -> classifiers).

Thresholds (issues #4 and #5): UA >= 80 (the target style is gone from >= 80% of its images) with IRA >= 70 (the
other styles are still recognised in >= 70% of theirs). The toy presets were measured on the toy
(scripts/tune_toy.py): the papers' settings, sized for an 860 M-parameter UNet, barely move the toy's UNet.
"""

import json
import os

import pytest

from canvas.bench import Bench, BenchConfig

pytestmark = pytest.mark.slow

TARGET = "Pop_Art"
METHODS = ["esd", "uce", "ca", "fmn", "salun"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = Bench(BenchConfig(methods=METHODS, targets=[TARGET], out=str(out)), progress=False).run()
    assert not result["failed"], result["failed"]
    report_dir = os.environ.get("ERASEKIT_REPORT_DIR")
    if report_dir:  # keep the figures for the closing note / a person to read
        (out / "report.md").replace(os.path.join(report_dir, "erasure_toy_report.md"))
    by_method = {r["method"]: r for r in result["rows"]}
    print(json.dumps(by_method, indent=1))
    return by_method


@pytest.mark.parametrize("method", METHODS)
def test_method_erases_a_style_and_keeps_the_others(rows, method):
    row = rows[method]
    assert row["preset"] == "toy"
    assert row["UA"] >= 80, f"{method}: UA {row['UA']:.1f}"
    assert row["IRA"] >= 70, f"{method}: IRA {row['IRA']:.1f}"
