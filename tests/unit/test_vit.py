"""The UnlearnCanvas ViT classifier: timm-compatible names, the authors' checkpoint format, label-count checks."""

import pickle

import pytest
import torch

from canvas import classifiers
from canvas.vit import ViTClassifier, load_checkpoint

SMALL = {"image_size": 32, "patch": 16, "depth": 2, "heads": 2}


def _save(tmp_path, classes: int, name: str = "style.pth"):
    model = ViTClassifier(classes, dim=32, **SMALL)
    path = tmp_path / name
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    return model, path


def test_parameter_names_follow_timm():
    names = set(ViTClassifier(51, dim=32, **SMALL).state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias",
            "norm.weight", "head.weight"} <= names  # fmt: skip


def test_checkpoint_round_trip_and_preprocessing(tmp_path):
    model, path = _save(tmp_path, 51)
    loaded = load_checkpoint(path, 51, **SMALL)
    images = torch.rand(2, 3, 48, 48)  # any size: resized to the model's input
    torch.testing.assert_close(loaded(images), model.eval()(images))
    assert loaded(images).shape == (2, 51)


def test_label_count_and_bad_files_are_errors(tmp_path):
    _, path = _save(tmp_path, 20)
    with pytest.raises(ValueError, match="classifies 20 labels, but the catalog has 51"):
        classifiers.load("unlearncanvas-50", "style", root=path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps(object()))
    with pytest.raises(ValueError, match="not a weights-only"):
        load_checkpoint(bad, 51)
    with pytest.raises(ValueError, match="needs its checkpoint"):
        classifiers.load("unlearncanvas-50", "object")
