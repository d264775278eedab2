"""Jobs that erase several targets at once (`canvas bench --together A,B,C`): their scores, their inputs, their
place in the report, and the errors for groups that cannot be one job."""

from __future__ import annotations

import pytest
import torch

import erase
from canvas import bench, method_inputs, metrics, report, splits
from canvas.catalog import get
from canvas.cli import main

TOY = get("toy")


def test_together_scores_are_the_mean_ua_and_the_rest_for_ira():
    acc_s = torch.rand(len(TOY.themes), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acc_o = torch.rand(len(TOY.objects), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    group = ["Sketch", "Winter", "Bricks"]
    s = metrics.unlearning_scores(acc_s, acc_o, TOY, "+".join(group))
    each = [1 - float(acc_s[TOY.themes.index(t)]) for t in group]
    rest = [float(acc_s[TOY.themes.index(t)]) for t in TOY.styles if t not in group]  # photo class left out
    assert s.kind == "style" and s.ua_each == pytest.approx(each) and s.ua == pytest.approx(sum(each) / 3)
    assert s.ira == pytest.approx(sum(rest) / len(rest)) and s.ira_terms == len(TOY.styles) - 3
    assert s.cra == pytest.approx(float(acc_o.mean()))
    one = metrics.unlearning_scores(acc_s, acc_o, TOY, "Sketch")  # one target: as before, no per-target list
    assert one.ua == pytest.approx(each[0]) and one.ua_each == ()
    objects = metrics.unlearning_scores(acc_s, acc_o, TOY, "Cats+Trees")
    kept = [float(acc_o[TOY.objects.index(o)]) for o in TOY.objects if o not in ("Cats", "Trees")]
    assert objects.kind == "object" and objects.ira == pytest.approx(sum(kept) / len(kept))


@pytest.mark.parametrize(
    ("group", "fragment"),
    [
        ("Sketch,Cats", "must be of one kind (all styles or all objects), got 'Sketch+Cats'"),
        ("Sketch", "two or more targets at once, got 'Sketch'"),
        ("Sketch,Nope", "unknown target 'Nope'"),
        ("styles", "erases every style of catalog 'toy': no style is left for IRA"),
    ],
)
def test_groups_that_cannot_be_one_job_are_one_line_errors(group, fragment, tmp_path):
    with pytest.raises(ValueError) as err:
        bench.BenchConfig(methods=["uce"], targets=[], together=[group], out=str(tmp_path))
        metrics.unlearning_scores([1.0] * len(TOY.themes), [1.0] * len(TOY.objects), TOY, "+".join(TOY.styles))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_target_twice_is_refused():
    with pytest.raises(ValueError, match="must be distinct, got 'Sketch\\+Sketch'"):
        metrics.target_kind(TOY, "Sketch+Sketch")


def test_a_group_is_held_out_only_when_every_target_is():
    assert splits.target_split(TOY, "Sketch+Winter") == "held-out"
    assert splits.target_split(TOY, "Sketch+Pop_Art") == "tuning"  # Pop_Art is a tuning target


def test_a_together_job_gets_every_target_as_a_concept(tmp_path):
    config = bench.BenchConfig(methods=["uce", "esd"], targets=["Mosaic"], together=["Sketch,Winter,Bricks"],
                               out=str(tmp_path))  # fmt: skip
    assert config.together == ["Sketch+Winter+Bricks"]
    jobs = bench.Bench(config, progress=False).jobs
    assert jobs == [
        ("uce", "Mosaic"),
        ("uce", "Sketch+Winter+Bricks"),
        ("esd", "Mosaic"),
        ("esd", "Sketch+Winter+Bricks"),
    ]
    job = bench.job_config(config, "uce", "Sketch+Winter+Bricks")
    singles = [bench.job_config(config, "uce", t).concepts for t in ("Sketch", "Winter", "Bricks")]
    assert job.concepts == [c for concepts in singles for c in concepts] and len(job.concepts) == 3
    assert job.preset == "toy-together-style" and bench.job_config(config, "uce", "Sketch").preset == "toy"
    assert bench.job_config(config, "esd", "Sketch+Winter+Bricks").preset == "toy"  # no together preset: its kind's


def test_inputs_merge_lists_in_order_and_keep_what_targets_share(monkeypatch):
    def inputs(cat, target, data_root, given):
        return {"concepts": [target], "anchors": ["painting"], "guides": [f"g-{target}"], "scale": 1.0}

    monkeypatch.setitem(method_inputs.INPUTS, "fake", inputs)
    merged = method_inputs.together_inputs("fake", TOY, ["Sketch", "Winter"], None)
    assert merged == {"concepts": ["Sketch", "Winter"], "anchors": ["painting"], "guides": ["g-Sketch", "g-Winter"],
                      "scale": 1.0}  # fmt: skip

    def clashing(cat, target, data_root, given):
        return {"concepts": [target], "images": f"/data/{target}"}

    job = method_inputs.together_inputs("speed", TOY, ["Sketch", "Winter"], None)
    assert job["concepts"] == ["Sketch style", "Winter style"]  # the kept set: each other target once, none erased
    assert job["preserve"] == [method_inputs.concept_text(TOY, t) for t in (*TOY.styles, *TOY.objects)
                               if t not in ("Sketch", "Winter")]  # fmt: skip

    monkeypatch.setitem(method_inputs.INPUTS, "fake", clashing)
    with pytest.raises(ValueError, match="fake cannot erase Sketch, Winter in one run: its input 'images' differs"):
        method_inputs.together_inputs("fake", TOY, ["Sketch", "Winter"], None)


def test_the_report_keeps_together_jobs_out_of_the_per_target_means():
    def row(target, ua, ira, each=None):
        scores = metrics.UnlearningScores(target, "style", ua, ira, 0.9, 7, 8, tuple(each or ()))
        return report.target_row("uce", scores, split=splits.target_split(TOY, target))

    rows = [row("Sketch", 1.0, 0.8), row("Winter", 0.5, 0.6), row("Sketch+Winter+Bricks", 0.6, 0.7, [1.0, 0.5, 0.3])]
    assert rows[2]["UA_each"] == pytest.approx({"Sketch": 100.0, "Winter": 50.0, "Bricks": 30.0})
    (entry,) = report.aggregate(rows)
    assert entry["style_UA"] == pytest.approx(75.0) and entry["n_style"] == 2
    (together,) = report.together_rows(rows)
    assert together["UA"] == pytest.approx(60.0) and together["UA_min"] == pytest.approx(30.0)
    text = report.markdown_report(rows, fid_features="toy-style-features")
    assert (
        "## Several targets at once" in text
        and "| uce | Sketch+Winter+Bricks | style | held-out | 60.00 | 30.00" in text
    )


def test_the_command_line_takes_together_jobs(monkeypatch, tmp_path):
    seen = {}

    class FakeBench:
        def __init__(self, config, progress=True):
            seen["config"] = config

        def run(self):
            return {"rows": [], "failed": [], "fid_features": "toy-style-features"}

    monkeypatch.setattr(bench, "Bench", FakeBench)
    assert main(["bench", "--methods", "uce", "--together", "Sketch,Winter", "--together", "Cats,Trees",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    assert seen["config"].together == ["Sketch+Winter", "Cats+Trees"] and seen["config"].targets == []
    assert main(["bench", "--methods", "uce", "--out", str(tmp_path)]) == 2  # neither --targets nor --together


@pytest.mark.parametrize("method", ["esd", "uce", "ca", "fmn", "spm", "seot", "speed", "rece", "mace", "advunlearn"])
def test_a_concept_given_twice_is_refused(method):
    with pytest.raises(ValueError, match="concepts must be distinct, got 'Van Gogh' twice"):
        erase.make_config(method, concepts=["van gogh", "Van Gogh"])


def test_mace_gets_its_images_and_masks_per_concept_and_keeps_what_both_keep(tmp_path):
    config = bench.BenchConfig(methods=["mace"], targets=[], together=["Cats,Trees"], out=str(tmp_path))
    job = bench.job_config(config, "mace", "Cats+Trees")
    assert job.concepts == ["Cats", "Trees"] and len(job.images) == 2 and len(job.masks) == 2
    assert all("/Cats/" in f for f in job.images[0]) and all("/Trees/" in f for f in job.images[1])
    assert job.domain_preserve and not any(w in p for p in job.domain_preserve for w in ("Cats", "Trees"))
