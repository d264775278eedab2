import csv
import json

import numpy as np
import pytest
from PIL import Image

from canvas import metrics, report

SPACE = "toy-style-features"
TUNING_LABEL = "tuning — not a result"


def _rows():
    """Held-out rows of three methods (esd and uce: two styles and an object, with different values per target),
    plus one tuning row of esd far from its held-out figures."""
    rows = []
    for method, shift in (("esd", 0.0), ("uce", 10.0)):
        for n, (target, kind) in enumerate((("Van_Gogh", "style"), ("Monet", "style"), ("Cats", "object"))):
            rows.append(
                {"method": method, "target": target, "kind": kind, "split": "held-out", "UA": 90.0 - shift - 4 * n,
                 "IRA": 80.0 + shift / 2 + n, "CRA": 70.0 + shift, "FID": 60.0 + n, "time_s": 123.4,
                 "memory_gb": 17.8, "storage_gb": 0.0001}
            )  # fmt: skip
    rows.append(
        {"method": "styleonly", "target": "Monet", "kind": "style", "split": "held-out", "UA": np.float32(50.0),
         "IRA": 60.0, "CRA": 70.0, "FID": None, "time_s": 5.0, "memory_gb": None, "storage_gb": 0.0, "preset": "toy"}
    )  # fmt: skip
    rows.append(
        {"method": "esd", "target": "Pop_Art", "kind": "style", "split": "tuning", "UA": 0.0, "IRA": 1.0, "CRA": 2.0,
         "FID": 999.0, "time_s": 1.0, "memory_gb": 1.0, "storage_gb": 1.0}
    )  # fmt: skip
    return rows


def _expected(rows, method, split, kind, key):
    """mean, min and population std of one table cell, computed with numpy from the rows."""
    values = np.array([r[key] for r in rows if (r["method"], r["split"], r["kind"]) == (method, split, kind)], float)
    return values.mean(), values.min(), values.std(ddof=0)


def _cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


def test_markdown_table_held_out_then_tuning_with_min_and_spread():
    rows = _rows()
    text = report.markdown_table(rows, fid_features=SPACE)
    held, tuning = text.split("Tuning targets (tuning — not a result):")
    lines = [line for line in held.splitlines() if line.startswith("|")]
    assert lines[0].startswith(
        "| Method | Targets | Style UA | Style IRA | Style CRA | Object UA | Object IRA | Object CRA | Styles | "
        "Objects | FID[toy-style-features] |"
    )
    assert lines[0].endswith("| Time (s) | Memory (GB) | Storage (GB) |")
    body = lines[2:]
    assert [_cells(line)[0] for line in body] == ["esd", "uce", "styleonly"]
    assert all(_cells(line)[1] == "held-out" for line in body)
    mean, low, std = _expected(rows, "esd", "held-out", "style", "UA")  # the tuning row (UA 0) stays out
    assert _cells(body[0])[2] == f"{mean:.2f} ± {std:.2f}, min {low:.2f}" == "88.00 ± 2.00, min 86.00"
    assert _cells(body[2]) == ["styleonly", "held-out", "50.00 ± 0.00, min 50.00", "60.00 ± 0.00, min 60.00",
                               "70.00 ± 0.00, min 70.00", "-", "-", "-", "1", "0", "-", "5.0", "-", "0.00"]  # fmt: skip
    esd = _cells(body[0])
    assert esd[8:11] == ["2", "1", f"{np.mean([60.0, 61.0, 62.0]):.2f}"] and esd[11:] == ["123", "17.80", "0.0001"]
    tuning_lines = [line for line in tuning.splitlines() if line.startswith("|")]
    assert len(tuning_lines) == 3 and _cells(tuning_lines[2])[:3] == ["esd", TUNING_LABEL, "0.00 ± 0.00, min 0.00"]
    assert _cells(tuning_lines[2])[10] == "999.00"  # the tuning target's FID is in its own table only


