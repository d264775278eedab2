"""The FID Inception: output shape, weights-only loading of a local state dict, clear errors."""

import pytest
import torch

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
    assert judge.feature_space == "inception-v3-fid:pt_inception.pth" == feature_space(catalog.get("toy"), str(path))
