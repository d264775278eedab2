import csv
import json

import numpy as np
import pytest
from PIL import Image

from canvas import metrics, report

SPACE = "toy-style-classifier-head-input"


def _rows():
    rows = []
    for method, shift in (("esd", 0.0), ("uce", 10.0)):
        for target, kind in (("Van_Gogh", "style"), ("Monet", "style"), ("Cats", "object")):
            rows.append(
                {"method": method, "target": target, "kind": kind, "UA": 90.0 - shift, "IRA": 80.0 + shift / 2,
                 "CRA": 70.0 + shift, "FID": 60.0, "time_s": 123.4, "memory_gb": 17.8, "storage_gb": 0.0001}
            )  # fmt: skip
    rows.append(
        {"method": "styleonly", "target": "Monet", "kind": "style", "UA": np.float32(50.0), "IRA": 60.0, "CRA": 70.0,
         "FID": None, "time_s": 5.0, "memory_gb": None, "storage_gb": 0.0, "preset": "toy"}
    )  # fmt: skip
    return rows


def test_markdown_table_one_row_per_method_and_dash_for_missing_kind():
    text = report.markdown_table(_rows(), fid_features=SPACE)
    lines = text.splitlines()
    assert lines[0].startswith(
        "| Method | Style UA | Style IRA | Style CRA | Object UA | Object IRA | Object CRA | FID[toy-style-classifier-"
    )
    assert lines[0].endswith("| Time (s) | Memory (GB) | Storage (GB) |")
    body = lines[2:]
    assert [line.split("|")[1].strip() for line in body] == ["esd", "uce", "styleonly"]
    cells = [c.strip() for c in body[2].split("|")[1:-1]]
    assert cells == ["styleonly", "50.00", "60.00", "70.00", "-", "-", "-", "-", "5.0", "-", "0.00"]
    esd = [c.strip() for c in body[0].split("|")[1:-1]]
    assert esd[1:5] == ["90.00", "80.00", "70.00", "90.00"] and esd[8:] == ["123", "17.80", "0.0001"]


def test_write_report_files(tmp_path):
    paths = report.write_report(
        tmp_path / "out", _rows(), {"model": "toy", "presets": {"esd": "toy"}}, fid_features=SPACE
    )
    assert {p.name for p in paths.values()} == {
        "report.json",
        "report.md",
        "report.csv",
        "rows.csv",
        "ua_vs_retain.png",
    }
    doc = json.loads(paths["json"].read_text())
    assert len(doc["rows"]) == 7 and [t["method"] for t in doc["table"]] == ["esd", "uce", "styleonly"]
    assert doc["model"] == "toy" and doc["presets"] == {"esd": "toy"}
    assert doc["table"][2]["object_UA"] is None and doc["rows"][6]["UA"] == 50.0
    md = paths["md"].read_text()
    assert md.count("| esd |") == 4  # summary row + three per-target rows
    assert "| styleonly | 50.00 | 60.00 | 70.00 | - | - | - |" in md and "**model**: toy" in md
    table = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in table] == ["esd", "uce", "styleonly"] and table[2]["object_UA"] == ""
    per_target = list(csv.DictReader(paths["rows_csv"].open()))
    assert len(per_target) == 7 and per_target[6]["preset"] == "toy"
    with Image.open(paths["plot"]) as image:
        assert image.size[0] > 500
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_empty_and_bad_input(tmp_path):
    paths = report.write_report(tmp_path, [], fid_features=SPACE)
    assert json.loads(paths["json"].read_text())["table"] == []
    with pytest.raises(ValueError, match="reserved"):
        report.write_report(tmp_path, _rows(), {"rows": 1}, fid_features=SPACE)
    with pytest.raises(ValueError, match="kind 'concept'; accepted: style, object"):
        report.markdown_table([{**_rows()[0], "kind": "concept"}], fid_features=SPACE)
    with pytest.raises(ValueError, match="field 'UA' is 'high'"):
        report.markdown_targets([{**_rows()[0], "UA": "high"}], fid_features=SPACE)
    with pytest.raises(ValueError, match="non-empty name"):
        report.markdown_targets(_rows(), fid_features="")


