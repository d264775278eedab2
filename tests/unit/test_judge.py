"""Scoring an answer set without FID (`accuracy_scores`, `target_probability`): the toy's classifiers on renders
laid out as an answer set."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from canvas import answers, catalog, metrics, toy
from canvas.judge import Judge, accuracy_scores, load_images, target_probability
from erase.atomic import save_image, write_json

CAT = catalog.get("toy")
TARGET = "Sketch"


def answer_folder(folder: Path, erased: bool) -> Path:
    """Every theme x object at one seed, each image the toy's render (index 19, held out) of its own theme; with
    `erased`, the target's prompts show the photo class instead, as a model that forgot the style would draw them."""
    items = answers.answer_items(CAT, seeds=(188,))
    for it in items:
        shown = CAT.photo if erased and it.theme == TARGET else it.theme
        save_image(toy.render(shown, it.object, 19), folder / it.filename, quality=95)
    write_json(
        folder / answers.MANIFEST, {"answer_version": answers.ANSWER_VERSION, "items": [asdict(i) for i in items]}
    )
    return folder


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge(CAT)


def test_an_erased_style_scores_a_high_ua_and_the_untouched_one_a_low_ua(tmp_path, judge):
    kept = accuracy_scores(judge, answer_folder(tmp_path / "kept", erased=False), TARGET)
    gone = accuracy_scores(judge, answer_folder(tmp_path / "gone", erased=True), TARGET)
    assert (kept.target, kept.kind, kept.ira_terms, kept.cra_terms) == (TARGET, "style", len(CAT.styles) - 1, 8)
    assert kept.ua <= 0.25 < 0.75 <= gone.ua, (kept, gone)
    assert gone.ira == kept.ira >= 0.75, "the other styles' images are the same in both folders"


def test_it_scores_what_the_metric_scores_on_the_same_images(tmp_path, judge):
    folder = answer_folder(tmp_path / "set", erased=True)
    items, paths, _ = answers.load_answer_set(folder)
    style, obj, _ = judge(load_images(paths))
    expected = metrics.UnlearningAccuracy(CAT, TARGET)
    expected.update(style, obj, *metrics.true_labels(CAT, [i.theme for i in items], [i.object for i in items]))
    assert accuracy_scores(judge, folder, TARGET) == expected.scores()
    assert accuracy_scores(judge, str(folder), TARGET) == expected.scores(), "a path as a string works too"


def test_an_incomplete_answer_set_is_refused(tmp_path, judge):
    folder = answer_folder(tmp_path / "set", erased=False)
    next(folder.glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 images"):
        accuracy_scores(judge, folder, TARGET)


def test_the_target_probability_is_the_mean_softmax_of_its_class_on_its_own_images(tmp_path, judge):
    folder = answer_folder(tmp_path / "set", erased=False)
    items, paths, _ = answers.load_answer_set(folder)
    style, _, _ = judge(load_images(paths))
    own = [n for n, it in enumerate(items) if it.theme == TARGET]
    expected = float(style.softmax(-1)[own, CAT.style_label(TARGET)].mean())
    assert target_probability(judge, folder, TARGET) == pytest.approx(expected, rel=1e-6)
    gone = target_probability(judge, answer_folder(tmp_path / "gone", erased=True), TARGET)
    assert gone < 0.25 < 0.75 < expected, "erasing the style must lower its probability on its own images"


def test_the_target_probability_of_targets_erased_together_is_their_mean(tmp_path, judge):
    folder = answer_folder(tmp_path / "set", erased=False)
    together = target_probability(judge, folder, f"{TARGET}{metrics.TOGETHER}Winter")
    assert together == pytest.approx(
        (target_probability(judge, folder, TARGET) + target_probability(judge, folder, "Winter")) / 2
    )
