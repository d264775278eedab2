"""The procedural toy dataset and the classifier loader: determinism, distinctness, layout, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from canvas import catalog, classifiers, toy

CAT = catalog.get("toy")


def pixels(style: str, obj: str, idx: int) -> np.ndarray:
    return np.asarray(toy.render(style, obj, idx), dtype=np.float32)


def test_render_is_deterministic_rgb_32px() -> None:
    a, b = toy.render("Pop_Art", "Cats", 3), toy.render("Pop_Art", "Cats", 3)
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_every_theme_and_object_renders_distinctly() -> None:
    """Every pair of themes (same object, index) and every pair of objects (same theme, index) differs clearly."""
    for idx in (1, 20):
        by_theme = {t: pixels(t, "Trees", idx) for t in CAT.themes}
        for i, t1 in enumerate(CAT.themes):
            for t2 in CAT.themes[i + 1 :]:
                assert np.abs(by_theme[t1] - by_theme[t2]).mean() > 20, (t1, t2)
        by_object = {o: pixels("Winter", o, idx) for o in CAT.objects}
        for i, o1 in enumerate(CAT.objects):
            for o2 in CAT.objects[i + 1 :]:
                assert np.abs(by_object[o1] - by_object[o2]).mean() > 5, (o1, o2)


def test_index_varies_the_pose_and_style_keeps_it() -> None:
    assert np.abs(pixels("Sketch", "Fishes", 1) - pixels("Sketch", "Fishes", 2)).mean() > 5
    # The silhouette (navy in Winter, blue on yellow in Crayon) is the same seed image in every style.
    winter, crayon = pixels("Winter", "Towers", 7), pixels("Crayon", "Towers", 7)
    assert ((winter[..., 0] < 100) == (crayon[..., 2] > crayon[..., 0])).mean() > 0.9
    other = pixels("Crayon", "Towers", 8)
    assert ((winter[..., 0] < 100) == (other[..., 2] > other[..., 0])).mean() < 0.9


def test_render_rejects_unknown_names_and_indices() -> None:
    with pytest.raises(ValueError, match="Van_Gogh"):
        toy.render("Van_Gogh", "Cats", 1)
    with pytest.raises(ValueError, match="Dogs"):
        toy.render("Winter", "Dogs", 1)
    with pytest.raises(ValueError, match="index"):
        toy.render("Winter", "Cats", 0)


def test_export_writes_unlearncanvas_layout(tmp_path) -> None:
    toy.export(tmp_path, indices=[1, 2])
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    expected = sorted(f"{t}/{o}/{i}.jpg" for t in CAT.themes for o in CAT.objects for i in (1, 2))
    assert files == expected
    assert "Seed_Images/Cats/1.jpg" in files


def test_classifier_load_errors_name_the_bad_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="unlearncanvas-99.*accepted: toy"):
        classifiers.load("unlearncanvas-99", "style")
    with pytest.raises(ValueError, match="'colour'.*style, object"):
        classifiers.load("toy", "colour")
    with pytest.raises(FileNotFoundError, match="build_toy"):
        classifiers.load("toy", "style", root=tmp_path)


def write_classifier(root, kind: str, labels: list[str]) -> None:
    model = classifiers.ToyClassifier(len(labels), width=8)
    save_file(model.state_dict(), root / f"{kind}.safetensors")
    config = {kind: {"labels": labels, "width": 8, "size": 32}}
    (root / "config.json").write_text(json.dumps(config))


def test_classifier_round_trip_gives_logits_in_catalog_order(tmp_path) -> None:
    write_classifier(tmp_path, "object", list(CAT.objects))
    model = classifiers.load("toy", "object", root=tmp_path)
    logits = model(torch.rand(2, 3, 64, 64))  # any size is resized to the classifier's 32x32
    assert logits.shape == (2, len(CAT.objects))


def test_classifier_label_mismatch_is_an_error(tmp_path) -> None:
    write_classifier(tmp_path, "style", list(CAT.themes[:-1]))
    with pytest.raises(ValueError, match="labels"):
        classifiers.load("toy", "style", root=tmp_path)