@pytest.mark.parametrize("space", [SPACE, "inception-v3-fid:pt_inception-2015-12-05.pth"])
def test_every_format_names_the_fid_feature_space(tmp_path, space):
    column = f"FID[{space}]"
    assert report.fid_column(space) == column
    paths = report.write_report(tmp_path, _rows(), {"model": "toy"}, fid_features=space, plot=False)
    doc = json.loads(paths["json"].read_text())
    assert doc["fid_features"] == space
    for entries in (doc["table"], doc["rows"]):
        assert all(column in e and "FID" not in e for e in entries)
    assert doc["table"][0][column] == 60.0 and doc["rows"][6][column] is None
    for name in ("csv", "rows_csv"):
        header = next(csv.reader(paths[name].open()))
        assert column in header and "FID" not in header, header
        assert header.index(column) == header.index("time_s") - 1  # in the FID's place
    md = paths["md"].read_text()
    headers = [line for line in md.splitlines() if line.startswith("| Method |")]
    assert len(headers) == 2 and all(f"| {column} |" in h for h in headers), headers
    assert "| FID |" not in md
    for text in (
        report.markdown_table(_rows(), fid_features=space),
        report.markdown_targets(_rows(), fid_features=space),
    ):
        assert f"| {column} |" in text.splitlines()[0]


def test_rows_from_another_feature_space_are_refused(tmp_path):
    rows = _rows()
    rows[1]["fid_features"] = "inception-v3-fid:other.pth"
    with pytest.raises(ValueError, match="row 1 .* feature space 'inception-v3-fid:other.pth'"):
        report.write_report(tmp_path, rows, fid_features=SPACE)
    with pytest.raises(ValueError, match="metadata names FID features"):
        report.write_report(tmp_path, _rows(), {"fid_features": "x"}, fid_features=SPACE)
    rows[1]["fid_features"] = SPACE  # the same space is fine, and rows without the field are accepted
    assert report.write_report(tmp_path, rows, fid_features=SPACE, plot=False)


def _row(method, target, kind, ua, fid=50.0, time_s=10.0):
    s = metrics.UnlearningScores(target, kind, ua, 0.9, 0.8, 49 if kind == "style" else 19, 20)
    return report.target_row(method, s, fid, metrics.Efficiency(time_s, 2.0, None))


def test_rows_and_aggregation():
    rows = [
        _row("esd", "Monet", "style", 1.0),
        _row("esd", "Winter", "style", 0.5, fid=70.0),
        _row("esd", "Cats", "object", 0.2, time_s=30.0),
        _row("uce", "Monet", "style", 0.9, fid=None),
    ]
    assert rows[0]["UA"] == 100.0 and rows[0]["kind"] == "style" and rows[0]["storage_gb"] is None
    table = report.aggregate(rows)
    assert [t["method"] for t in table] == ["esd", "uce"]
    esd, uce = table
    assert esd["style_UA"] == pytest.approx(75.0) and esd["object_UA"] == pytest.approx(20.0)
    assert esd["FID"] == pytest.approx(170 / 3) and esd["time_s"] == pytest.approx(50 / 3)
    assert (esd["n_style"], esd["n_object"]) == (2, 1)
    assert uce["object_UA"] is None and uce["FID"] is None and uce["storage_gb"] is None
    assert set(esd) == set(report.TABLE_KEYS)
    with pytest.raises(ValueError, match="kind 'concept'"):
        report.aggregate([{**rows[0], "kind": "concept"}])
    with pytest.raises(ValueError, match=r"lacks \['FID'\]"):
        report.aggregate([{k: v for k, v in rows[0].items() if k != "FID"}])
