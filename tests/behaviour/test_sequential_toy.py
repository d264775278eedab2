"""UCE (closed-form, its toy preset) serves two erasure requests one after another on the toy, through the whole
sequential runner (`canvas sequential`: request -> Delta on the state before it -> answer set of every theme x
object x 1 seed -> classifiers), on held-out styles.

Thresholds: each target's UA >= 75 right after its own request and still after the last (no rebound below it),
and CRA >= 70 after the last. 75 is 6 of a style's 8 images (1 seed) no longer recognised: the toy table's
single-request UCE UA on these two held-out styles is 95 and 100 over 5 seeds (docs/results/toy.md; the held-out
minimum is 72.5), and 1 seed leaves one image of slack below 87.5. CRA 70 is the bench's goal for one request
(single-request UCE CRA on them: 97.5, 99.8). IRA is reported, not checked: it is measured over the styles not
erased yet, and a sequence is where it is expected to fall (the finding this runner exists to measure).
Measured (1 thread): UA 100 / 100 after each request and after the last, IRA 70.8 -> 89.1, CRA 98.9 -> 98.9.
"""

import shutil
import tempfile
from pathlib import Path

import pytest

from canvas import catalog, splits
from canvas.sequential import SequentialConfig, run_sequence

pytestmark = pytest.mark.slow

CAT = catalog.get("toy")
TARGETS = ("Mosaic", "Sketch")


@pytest.fixture(scope="module")
def result():
    out = Path(tempfile.mkdtemp(prefix="sequential-uce-"))
    try:
        yield run_sequence(SequentialConfig(method="uce", targets=list(TARGETS), out=str(out), seeds=[188]), False)
    finally:
        shutil.rmtree(out, ignore_errors=True)


class TestUceSequence:
    def test_the_targets_are_held_out_styles(self):
        held_out = splits.held_out_targets(CAT)
        assert all(t in held_out and CAT.is_style(t) for t in TARGETS)

    def test_each_target_is_erased_by_its_own_request_and_stays_erased(self, result):
        rows, summary = result["requests"], result["summary"]
        assert all(summary["UA_own"][t] >= 75 for t in TARGETS), summary["UA_own"]
        assert all(rows[-1]["UA"][t] >= 75 for t in TARGETS), rows[-1]["UA"]

    def test_the_other_kind_is_kept_after_the_last_request(self, result):
        assert result["summary"]["SR_CRA"] >= 70, result["summary"]
