"""FID: the Frechet distance, the one accumulator of feature statistics, the bank and the torchmetrics wrapper."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from canvas import catalog, fid

UC = catalog.get("unlearncanvas-50")


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent textbook FID: numpy moments and scipy's sqrtm (real part)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(loc=0.3, scale=1.5, size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5
    assert fid.fid_from_features(a, b) == pytest.approx(reference_fid(a, b), rel=1e-9, abs=1e-9)
    assert fid.fid_from_features(torch.from_numpy(a).float(), torch.from_numpy(a).float()) == pytest.approx(0, abs=1e-9)
    few = rng.normal(size=(8, 16))  # singular covariance: still real, finite and non-negative
    value = fid.fid_from_features(few, a)
    assert math.isfinite(value) and value > 0


def test_feature_stats_chunks_merge_and_cache(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(loc=5.0, size=(200, 16))
    one = fid.FeatureStats.from_features(x)
    chunked = fid.FeatureStats.empty(16)
    for i in range(0, 200, 37):
        chunked.update(x[i : i + 37])
    assert chunked.count == 200
    np.testing.assert_allclose(chunked.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(chunked.cov, np.cov(x, rowvar=False), rtol=1e-10)
    merged = fid.FeatureStats.from_features(x[:50]).merge(fid.FeatureStats.from_features(x[50:]))
    np.testing.assert_allclose(merged.cov, one.cov, rtol=1e-10)
    keep = np.arange(200) % 2 == 0
    np.testing.assert_allclose(fid.FeatureStats.from_features(x, keep).cov, np.cov(x[keep], rowvar=False), rtol=1e-10)

    calls = []

    def compute():
        calls.append(1)
        return fid.FeatureStats.from_features(x)

    path = tmp_path / "real.npz"
    meta = {"extractor": "test", "indices": "1-5"}
    first = fid.FeatureStats.cached(path, meta, compute)
    again = fid.FeatureStats.cached(path, meta, compute)
    assert len(calls) == 1 and again.meta == meta and again.count == 200
    np.testing.assert_array_equal(again.scatter, first.scatter)
    fid.FeatureStats.cached(path, {**meta, "exclude": "Monet"}, compute)
    assert len(calls) == 2  # different meta: stale cache recomputed
    with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
        assert set(z.files) == {"count", "mean", "scatter", "meta"}


def test_frechet_metric_chunks_filter_and_reference(tmp_path):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(120, 8)), rng.normal(loc=0.5, size=(120, 8))
    themes = ["Monet" if i % 3 == 0 else "Winter" for i in range(120)]
    objects = ["Cats"] * 120
    expected_all = fid.fid_from_features(fake, real)
    m = fid.FrechetDistance(8)
    for i in range(0, 120, 25):
        m.update(torch.from_numpy(real[i : i + 25]), real=True)
        m.update(torch.from_numpy(fake[i : i + 25]), real=False)
    assert float(m.compute()) == pytest.approx(expected_all, rel=1e-9)

    keep = fid.exclude_target(UC, "Monet")
    kept = np.array([t != "Monet" for t in themes])
    filtered = fid.FrechetDistance(8, keep=keep)
    filtered.update(torch.from_numpy(real), True, themes, objects)
    filtered.update(torch.from_numpy(fake), False, themes, objects)
    assert float(filtered.compute()) == pytest.approx(fid.fid_from_features(fake[kept], real[kept]), rel=1e-9)
    with pytest.raises(ValueError, match="pass the theme and object"):
        filtered.update(torch.from_numpy(real), True)

    bank = fid.FeatureBank(real, themes, objects, {"extractor": "test"})
    bank = fid.FeatureBank.load(bank.save(tmp_path / "bank.npz"))
    assert fid.FeatureBank.cached(tmp_path / "bank.npz", {"extractor": "test"}, lambda: 1 / 0).meta == bank.meta
    with_ref = fid.FrechetDistance(8, keep=keep, reference=bank.stats(keep))
    with_ref.update(torch.from_numpy(fake), False, themes, objects)
    assert float(with_ref.compute()) == pytest.approx(float(filtered.compute()), rel=1e-5)  # bank stores float32
    with pytest.raises(ValueError, match="come from `reference`"):
        with_ref.update(torch.from_numpy(real), True, themes, objects)
    assert fid.exclude_target(UC, "Cats")("Monet", "Cats") is False


def test_the_metric_accumulates_through_feature_stats():
    """One accumulator: the metric's state is packed FeatureStats, so its statistics equal FeatureStats fed the same
    chunks bit for bit, and merging two processes' states is FeatureStats.merge."""
    rng = np.random.default_rng(3)
    fake = rng.normal(loc=2.0, size=(90, 6))
    metric, stats = fid.FrechetDistance(6), fid.FeatureStats.empty(6)
    for i in range(0, 90, 32):
        metric.update(torch.from_numpy(fake[i : i + 32]), real=False)
        stats.update(fake[i : i + 32])
    got = metric.generated_stats()
    assert got.count == stats.count == 90
    np.testing.assert_array_equal(got.mean, stats.mean)
    np.testing.assert_array_equal(got.scatter, stats.scatter)

    packed = stats.pack()
    assert packed.dtype == torch.float64 and packed.shape == (1 + 6 + 36,)
    again = fid.FeatureStats.unpack(packed)
    assert again.count == 90 and np.array_equal(again.scatter, stats.scatter)
    with pytest.raises(ValueError, match="not a packed FeatureStats"):
        fid.FeatureStats.unpack(torch.zeros(5, dtype=torch.float64))

    first, second = fid.FrechetDistance(6), fid.FrechetDistance(6)  # two processes' halves
    first.update(torch.from_numpy(fake[:40]), real=False)
    second.update(torch.from_numpy(fake[40:]), real=False)
    first.merge_state(second)
    expected = fid.FeatureStats.from_features(fake[:40]).merge(fid.FeatureStats.from_features(fake[40:]))
    np.testing.assert_array_equal(first.generated_stats().scatter, expected.scatter)
    np.testing.assert_allclose(first.generated_stats().cov, np.cov(fake, rowvar=False), rtol=1e-10)
