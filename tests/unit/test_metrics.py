import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import torch

from canvas import catalog, metrics

UC = catalog.get("unlearncanvas-50")
SEEDS = 5


def answer_set():
    """Names and true labels of the UnlearnCanvas-50 answer set: 51 themes x 20 objects x 5 seeds = 5,100 images."""
    themes = [t for t in UC.themes for _ in UC.objects for _ in range(SEEDS)]
    objects = [o for _ in UC.themes for o in UC.objects for _ in range(SEEDS)]
    style_true, object_true = metrics.true_labels(UC, themes, objects)
    return themes, objects, style_true, object_true


def test_style_target_hand_computed_and_photo_outside_s50():
    acc_s = torch.full((51,), 0.8, dtype=torch.float64)
    acc_s[UC.style_label("Van_Gogh")] = 0.1
    acc_s[UC.style_label("Seed_Images")] = 0.0  # photo is in the head but not in S50: must not move IRA
    acc_o = torch.linspace(0.5, 0.9, 20, dtype=torch.float64)
    s = metrics.unlearning_scores(acc_s, acc_o, UC, "Van_Gogh")
    assert s.kind == "style" and s.ira_terms == 49 and s.cra_terms == 20
    assert s.ua == pytest.approx(0.9) and s.ira == pytest.approx(0.8) and s.cra == pytest.approx(0.7)
    assert s.percent() == pytest.approx({"UA": 90.0, "IRA": 80.0, "CRA": 70.0})


def test_object_target_hand_computed():
    acc_o = torch.full((20,), 0.6, dtype=torch.float64)
    acc_o[UC.object_label("Cats")] = 0.25
    acc_s = torch.ones(51, dtype=torch.float64)
    acc_s[UC.style_label("Seed_Images")] = 0.0  # excluded from CRA
    acc_s[UC.style_label("Monet")] = 0.5
    s = metrics.unlearning_scores(acc_s, acc_o, UC, "Cats")
    assert s.kind == "object" and s.ira_terms == 19 and s.cra_terms == 50
    assert s.ua == pytest.approx(0.75) and s.ira == pytest.approx(0.6) and s.cra == pytest.approx(49.5 / 50)


def test_object_accuracy_counts_the_unlearned_styles_images():
    themes, objects, style_true, object_true = answer_set()
    on_target = torch.tensor([t == "Van_Gogh" for t in themes])
    style_pred = torch.where(on_target, torch.tensor(UC.style_label("Seed_Images")), style_true)  # style erased
    object_pred = torch.where(on_target, (object_true + 1) % 20, object_true)  # and its objects lost with it
    metric = metrics.UnlearningAccuracy(UC, "Van_Gogh")
    metric.update(style_pred, object_pred, style_true, object_true)
    s = metric.scores()
    assert s.ua == 1.0 and s.ira == 1.0
    assert s.cra == pytest.approx(50 / 51)  # every object loses its Van Gogh images: 50 of 51 themes right
    assert torch.allclose(metric.object_accuracy(), torch.full((20,), 50 / 51, dtype=torch.float64))
    out = metric.compute()
    assert float(out["UA"]) == 1.0 and float(out["CRA"]) == pytest.approx(50 / 51)


def test_object_target_from_predictions():
    themes, objects, style_true, object_true = answer_set()
    on_cats = torch.tensor([o == "Cats" for o in objects])
    object_pred = torch.where(on_cats, torch.tensor(UC.object_label("Dogs")), object_true)
    photo = torch.tensor([t == "Seed_Images" for t in themes])
    style_pred = torch.where(photo, torch.tensor(0), style_true)  # photo images all misread: outside S50
    s = metrics.UnlearningAccuracy(UC, "Cats")
    s.update(style_pred, object_pred, style_true, object_true)
    assert s.scores() == metrics.UnlearningScores("Cats", "object", 1.0, 1.0, 1.0, 19, 50)


