"""Methods built for many concepts erase five held-out toy styles in one run and keep the other styles, through the
whole bench (`canvas bench --together`: one erasure, its answer set of every theme x object x 5 seeds, the
classifiers).

Thresholds (issue #14): UA >= 80 on each of the five (not only on average: a method that drops one concept of a
list has not erased the list) and mean IRA >= 60 over the five styles left (lower than a single target's 70: half
the toy's styles are gone, and what is left shares their palettes and textures). The five are held-out targets; each
method uses the preset the bench picks for a together job: a `toy-together-*` preset where one was chosen on the
tuning styles erased together (scripts/tune_toy.py --together), else its `toy` preset (tuned on single targets). A
method whose erasure falls short is listed in SHORTFALLS with the measured figures and the cause, as a strict
expected failure; what it keeps is checked as for every method.
"""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from canvas import catalog, splits
from canvas.bench import Bench, BenchConfig

pytestmark = pytest.mark.slow

CAT = catalog.get("toy")
GROUP = ("Bricks", "Crayon", "Mosaic", "Sketch", "Winter")
METHODS = ("uce", "speed", "mace")  # UA per style / IRA / CRA (1 thread): speed 100 x 5 / 62.0 / 99.8, mace
# 100 x 5 / 100 / 100, with their `toy` presets (no together preset of their own)
# UCE's toy-together-style preset: UA 77.5 / 67.5 / 95 / 100 / 82.5 (mean 84.5) with IRA 100 and CRA 100
# (1 thread). On the two tuning styles erased together every trial with the catalog's preservation saturated at
# UA 100 / IRA 100 (docs/results/tuning/uce-style-toy-together.md), so the tuning split could not choose a stronger
# erase for five; the IRA it keeps says there is room.
SHORTFALLS = {"uce"}


def test_the_group_is_held_out():
    assert all(splits.target_split(CAT, t) == splits.HELD_OUT for t in GROUP) and all(CAT.is_style(t) for t in GROUP)


@functools.cache
def row_of(method: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"together-{method}-"))
    atexit.register(shutil.rmtree, out, True)
    config = BenchConfig(methods=[method], targets=[], together=[",".join(GROUP)], out=str(out))
    result = Bench(config, progress=False).run()
    assert not result["failed"], result["failed"]
    (row,) = result["rows"]
    print(json.dumps(row, indent=1))
    return row


def _tests_of(method: str) -> type:
    """One test class per method, which pytest-xdist (`--dist loadscope`) keeps in one process."""
    xfail = pytest.mark.xfail(strict=True, reason="documented shortfall on the toy")

    class TogetherTests:
        def test_erases_each_of_five_styles_at_once(self):
            row = row_of(method)
            assert row["preset"] in ("toy-together-style", "toy") and set(row["UA_each"]) == set(GROUP)
            assert min(row["UA_each"].values()) >= 80, f"{method}: UA per style {row['UA_each']}"

        def test_keeps_the_other_styles(self):
            row = row_of(method)
            assert row["IRA"] >= 60, f"{method}: IRA {row['IRA']:.1f}"
            assert row["CRA"] >= 70, f"{method}: CRA {row['CRA']:.1f}"

    if method in SHORTFALLS:
        TogetherTests.test_erases_each_of_five_styles_at_once = xfail(
            TogetherTests.test_erases_each_of_five_styles_at_once
        )
    TogetherTests.__name__ = TogetherTests.__qualname__ = f"TestTogether_{method}"
    return TogetherTests


for _method in METHODS:
    _tests = _tests_of(_method)
    globals()[_tests.__name__] = _tests
