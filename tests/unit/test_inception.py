"""The FID Inceptions: output shape, weights-only loading of a local state dict, clear errors, and the parts of the
torchvision variant (UnlearnCanvas's FID path) that need no weights: its resizing, input scaling and wrapper."""

import hashlib
import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from canvas import inception


def test_features_and_local_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = inception.FIDInception().eval()
    path = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    loaded = inception.load(path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = loaded(images)
        assert features.shape == (2, 2048)
        torch.testing.assert_close(features, model(images))


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        inception.load(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        inception.load(other)


def test_judge_uses_inception_features_when_given(tmp_path):
    from canvas import catalog
    from canvas.judge import Judge, feature_space

    path = tmp_path / "pt_inception.pth"
    torch.save(inception.FIDInception().state_dict(), path)
    judge = Judge(catalog.get("toy"), inception=str(path))
    style, obj, features = judge(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and style.shape == (2, 11) and obj.shape == (2, 8)
    assert judge.feature_space == "inception-tf2015" == feature_space(catalog.get("toy"), str(path))
    assert judge.weights == hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # the real-feature cache key


def test_feature_space_names():
    from canvas import catalog
    from canvas.judge import current_feature_space, feature_space

    toy, canvas50 = catalog.get("toy"), catalog.get("unlearncanvas-50")
    assert feature_space(toy) == "toy-style-features"
    assert feature_space(canvas50) == "unlearncanvas-50-style-features"
    assert feature_space(toy, "w.pth", "tf2015") == "inception-tf2015"
    assert feature_space(toy, "w.pth", "torchvision") == "inception-torchvision"
    with pytest.raises(ValueError, match="unknown Inception variant 'tf'; accepted: tf2015, torchvision"):
        feature_space(toy, "w.pth", "tf")
    with pytest.raises(ValueError, match="needs Inception weights"):
        feature_space(toy, None, "torchvision")
    assert current_feature_space("toy-style-classifier-head-input") == "toy-style-features"  # rows of older benches
    assert current_feature_space("inception-v3-fid:pt_inception-2015-12-05.pth") == "inception-tf2015"
    assert current_feature_space("inception-torchvision") == "inception-torchvision"


def _fc_only(tmp_path, classes):
    path = tmp_path / f"fc{classes}.pth"
    torch.save({"fc.weight": torch.zeros(classes, 2048), "fc.bias": torch.zeros(classes)}, path)
    return path


def test_a_file_of_the_other_variant_names_the_right_one(tmp_path):
    with pytest.raises(ValueError, match="holds torchvision Inception weights .* use --inception-variant torchvision"):
        inception.load(_fc_only(tmp_path, 1000))
    with pytest.raises(ValueError, match="holds tf2015 Inception weights .* use --inception-variant tf2015"):
        inception.load(_fc_only(tmp_path, 1008), "torchvision")
    with pytest.raises(ValueError, match="unknown Inception variant"):
        inception.load(_fc_only(tmp_path, 1008), "keras")


def test_torchvision_variant_without_torchvision_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    install = r"pip install torch==2\.14\.1 torchvision==0\.29\.1"
    with pytest.raises(ValueError, match=r"needs torchvision.*" + install) as err:
        inception.load(_fc_only(tmp_path, 1000), "torchvision")
    assert "\n" not in str(err.value)


def _bilinear_matrix(n_out, n_in):
    """(n_out, n_in) weights of 1-D linear interpolation sampling pixel centres, (i + 0.5) * n_in / n_out - 0.5,
    clamped at the borders (what cv2's INTER_LINEAR does): an independent reference for the resizing."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        low = int(np.floor(x))
        high = min(low + 1, n_in - 1)
        weights[i, low] += 1 - (x - low)
        weights[i, high] += x - low
    return weights


@pytest.mark.parametrize("side", [512, 40])
def test_unlearncanvas_resize_matches_a_separable_reference(side):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, side, side)).float() / 255  # decoded 8-bit images, as the judge gives
    got = inception.unlearncanvas_resize(images).numpy()
    x = images.numpy().astype(np.float64)
    if side != 512:  # to 512 first, kept as 8-bit values like cv2 on a uint8 image
        up = _bilinear_matrix(512, side)
        x = np.round(up @ x @ up.T * 255) / 255
    down = _bilinear_matrix(299, 512)
    expected = down @ x @ down.T  # separable: rows, then columns
    assert got.shape == (2, 3, 299, 299)
    error = np.abs(got - expected)  # float32 sampling coordinates: ~3e-5
    if side == 512:
        assert error.max() < 1e-4
    else:  # an 8-bit value at 512 rounding the other way moves a pixel by at most 1/255, and rarely
        assert error.max() <= 1 / 255 + 1e-6 and np.mean(error > 1e-4) < 0.002


def test_imagenet_transform_input_turns_imagenet_normalisation_into_half_scaling():
    u = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(inception.imagenet_transform_input((u - mean) / std), (u - 0.5) / 0.5)


class _Recorder(nn.Module):
    """A stand-in network: remembers its input, returns 2048 pooled 'features' (channel means, repeated)."""

    def forward(self, x):
        self.seen = x
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def test_torchvision_fid_feeds_the_network_as_unlearncanvas_does():
    """A constant image c reaches the network as (2c - 1) * std / 0.5 + (mean - 0.5) / 0.5 per channel: scaled to
    [-1, 1] by the authors' code, then rescaled by torchvision's transform_input, at 299 x 299."""
    recorder = _Recorder()
    model = inception.TorchvisionFID(recorder)
    levels = np.array([51, 128, 230]) / 255  # 8-bit values, as decoded images hold
    c = torch.tensor(levels, dtype=torch.float32).view(1, 3, 1, 1)
    features = model(c.expand(2, 3, 64, 64).clone())
    assert features.shape == (2, 2048) and recorder.seen.shape == (2, 3, 299, 299)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (2 * levels - 1) * std / 0.5 + (mean - 0.5) / 0.5
    np.testing.assert_allclose(recorder.seen[0, :, 150, 150].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(recorder.seen.amax(dim=(0, 2, 3)) - recorder.seen.amin(dim=(0, 2, 3)), 0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_variant_matches_unlearncanvas_construction(tmp_path):
    """Our wrapper over a random torchvision Inception-v3 state equals the authors' construction on the same
    weights: inception_v3 with transform_input=True fed x * 2 - 1, Mixed_7c average-pooled."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    # Batch-norm statistics of the random network's own activations, so that they stay near unit scale as in a
    # trained network (with the initial statistics they reach ~1e5, where float rounding alone differs by ~1e3).
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average
    with torch.no_grad():
        for _ in range(2):
            reference(torch.rand(4, 3, 299, 299) * 2 - 1)
    reference.eval()
    path = tmp_path / "inception_v3_google.pth"
    torch.save(reference.state_dict(), path)
    ours = inception.load(path, "torchvision")
    pooled = {}
    reference.Mixed_7c.register_forward_hook(lambda m, i, out: pooled.update(x=out.mean(dim=(2, 3))))
    images = torch.randint(0, 256, (2, 3, 512, 512)).float() / 255
    with torch.no_grad():
        reference(inception.unlearncanvas_resize(images) * 2 - 1)
        torch.testing.assert_close(ours(images), pooled["x"], rtol=1e-4, atol=1e-5)
