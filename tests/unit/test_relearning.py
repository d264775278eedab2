"""canvas.relearning's curves (a tiny random pipeline, the toy catalog and judge) and the toy's novel style."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import canvas.relearning as relearning
from canvas import catalog as catalogs
from canvas import toy
from canvas.answers import SamplerPreset
from canvas.judge import Judge
from erase.delta import Delta, fingerprint
from erase.params import select
from erase.relearn import Relearning
from tests.unit.helpers import fresh_pipe

CAT = catalogs.get("toy")
FAST = SamplerPreset("test", steps=2, guidance=3.0)
SETTINGS = Relearning(lr=1e-3, batch_size=2, params="kv")

# sha256 over every toy catalog render (theme x object x index 1..20, label order, raw RGB bytes), computed with
# canvas/toy.py at commit cfdce29, before the novel style existed: adding it must leave every existing image as it was.
CATALOG_RENDERS_SHA256 = "97d75b27b012d5bbce814a02cdea78651da6a1b27c79b4129d358d7962d75be5"


def test_catalog_renders_are_unchanged_and_the_novel_style_is_not_in_the_catalog():
    digest = hashlib.sha256()
    for theme in CAT.themes:
        for obj in CAT.objects:
            for idx in range(1, 21):
                digest.update(np.asarray(toy.render(theme, obj, idx)).tobytes())
    assert digest.hexdigest() == CATALOG_RENDERS_SHA256
    assert relearning.NOVEL in toy.NOVEL_STYLES and relearning.NOVEL not in CAT.themes
    stripes = np.asarray(toy.render(relearning.NOVEL, "Cats", 3))
    assert np.array_equal(stripes, np.asarray(toy.render(relearning.NOVEL, "Cats", 3)))
    assert all(not np.array_equal(stripes, np.asarray(toy.render(t, "Cats", 3))) for t in CAT.themes)
    with pytest.raises(ValueError, match="Plaid"):
        toy.render("Plaid", "Cats", 1)


def test_novel_word_is_a_whole_token_of_the_toy_tokenizer_naming_no_style():
    from transformers import CLIPTokenizer

    from erase.pipeline import toy_path

    tokenizer = CLIPTokenizer.from_pretrained(toy_path() / "tokenizer")
    word = toy.NOVEL_STYLE_WORDS[relearning.NOVEL].lower()
    assert f"{word}</w>" in tokenizer.get_vocab()
    assert all(word not in theme.lower().split("_") for theme in CAT.themes)


def test_the_novel_centroid_rule_recognises_held_out_renders():
    meter = relearning.RateMeter(Judge(CAT), CAT, FAST)
    names = [*CAT.themes, relearning.NOVEL]
    for k, style in enumerate(names):
        images = toy_images(style, 19)
        nearest = torch.cdist(meter.style_features(images), meter.centroids()).argmin(dim=1)
        assert (nearest == k).all(), style


def toy_images(style, idx):
    from canvas.judge import to_unit_tensor

    return to_unit_tensor([relearning._jpeg(toy.render(style, o, idx)) for o in CAT.objects])


def erased(pipe) -> Delta:
    """A stand-in erasure: one K/V tensor of the tiny pipeline scaled."""
    name, p = next(iter(select(pipe.unet, "kv").items()))
    return Delta({f"unet.{name}": p.detach() * 0.5}, {"base_fingerprint": fingerprint(pipe)})


@pytest.fixture(scope="module")
def judge():
    return Judge(CAT)


def curves(pipe, delta, out, judge, **kw):
    values = {"settings": SETTINGS, "seeds": [188], "sampler": FAST, "progress": False, **kw}
    schedule = values.pop("schedule", [1, 2])
    return relearning.relearning_curves(pipe, delta, CAT, "Pop_Art", schedule, out=out, judge=judge, **values)


def test_three_curves_written_resumed_and_refused(tmp_path, judge, monkeypatch):
    pipe = fresh_pipe()
    base = fingerprint(pipe)
    delta = erased(pipe)
    result = curves(pipe, delta, tmp_path, judge)
    assert fingerprint(pipe) == base  # the base is left as it came
    stored = json.loads((tmp_path / relearning.RESULT).read_text())
    assert stored["schedule"] == [0, 1, 2]
    for name in relearning.CURVES:
        record = stored["curves"][name]
        assert record["status"] == "done" and sorted(record["points"], key=int) == ["0", "1", "2"]
        assert all(0 <= p["rate"] <= 1 for p in record["points"].values())
        assert len(record["inputs"]["items"]) == 8 * 3  # Pop_Art x 8 objects x forget indices 1-3, as many each
    assert all(p["ua"] == pytest.approx(1 - p["rate"]) for p in stored["curves"]["target"]["points"].values())
    target_items = stored["curves"]["target"]["inputs"]["items"]
    assert {t for t, _, _ in target_items} == {"Pop_Art"}
    assert "Pop_Art" not in {t for t, _, _ in stored["curves"]["unrelated"]["inputs"]["items"]}
    assert {t for t, _, _ in stored["curves"]["novel"]["inputs"]["items"]} == {relearning.NOVEL}
    assert (tmp_path / "relearning.png").is_file() and result["plot"].endswith("relearning.png")

    calls = []
    real = relearning.relearn
    monkeypatch.setattr(relearning, "relearn", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again = curves(pipe, delta, tmp_path, judge)  # same inputs: every curve reused
    assert calls == [] and again["curves"] == result["curves"]
    curves(pipe, delta, tmp_path, judge, seeds=[288])  # other seeds: all three rerun
    assert len(calls) == 3
    other = Delta({k: v * 0.25 for k, v in delta.tensors.items()}, delta.metadata)
    curves(pipe, other, tmp_path, judge, seeds=[288])  # another delta: the erased curves rerun, novel is reused
    assert len(calls) == 5
    assert fingerprint(pipe) == base


def test_a_failing_curve_is_recorded_and_the_others_finish(tmp_path, judge, monkeypatch):
    pipe = fresh_pipe()
    base = fingerprint(pipe)
    real = relearning.relearn

    def flaky(pipe_, images, prompts, *args, **kwargs):
        if "Pop Art" not in prompts[0] and "New" not in prompts[0]:  # the unrelated curve's images
            raise RuntimeError("disk full")
        return real(pipe_, images, prompts, *args, **kwargs)

    monkeypatch.setattr(relearning, "relearn", flaky)
    result = curves(pipe, erased(pipe), tmp_path, judge, schedule=[1])
    status = {name: record["status"] for name, record in result["curves"].items()}
    assert status == {"target": "done", "unrelated": "failed", "novel": "done"}
    assert "disk full" in result["curves"]["unrelated"]["error"]
    assert fingerprint(pipe) == base


def test_bad_schedule_is_a_clear_error(tmp_path, judge):
    pipe = fresh_pipe()
    with pytest.raises(ValueError, match="strictly increasing"):
        curves(pipe, erased(pipe), tmp_path, judge, schedule=[2, 1])
