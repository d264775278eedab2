import json
from dataclasses import replace

import pytest

from canvas import splits
from canvas.catalog import get


def test_v1_roles_match_reference():
    s = splits.unlearncanvas_v1()
    assert s.finetune == tuple(range(1, 19)) and s.held_out == (19, 20)
    assert s.fid_reference == (1, 2, 3, 4, 5) and s.forget_retain == (1, 2, 3) and s.fmn_reference == (1,)
    assert "off-by-one" in s.notes["held_out"]


def test_round_trip(tmp_path):
    path = splits.write_manifest(tmp_path / "sub" / "m.json")
    assert splits.read_manifest(path) == splits.unlearncanvas_v1()
    assert splits.load(str(path)).notes == splits.unlearncanvas_v1().notes
    assert not list(path.parent.glob("*.tmp"))


def test_shipped_asset_equals_code_definition():
    shipped = splits.read_manifest(splits.splits_dir() / "unlearncanvas-v1.json")
    assert shipped == splits.unlearncanvas_v1() and shipped.notes == splits.unlearncanvas_v1().notes
    assert splits.load() == shipped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version is 2"),
        ({"schema": "other"}, "schema is 'other'"),
        ({"held_out": [18, 19, 20]}, r"held_out indices \[18\]"),
        ({"finetune": list(range(1, 18))}, r"indices \[18\] are neither"),
        ({"fid_reference": [0, 1]}, "positive integers"),
        ({"fmn_reference": [21]}, r"uses \[21\], outside"),
        ({"forget_retain": []}, "is empty"),
        ({"forget_retain": [3, 1]}, "sorted without repeats"),
        ({"extra_role": [1]}, "unknown: \\['extra_role'\\]"),
        ({"tuning_targets": {"toy": ["Pop_Art", "Van_Gogh"]}}, "holds \\['Van_Gogh'\\], not styles"),
        ({"tuning_targets": {"toy": ["Seed_Images"]}}, "holds \\['Seed_Images'\\]"),
        ({"tuning_targets": {"toy": ["Cats", "Cats"]}}, "repeats a target"),
        ({"tuning_targets": {"toy": "Cats"}}, "must be a list of target names"),
        ({"tuning_targets": {"mini": []}}, "names catalog 'mini'; accepted: unlearncanvas-50"),
        ({"tuning_targets": ["Cats"]}, "must map catalog names"),
    ],
)
def test_bad_manifest_is_named(tmp_path, change, message):
    data = {**splits.unlearncanvas_v1().to_dict(), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(splits.SplitsError, match=message):
        splits.read_manifest(path)


def test_missing_field_and_bad_json(tmp_path):
    data = splits.unlearncanvas_v1().to_dict()
    del data["held_out"]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(splits.SplitsError, match=r"missing: \['held_out'\]"):
        splits.read_manifest(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(splits.SplitsError, match="not valid JSON"):
        splits.read_manifest(tmp_path / "b.json")
    with pytest.raises(splits.SplitsError, match="unknown splits 'nope'"):
        splits.load("nope")
    with pytest.raises(splits.SplitsError, match="unknown split role"):
        splits.unlearncanvas_v1().role("train")


def test_tuning_targets_are_written_in_the_manifest():
    """The toy's are fixed (its presets were tuned on them); UnlearnCanvas's are our choice, the same for 50 and 60."""
    toy, c50, c60 = (get(name) for name in ("toy", "unlearncanvas-50", "unlearncanvas-60"))
    assert splits.tuning_targets(toy) == ("Pop_Art", "Watercolor", "Cats", "Towers")
    assert splits.tuning_targets(c50) == ("Pop_Art", "Van_Gogh", "Watercolor", "Cats", "Towers")
    assert splits.tuning_targets("unlearncanvas-60") == splits.tuning_targets(c50)
    assert "our choice" in splits.unlearncanvas_v1().notes["tuning_targets"]
    shipped = json.loads((splits.splits_dir() / "unlearncanvas-v1.json").read_text())
    assert shipped["tuning_targets"]["toy"] == ["Pop_Art", "Watercolor", "Cats", "Towers"]
    for cat in (toy, c50, c60):
        tuning, held = splits.tuning_targets(cat), splits.held_out_targets(cat)
        everything = (*cat.styles, *cat.objects)
        assert set(tuning).isdisjoint(held) and sorted(tuning + held) == sorted(everything)
        assert list(held) == [t for t in everything if t not in tuning]  # catalog order, styles first
        assert all(splits.target_split(cat, t) == "tuning" for t in tuning)
        assert all(splits.target_split(cat, t) == "held-out" for t in held)


def test_target_splits_follow_the_given_manifest_in_catalog_order():
    toy = get("toy")
    manifest = replace(splits.unlearncanvas_v1(), tuning_targets={"toy": ["Towers", "Bricks"]})
    assert splits.tuning_targets(toy, manifest) == ("Bricks", "Towers")  # styles first, each in catalog order
    assert splits.held_out_targets(toy, manifest)[:2] == ("Crayon", "Mosaic")
    assert splits.target_split(toy, "Pop_Art", manifest) == "held-out"
    with pytest.raises(splits.SplitsError, match="'Nope' is neither a style nor an object of catalog 'toy'"):
        splits.target_split(toy, "Nope")
    empty = replace(splits.unlearncanvas_v1(), tuning_targets={"toy": []})
    assert splits.held_out_targets(toy, empty) == (*toy.styles, *toy.objects)


def test_an_older_manifest_reads_but_has_no_target_splits(tmp_path):
    """Without `tuning_targets`, index roles still read; asking for target splits is an error rather than
    "everything held out", which would report tuning targets as results."""
    data = splits.unlearncanvas_v1().to_dict()
    del data["tuning_targets"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = splits.read_manifest(path)
    assert old.tuning_targets is None and old.finetune == splits.unlearncanvas_v1().finetune
    assert "tuning_targets" not in old.to_dict()
    with pytest.raises(splits.SplitsError, match="predates tuning targets") as err:
        splits.held_out_targets(get("toy"), old)
    assert "\n" not in str(err.value)
    only_toy = replace(splits.unlearncanvas_v1(), tuning_targets={"toy": ["Cats"]})
    with pytest.raises(splits.SplitsError, match="lists tuning targets for toy, not 'unlearncanvas-50'"):
        splits.target_split("unlearncanvas-50", "Cats", only_toy)
