"""Each erasure method, with its toy presets, erases a held-out style and a held-out object of the toy and keeps the
rest, through the whole bench (erase -> Delta -> answer set of every theme x object x 5 seeds -> classifiers).

Thresholds (issue #12's goal): UA >= 80 (the target is gone from >= 80% of its images), IRA >= 70 (the other targets
of its kind are still recognised in >= 70% of theirs) and CRA >= 70 (the other kind too). The targets are held out:
the presets were chosen on the split manifest's tuning targets (scripts/tune_toy.py), and each method's targets here
are ones docs/results/toy.md shows it erasing; that table has every held-out target, the failures included. A
method that erases no toy target of a kind to UA 80 (SHORTFALLS) has that UA check as a strict expected failure, with
the cause and the paper's figure beside its targets, and its IRA / CRA checked as for every method.
"""

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from canvas import catalog, splits
from canvas.bench import Bench, BenchConfig

pytestmark = pytest.mark.slow

CAT = catalog.get("toy")
TARGETS = {  # method -> (held-out style, held-out object); figures of docs/results/toy.md (1 thread), UA / IRA / CRA
    "esd": ("Winter", "Flowers"),  # 100 / 91.9 / 94.5, 100 / 100 / 100
    "uce": ("Bricks", "Butterfly"),  # 87.5 / 87.8 / 99.1, 87.3 / 91.4 / 77.8
    "ca": ("Sketch", "Butterfly"),  # 100 / 98.9 / 100, 100 / 99.5 / 100
    # FMN erases no held-out toy object to UA 80 with its preset (best: Fishes 63.6; mean 33.6, the paper's 45.6):
    # its loss positions (the concept's tokens, EOS, padding) do not carry a toy target (docs/results/fmn-ceiling.md),
    # so its object check is a known shortfall below; what it keeps is checked as for every method.
    "fmn": ("On_Fire", "Fishes"),  # 100 / 97.2 / 97.0, 63.6 / 99.0 / 87.8
    # SalUn's style figure is docs/results/retune/salun/toy.md's (the 400-step preset; 100 steps left Crayon at 2.5).
    "salun": ("Crayon", "Trees"),  # 100 / 95.6 / 98.2, 100 / 100 / 100
    # EraseDiff's object figure is docs/results/retune/erasediff/toy.md's (mean UA 85.8; Birds the lowest, 65.5).
    "erasediff": ("Crayon", "Fishes"),  # 100 / 100 / 100, 87.3 / 98.4 / 99.8
    "scissorhands": ("Neon_Lines", "Birds"),  # 100 / 99.7 / 100, 100 / 99.7 / 100
    "spm": ("Bricks", "Fishes"),  # 100 / 100 / 99.8, 100 / 100 / 100
    # SEOT erases no toy target (UA 0-12.5 on every held-out style; UnlearnCanvas's SEOT: style UA 56.9, object
    # 23.3): the toy's UNet reads a target from the tokens after its name, which SEOT leaves as they are
    # (docs/results/fmn-ceiling.md). Its erasure is checked as a known shortfall below, what it keeps as a result.
    "seot": ("Mosaic", "Fishes"),  # 0 / 100 / 100, 0 / 100 / 100
    "mace": ("Bricks", "Fishes"),  # 100 / 100 / 100, 100 / 100 / 91.0
    "rece": ("Winter", "Trees"),  # 92.5 / 81.7 / 99.8, 85.5 / 75.1 / 79.3
    "speed": ("Sketch", "Fishes"),  # 100 / 96.1 / 99.8, 87.3 / 86.5 / 92.0
    "advunlearn": ("Mosaic", "Fishes"),  # 100 / 88.6 / 100, 96.4 / 98.2 / 99.3
}
# (method, kind) whose UA check is a documented, expected failure (strict: a pass must update this)
SHORTFALLS = {("seot", "style"), ("seot", "object"), ("fmn", "object")}


def test_the_targets_are_held_out():
    for style, obj in TARGETS.values():
        assert CAT.is_style(style) and (obj is None or not CAT.is_style(obj))
        assert {splits.target_split(CAT, t) for t in (style, obj) if t} == {splits.HELD_OUT}


@functools.cache
def rows_of(method: str) -> dict[tuple[str, str], dict]:
    """The bench rows of `method` on its targets, run once per test process (its tests are one class, which
    pytest-xdist keeps in one process)."""
    out = Path(tempfile.mkdtemp(prefix=f"erasure-{method}-"))
    atexit.register(shutil.rmtree, out, True)
    targets = [t for t in TARGETS[method] if t]
    result = Bench(BenchConfig(methods=[method], targets=targets, out=str(out)), progress=False).run()
    assert not result["failed"], result["failed"]
    report_dir = os.environ.get("ERASEKIT_REPORT_DIR")
    if report_dir:  # keep the figures for the closing note / a person to read
        (out / "report.md").replace(os.path.join(report_dir, f"erasure_toy_{method}.md"))
    by_job = {(r["method"], r["target"]): r for r in result["rows"]}
    print(json.dumps({f"{m} {t}": r for (m, t), r in by_job.items()}, indent=1))
    return by_job


def _kinds(method: str, with_shortfalls: bool = False) -> list:
    """The kinds a method is checked on; with `with_shortfalls`, its documented shortfalls as strict xfails."""
    kinds = [k for k, t in zip(("style", "object"), TARGETS[method], strict=True) if t]
    if not with_shortfalls:
        return kinds
    xfail = pytest.mark.xfail(strict=True, reason="documented shortfall on the toy")
    return [pytest.param(k, marks=xfail) if (method, k) in SHORTFALLS else k for k in kinds]


def _tests_of(method: str) -> type:
    """One test class per method: pytest-xdist (`--dist loadscope`) sends a class to one process, so each method's
    bench runs once while the methods spread over the processes."""

    class MethodTests:
        @pytest.mark.parametrize("kind", _kinds(method, with_shortfalls=True))
        def test_erases_a_held_out_target(self, kind):
            target = TARGETS[method][0 if kind == "style" else 1]
            row = rows_of(method)[(method, target)]
            assert row["preset"] in ("toy", "toy-object")
            assert row["UA"] >= 80, f"{method} {target}: UA {row['UA']:.1f}"

        @pytest.mark.parametrize("kind", _kinds(method))
        def test_keeps_the_rest(self, kind):
            target = TARGETS[method][0 if kind == "style" else 1]
            row = rows_of(method)[(method, target)]
            assert row["IRA"] >= 70, f"{method} {target}: IRA {row['IRA']:.1f}"
            assert row["CRA"] >= 70, f"{method} {target}: CRA {row['CRA']:.1f}"

    MethodTests.__name__ = MethodTests.__qualname__ = f"TestErasure_{method.replace('-', '_')}"
    return MethodTests


for _method in TARGETS:
    _tests = _tests_of(_method)
    globals()[_tests.__name__] = _tests