def test_chunked_updates_equal_one_update():
    g = torch.Generator().manual_seed(0)
    themes, objects, style_true, object_true = answer_set()
    style_logits = torch.randn(len(themes), 51, generator=g) + 3 * torch.nn.functional.one_hot(style_true, 51)
    object_pred = torch.where(
        torch.rand(len(themes), generator=g) < 0.7, object_true, torch.randint(0, 20, (len(themes),), generator=g)
    )
    whole = metrics.UnlearningAccuracy(UC, "Monet")
    whole.update(style_logits, object_pred, style_true, object_true)
    chunked = metrics.UnlearningAccuracy(UC, "Monet")
    for i in range(0, len(themes), 333):
        chunked.update(
            style_logits[i : i + 333], object_pred[i : i + 333], style_true[i : i + 333], object_true[i : i + 333]
        )
    assert whole.scores() == chunked.scores()
    per_class = metrics.ClassAccuracy(51)
    for i in range(0, len(themes), 1000):
        per_class.update(style_logits[i : i + 1000], style_true[i : i + 1000])
    assert torch.equal(per_class.compute(), whole.style_accuracy())
    assert torch.equal(per_class.compute(), metrics.class_accuracy(style_logits, style_true, 51))


def test_class_accuracy_gaps_and_errors():
    acc = metrics.class_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    assert acc[0] == 0.5 and acc[1] == 1.0 and math.isnan(acc[2])
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.class_accuracy(torch.tensor([0]), torch.tensor([3]), 3)
    acc_s = torch.ones(51, dtype=torch.float64)
    acc_s[UC.style_label("Monet")] = math.nan
    with pytest.raises(ValueError, match="no answer-set images for Monet, needed for IRA"):
        metrics.unlearning_scores(acc_s, torch.ones(20), UC, "Van_Gogh")
    with pytest.raises(ValueError, match="photo class is not a benchmark style"):
        metrics.unlearning_scores(torch.ones(51), torch.ones(20), UC, "Seed_Images")
    with pytest.raises(ValueError, match="50 style accuracies given; catalog has 51"):
        metrics.unlearning_scores(torch.ones(50), torch.ones(20), UC, "Monet")
    with pytest.raises(ValueError, match="neither a style nor an object"):
        metrics.UnlearningAccuracy(UC, "Impasto")


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
    assert metrics.fid_from_features(a, b) == pytest.approx(reference_fid(a, b), rel=1e-9, abs=1e-9)
    assert metrics.fid_from_features(torch.from_numpy(a).float(), torch.from_numpy(a).float()) == pytest.approx(
        0, abs=1e-9
    )
    few = rng.normal(size=(8, 16))  # singular covariance: still real, finite and non-negative
    value = metrics.fid_from_features(few, a)
    assert math.isfinite(value) and value > 0


