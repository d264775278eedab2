import json

import pytest

from canvas import splits


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