def test_markdown_table_without_tuning_rows_has_no_tuning_table():
    text = report.markdown_table([r for r in _rows() if r["split"] == "held-out"], fid_features=SPACE)
    assert "Held-out targets:" in text and "Tuning" not in text and "tuning" not in text
    only_tuning = report.markdown_table([r for r in _rows() if r["split"] == "tuning"], fid_features=SPACE)
    assert only_tuning.startswith("Held-out targets:\n\nnone") and TUNING_LABEL in only_tuning


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
    assert len(doc["rows"]) == 8 and [(t["method"], t["split"]) for t in doc["table"]] == [
        ("esd", "held-out"), ("uce", "held-out"), ("styleonly", "held-out"), ("esd", "tuning")
    ]  # fmt: skip
    assert doc["model"] == "toy" and doc["presets"] == {"esd": "toy"}
    assert "population standard deviation" in doc["spread"]
    assert doc["table"][2]["object_UA"] is None and doc["table"][2]["object_UA_min"] is None
    assert doc["rows"][6]["UA"] == 50.0 and doc["rows"][7]["split"] == "tuning"
    for entry in doc["table"]:
        for kind in ("style", "object"):
            if entry[f"n_{kind}"]:
                mean, low, std = _expected(_rows(), entry["method"], entry["split"], kind, "IRA")
                got = (entry[f"{kind}_IRA"], entry[f"{kind}_IRA_min"], entry[f"{kind}_IRA_std"])
                assert got == pytest.approx((mean, low, std))
    md = paths["md"].read_text()
    assert md.count("| esd |") == 6  # two summary rows (held-out, tuning) + four per-target rows
    assert "| esd | Pop_Art | style | tuning — not a result |" in md and "**model**: toy" in md
    assert "population standard deviation" in md
    table = list(csv.DictReader(paths["csv"].open()))
    assert [(r["method"], r["split"]) for r in table][-1] == ("esd", "tuning") and table[2]["object_UA"] == ""
    assert list(table[0]) == [report.fid_column(SPACE) if k == "FID" else k for k in report.TABLE_KEYS]
    per_target = list(csv.DictReader(paths["rows_csv"].open()))
    assert len(per_target) == 8 and per_target[6]["preset"] == "toy"
    assert [r["split"] for r in per_target] == ["held-out"] * 7 + ["tuning"]
    assert list(per_target[0])[:4] == ["method", "target", "kind", "split"]
    with Image.open(paths["plot"]) as image:
        assert image.size[0] > 500
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_empty_and_bad_input(tmp_path):
    paths = report.write_report(tmp_path, [], fid_features=SPACE)
    assert json.loads(paths["json"].read_text())["table"] == []
    with pytest.raises(ValueError, match="reserved"):
        report.write_report(tmp_path, _rows(), {"rows": 1}, fid_features=SPACE)
    with pytest.raises(ValueError, match="reserved"):
        report.write_report(tmp_path, _rows(), {"spread": "range"}, fid_features=SPACE)
    with pytest.raises(ValueError, match="split 'train'; accepted: tuning, held-out"):
        report.aggregate([{**_rows()[0], "split": "train"}])
    with pytest.raises(ValueError, match=r"lacks \['split'\]"):
        report.aggregate([{k: v for k, v in _rows()[0].items() if k != "split"}])
    with pytest.raises(ValueError, match="kind 'concept'; accepted: style, object"):
        report.markdown_table([{**_rows()[0], "kind": "concept"}], fid_features=SPACE)
    with pytest.raises(ValueError, match="field 'UA' is 'high'"):
        report.markdown_targets([{**_rows()[0], "UA": "high"}], fid_features=SPACE)
    with pytest.raises(ValueError, match="non-empty name"):
        report.markdown_targets(_rows(), fid_features="")