def test_feature_stats_chunks_merge_and_cache(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(loc=5.0, size=(200, 16))
    one = metrics.FeatureStats.from_features(x)
    chunked = metrics.FeatureStats.empty(16)
    for i in range(0, 200, 37):
        chunked.update(x[i : i + 37])
    assert chunked.count == 200
    np.testing.assert_allclose(chunked.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(chunked.cov, np.cov(x, rowvar=False), rtol=1e-10)
    merged = metrics.FeatureStats.from_features(x[:50]).merge(metrics.FeatureStats.from_features(x[50:]))
    np.testing.assert_allclose(merged.cov, one.cov, rtol=1e-10)
    keep = np.arange(200) % 2 == 0
    np.testing.assert_allclose(
        metrics.FeatureStats.from_features(x, keep).cov, np.cov(x[keep], rowvar=False), rtol=1e-10
    )

    calls = []

    def compute():
        calls.append(1)
        return metrics.FeatureStats.from_features(x)

    path = tmp_path / "real.npz"
    meta = {"extractor": "test", "indices": "1-5"}
    first = metrics.FeatureStats.cached(path, meta, compute)
    again = metrics.FeatureStats.cached(path, meta, compute)
    assert len(calls) == 1 and again.meta == meta and again.count == 200
    np.testing.assert_array_equal(again.scatter, first.scatter)
    metrics.FeatureStats.cached(path, {**meta, "exclude": "Monet"}, compute)
    assert len(calls) == 2  # different meta: stale cache recomputed
    with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
        assert set(z.files) == {"count", "mean", "scatter", "meta"}


def test_frechet_metric_chunks_filter_and_reference(tmp_path):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(120, 8)), rng.normal(loc=0.5, size=(120, 8))
    themes = ["Monet" if i % 3 == 0 else "Winter" for i in range(120)]
    objects = ["Cats"] * 120
    expected_all = metrics.fid_from_features(fake, real)
    m = metrics.FrechetDistance(8)
    for i in range(0, 120, 25):
        m.update(torch.from_numpy(real[i : i + 25]), real=True)
        m.update(torch.from_numpy(fake[i : i + 25]), real=False)
    assert float(m.compute()) == pytest.approx(expected_all, rel=1e-9)

    keep = metrics.exclude_target(UC, "Monet")
    kept = np.array([t != "Monet" for t in themes])
    filtered = metrics.FrechetDistance(8, keep=keep)
    filtered.update(torch.from_numpy(real), True, themes, objects)
    filtered.update(torch.from_numpy(fake), False, themes, objects)
    assert float(filtered.compute()) == pytest.approx(metrics.fid_from_features(fake[kept], real[kept]), rel=1e-9)
    with pytest.raises(ValueError, match="pass the theme and object"):
        filtered.update(torch.from_numpy(real), True)

    bank = metrics.FeatureBank(real, themes, objects, {"extractor": "test"})
    bank = metrics.FeatureBank.load(bank.save(tmp_path / "bank.npz"))
    assert metrics.FeatureBank.cached(tmp_path / "bank.npz", {"extractor": "test"}, lambda: 1 / 0).meta == bank.meta
    with_ref = metrics.FrechetDistance(8, keep=keep, reference=bank.stats(keep))
    with_ref.update(torch.from_numpy(fake), False, themes, objects)
    assert float(with_ref.compute()) == pytest.approx(float(filtered.compute()), rel=1e-5)  # bank stores float32
    with pytest.raises(ValueError, match="come from `reference`"):
        with_ref.update(torch.from_numpy(real), True, themes, objects)
    assert metrics.exclude_target(UC, "Cats")("Monet", "Cats") is False


def test_efficiency_from_record():
    record = {"wall_time_s": 12.5, "peak_memory_bytes": 3_000_000_000, "storage_bytes": 500_000_000, "other": 1}
    assert metrics.efficiency(record) == metrics.Efficiency(12.5, 3.0, 0.5)
    assert metrics.efficiency({"wall_time_s": 1, "peak_memory_bytes": None}) == metrics.Efficiency(1.0, None, None)
    cpu = metrics.efficiency({**record, "memory_kind": "peak_rss"})
    assert cpu.memory_kind == "peak_rss"
    scores = metrics.UnlearningScores("Monet", "style", 1.0, 1.0, 1.0, 49, 20)
    assert metrics.target_row("esd", scores, None, cpu)["memory_kind"] == "peak_rss"

    @dataclass
    class Record:
        wall_time_s: float
        peak_memory_bytes: int
        storage_bytes: int

    assert metrics.efficiency(Record(2.0, 10**9, 0)) == metrics.Efficiency(2.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="'peak_memory_bytes' is -1"):
        metrics.efficiency({"peak_memory_bytes": -1})


def test_storage_bytes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "d" / "a.json").write_bytes(b"y" * 20)
    assert metrics.storage_bytes(tmp_path / "d") == 120
    assert metrics.storage_bytes(tmp_path / "d" / "a.json") == 20


def _row(method, target, kind, ua, fid=50.0, time_s=10.0):
    s = metrics.UnlearningScores(target, kind, ua, 0.9, 0.8, 49 if kind == "style" else 19, 20)
    return metrics.target_row(method, s, fid, metrics.Efficiency(time_s, 2.0, None))


def test_rows_and_aggregation():
    rows = [
        _row("esd", "Monet", "style", 1.0),
        _row("esd", "Winter", "style", 0.5, fid=70.0),
        _row("esd", "Cats", "object", 0.2, time_s=30.0),
        _row("uce", "Monet", "style", 0.9, fid=None),
    ]
    assert rows[0]["UA"] == 100.0 and rows[0]["kind"] == "style" and rows[0]["storage_gb"] is None
    table = metrics.aggregate(rows)
    assert [t["method"] for t in table] == ["esd", "uce"]
    esd, uce = table
    assert esd["style_UA"] == pytest.approx(75.0) and esd["object_UA"] == pytest.approx(20.0)
    assert esd["FID"] == pytest.approx(170 / 3) and esd["time_s"] == pytest.approx(50 / 3)
    assert (esd["n_style"], esd["n_object"]) == (2, 1)
    assert uce["object_UA"] is None and uce["FID"] is None and uce["storage_gb"] is None
    assert set(esd) == set(metrics.TABLE_KEYS)
    with pytest.raises(ValueError, match="kind 'concept'"):
        metrics.aggregate([{**rows[0], "kind": "concept"}])
    with pytest.raises(ValueError, match=r"lacks \['FID'\]"):
        metrics.aggregate([{k: v for k, v in rows[0].items() if k != "FID"}])
