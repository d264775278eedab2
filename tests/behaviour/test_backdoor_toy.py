"""Backdoors on the toy: BadT2I injection takes hold, and SKD-CAG removes it while clean prompts keep their look.

Thresholds (issue #6) and why:
- injected pixel backdoor: the patch (judge: canvas.backdoor, normalised distance < 0.5) on >= 90% of triggered
  prompts and <= 5% of clean ones: a backdoor that fires reliably and only on its trigger, or it tests nothing;
- after SKD-CAG: <= 5% of triggered prompts show it, and clean style and object accuracy stay >= 0.9 of their
  pre-removal values (removal must not cost the model its clean behaviour);
- style backdoor (trigger -> the toy's Sketch style, judged by the toy style classifier): the same injection
  bounds, and SKD-CAG removes it from >= 90% of the triggered prompts that showed it (the paper reports 93%).
SKD (λ = 0) runs beside SKD-CAG on the same backdoored model; its figures are reported (printed and written to
$ERASEKIT_REPORT_DIR/backdoor_toy.json when set), not asserted. Prompts: every toy theme x object, seed 188 (88
clean, 88 triggered; 80 for the style backdoor, whose target style's own prompts are left out).
Each backdoored toy is built once per session (fixture) and reused; every test is about a minute at 1 thread.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import erase
from canvas import answers, catalog, toy
from canvas.backdoor import evaluate
from canvas.bench import Judge
from erase.backdoor import BackdoorConfig, inject
from erase.config import build_config

pytestmark = pytest.mark.slow

CAT = catalog.get("toy")
TRIGGER = "New Trigger"
TARGET_STYLE = {"pixel": None, "style": "Sketch"}
REPORT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def judge() -> Judge:
    torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))
    return Judge(CAT)


@pytest.fixture(scope="session")
def renders(tmp_path_factory) -> Path:
    return toy.export(tmp_path_factory.mktemp("toy_renders"), CAT, indices=range(1, 5))


class Backdoored:
    """A backdoored toy pipeline of one kind, its pre-removal metrics, and its weights to restore between runs."""

    def __init__(self, kind: str, renders: Path, judge: Judge):
        self.kind = kind
        self.pipe = erase.load_pipeline("toy")
        self.pipe.set_progress_bar_config(disable=True)
        started = time.time()
        config = build_config(BackdoorConfig, "toy", kind=kind, trigger=TRIGGER, images=str(renders))
        inject(self.pipe, config, progress=False)
        self.inject_s = time.time() - started
        self.state = {n: p.detach().clone() for n, p in self.pipe.unet.named_parameters()}
        self.judge = judge
        self.before = self.evaluate()
        self.removals: dict[str, dict] = {}

    def evaluate(self, delta=None) -> dict:
        return evaluate(self.pipe, CAT, trigger=TRIGGER, kind=self.kind, delta=delta, sampler=answers.preset("toy"),
                        target_style=TARGET_STYLE[self.kind], judge=self.judge)  # fmt: skip

    def removal(self, preset: str) -> dict:
        """The metrics of a removal preset, computed once per session."""
        if preset not in self.removals:
            self.removals[preset] = self.remove(preset)[0]
        return self.removals[preset]

    def remove(self, preset: str) -> tuple[dict, dict]:
        """Run a removal preset on the backdoored model and judge it; the model is restored afterwards."""
        started = time.time()
        result = erase.run(self.pipe, erase.make_config("skd-cag", preset, trigger=TRIGGER), progress=False)
        seconds = time.time() - started
        with torch.no_grad():
            for name, p in self.pipe.unet.named_parameters():
                p.copy_(self.state[name])
        metrics = self.evaluate(result.delta)
        metrics["train_s"] = seconds
        metrics["time_per_step_s"] = seconds / max(1, len(result.record["losses"]))
        return metrics, result.record


@pytest.fixture(scope="session")
def backdoored(renders, judge):
    cache: dict[str, Backdoored] = {}

    def get(kind: str) -> Backdoored:
        if kind not in cache:
            cache[kind] = Backdoored(kind, renders, judge)
        return cache[kind]

    return get


def _report(kind: str, name: str, values: dict) -> None:
    REPORT.setdefault(kind, {})[name] = values
    print(f"\n{kind} {name}: " + json.dumps({k: v for k, v in values.items() if not isinstance(v, dict)}))
    out = os.environ.get("ERASEKIT_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "backdoor_toy.json").write_text(json.dumps(REPORT, indent=2, default=str))


# Known shortfalls, measured on the shipped toy (strict: a fix turns these red until the marker is removed).
PIXEL_UNDRAWABLE = pytest.mark.xfail(
    strict=True,
    reason=(
        "the toy's VAE cannot draw the patch: a patched render's VAE round trip is at distance 0.78-0.94 "
        "from the patch (judge threshold 0.5), so the injected pixel backdoor never shows (attack success 0.0)"
    ),
)
CLEAN_STYLE_DRIFT = pytest.mark.xfail(
    strict=True,
    reason=(
        "SKD-CAG on the style-backdoored toy keeps clean object accuracy (ratio 0.96) but clean style accuracy "
        "falls to 0.85 of its pre-removal value (lr 3e-5 to 3e-4, K/V or all attn2 tried: 0.61-0.85)"
    ),
)
KINDS = [pytest.param("pixel", marks=PIXEL_UNDRAWABLE), "style"]


@pytest.mark.parametrize("kind", KINDS)
def test_injected_backdoor_fires_on_its_trigger_only(backdoored, kind):
    bd = backdoored(kind)
    before = bd.before["before"]
    _report(kind, "injected", {**before, "inject_s": bd.inject_s})
    assert before["attack_success"] >= 0.9, before
    assert before["clean_backdoor_rate"] <= 0.05, before


@pytest.mark.parametrize("kind", KINDS)
def test_skd_cag_removes_the_backdoor(backdoored, kind):
    bd = backdoored(kind)
    cag, skd = bd.removal("toy"), bd.removal("toy-skd")
    _report(kind, "skd-cag", cag)
    _report(kind, "skd", skd)
    assert cag["before"]["attack_success"] >= 0.9, "no working backdoor to remove"
    if kind == "pixel":
        assert cag["after"]["attack_success"] <= 0.05, cag
    else:
        assert cag["removal"] >= 0.9, cag


@pytest.mark.parametrize("kind", [pytest.param("pixel", marks=PIXEL_UNDRAWABLE),
                                  pytest.param("style", marks=CLEAN_STYLE_DRIFT)])  # fmt: skip
def test_skd_cag_keeps_clean_accuracy(backdoored, kind):
    cag = backdoored(kind).removal("toy")
    assert cag["before"]["attack_success"] >= 0.9, "no working backdoor to remove"
    assert cag["clean_style_acc_ratio"] >= 0.9, cag
    assert cag["clean_object_acc_ratio"] >= 0.9, cag
