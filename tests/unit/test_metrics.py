import math
from dataclasses import dataclass

import pytest
import torch

from canvas import catalog, metrics, report

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


def test_efficiency_from_record():
    record = {"wall_time_s": 12.5, "peak_memory_bytes": 3_000_000_000, "storage_bytes": 500_000_000, "other": 1}
    assert metrics.efficiency(record) == metrics.Efficiency(12.5, 3.0, 0.5)
    assert metrics.efficiency({"wall_time_s": 1, "peak_memory_bytes": None}) == metrics.Efficiency(1.0, None, None)
    cpu = metrics.efficiency({**record, "memory_kind": "peak_rss"})
    assert cpu.memory_kind == "peak_rss"
    scores = metrics.UnlearningScores("Monet", "style", 1.0, 1.0, 1.0, 49, 20)
    assert report.target_row("esd", scores, None, cpu)["memory_kind"] == "peak_rss"

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