@pytest.mark.parametrize("space", [SPACE, "inception-tf2015", "inception-torchvision"])
def test_every_format_names_the_fid_feature_space(tmp_path, space):
    column = f"FID[{space}]"
    assert report.fid_column(space) == column
    paths = report.write_report(tmp_path, _rows(), {"model": "toy"}, fid_features=space, plot=False)
    doc = json.loads(paths["json"].read_text())
    assert doc["fid_features"] == space
    for entries in (doc["table"], doc["rows"]):
        assert all(column in e and "FID" not in e for e in entries)
    assert doc["table"][0][column] == 61.0 and doc["rows"][6][column] is None
    for name in ("csv", "rows_csv"):
        header = next(csv.reader(paths[name].open()))
        assert column in header and "FID" not in header, header
        assert header.index(column) == header.index("time_s") - 1  # in the FID's place
    md = paths["md"].read_text()
    headers = [line for line in md.splitlines() if line.startswith("| Method |")]
    assert len(headers) == 3 and all(f"| {column} |" in h for h in headers), headers  # held-out, tuning, rows
    assert "| FID |" not in md
    for text in (
        report.markdown_table(_rows(), fid_features=space),
        report.markdown_targets(_rows(), fid_features=space),
    ):
        assert f"| {column} |" in next(line for line in text.splitlines() if line.startswith("|"))


def test_rows_from_another_feature_space_are_refused(tmp_path):
    rows = _rows()
    rows[1]["fid_features"] = "inception-torchvision"
    with pytest.raises(ValueError, match="row 1 .* feature space 'inception-torchvision'"):
        report.write_report(tmp_path, rows, fid_features=SPACE)
    with pytest.raises(ValueError, match="metadata names FID features"):
        report.write_report(tmp_path, _rows(), {"fid_features": "x"}, fid_features=SPACE)
    rows[1]["fid_features"] = SPACE  # the same space is fine, and rows without the field are accepted
    assert report.write_report(tmp_path, rows, fid_features=SPACE, plot=False)


def _row(method, target, kind, ua, fid=50.0, time_s=10.0, split="held-out"):
    s = metrics.UnlearningScores(target, kind, ua, 0.9, 0.8, 49 if kind == "style" else 19, 20)
    return report.target_row(method, s, fid, metrics.Efficiency(time_s, 2.0, None), split=split)


def test_rows_and_aggregation():
    rows = [
        _row("esd", "Monet", "style", 1.0),
        _row("esd", "Winter", "style", 0.5, fid=70.0),
        _row("esd", "Cats", "object", 0.2, time_s=30.0),
        _row("uce", "Monet", "style", 0.9, fid=None),
        _row("esd", "Pop_Art", "style", 0.0, fid=500.0, time_s=1000.0, split="tuning"),
    ]
    assert rows[0]["UA"] == 100.0 and rows[0]["kind"] == "style" and rows[0]["storage_gb"] is None
    assert rows[0]["split"] == "held-out" and list(rows[0])[:4] == ["method", "target", "kind", "UA"]
    table = report.aggregate(rows)
    assert [(t["method"], t["split"]) for t in table] == [("esd", "held-out"), ("uce", "held-out"), ("esd", "tuning")]
    esd, uce, esd_tuning = table
    assert esd["style_UA"] == pytest.approx(75.0) and esd["object_UA"] == pytest.approx(20.0)
    # population std of (100, 50) is 25 (the sample std would be 35.4); the tuning target's UA 0 is not in the min
    assert esd["style_UA_min"] == pytest.approx(50.0) and esd["style_UA_std"] == pytest.approx(25.0)
    assert esd["object_UA_std"] == 0.0 and esd["style_IRA_std"] == pytest.approx(0.0)
    assert esd["FID"] == pytest.approx(170 / 3) and esd["time_s"] == pytest.approx(50 / 3)
    assert esd_tuning["style_UA"] == 0.0 and esd_tuning["FID"] == 500.0 and esd_tuning["n_style"] == 1
    assert esd_tuning["object_UA"] is None and esd_tuning["object_UA_min"] is None
    assert (esd["n_style"], esd["n_object"]) == (2, 1)
    assert uce["object_UA"] is None and uce["FID"] is None and uce["storage_gb"] is None
    assert set(esd) == set(report.TABLE_KEYS)
    with pytest.raises(ValueError, match="kind 'concept'"):
        report.aggregate([{**rows[0], "kind": "concept"}])
    with pytest.raises(ValueError, match=r"lacks \['FID'\]"):
        report.aggregate([{k: v for k, v in rows[0].items() if k != "FID"}])
