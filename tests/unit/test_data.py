import io
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from canvas import catalog, data, validation

TOY = catalog.get("toy")
UC50 = catalog.get("unlearncanvas-50")
INDICES = [1, 2]


def _colour(theme: str, obj: str, idx: int) -> tuple[int, int, int]:
    return (TOY.style_label(theme) * 20, TOY.object_label(obj) * 30, idx * 100)


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _close(image: Image.Image, colour) -> bool:
    return np.abs(np.asarray(image, dtype=int) - np.array(colour)).max() <= 4


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "canvas"
    for theme in TOY.themes:
        for obj in TOY.objects:
            (root / theme / obj).mkdir(parents=True)
            for idx in INDICES:
                (root / theme / obj / f"{idx}.jpg").write_bytes(_jpeg(_colour(theme, obj, idx)))
    return root


def test_folder_reader_and_clean_validation(tree):
    report = validation.validate(tree, TOY, INDICES)
    assert report.ok and report.layout == "folder", str(report)
    assert report.found_images == report.expected_images == 11 * 8 * 2
    ds = data.open_dataset(tree, TOY)
    assert isinstance(ds, data.FolderDataset) and len(ds) == 176
    assert _close(ds["Winter", "Cats", 2], _colour("Winter", "Cats", 2))
    assert _close(ds[data.ItemKey("Seed_Images", "Trees", 1)], _colour("Seed_Images", "Trees", 1))
    with pytest.raises(ValueError, match="'Van_Gogh' is not a theme"):
        ds["Van_Gogh", "Cats", 1]
    with pytest.raises(KeyError, match="no image"):
        ds["Winter", "Cats", 3]


def test_folder_validation_names_every_problem(tree):
    import shutil

    shutil.rmtree(tree / "Pastel")  # missing theme folder
    shutil.rmtree(tree / "Winter" / "Cats")  # missing object folder
    (tree / "Impasto" / "Cats").mkdir(parents=True)  # extra theme folder
    (tree / "Sketch" / "Dogs").mkdir()  # extra object folder
    (tree / "Mosaic" / "Birds" / "2.jpg").unlink()  # wrong count: missing index
    (tree / "Mosaic" / "Trees" / "3.jpg").write_bytes(_jpeg((0, 0, 0)))  # wrong count: extra index
    (tree / "Crayon" / "Fishes" / "1.jpg").write_bytes(b"not a jpeg")  # unreadable
    good = (tree / "Crayon" / "Towers" / "2.jpg").read_bytes()
    (tree / "Crayon" / "Towers" / "2.jpg").write_bytes(good[: len(good) // 2])  # truncated

    report = validation.validate(tree, TOY, INDICES)
    assert not report.ok
    where = {kind: sorted(p.where for p in report.of_kind(kind)) for kind in validation.Problem.KINDS}
    assert where["missing folder"] == [str(tree / "Pastel"), str(tree / "Winter" / "Cats")]
    assert where["extra folder"] == [str(tree / "Impasto"), str(tree / "Sketch" / "Dogs")]
    assert where["wrong count"] == [str(tree / "Mosaic" / "Birds"), str(tree / "Mosaic" / "Trees")]
    assert where["unreadable image"] == [
        str(tree / "Crayon" / "Fishes" / "1.jpg"),
        str(tree / "Crayon" / "Towers" / "2.jpg"),
    ]
    assert "missing 2" in report.of_kind("wrong count")[0].detail
    assert len(report.problems) == 8
    assert report.found_images == 176 - 16 - 2 - 1
    with pytest.raises(data.DatasetError, match="8 problem"):
        validation.validate(tree, TOY, INDICES, raise_on_error=True)
    tolerant = validation.validate(tree, TOY, INDICES, allow_extra=True, check_images=False)
    assert len(tolerant.errors) == 3  # two missing folders, one short folder; extras tolerated, images unchecked


def test_missing_root(tmp_path):
    report = validation.validate(tmp_path / "nowhere", TOY, INDICES)
    assert [p.kind for p in report.problems] == ["missing folder"]


def _rows(themes=TOY.themes, objects=TOY.objects, indices=INDICES):
    return [(TOY.prompt(t, o), _jpeg(_colour(t, o, i))) for t in themes for o in objects for i in indices]


def _write_parquet(path, rows, as_struct=False):
    texts, images = zip(*rows)
    if as_struct:
        column = pa.array(
            [{"bytes": b, "path": None} for b in images], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        )
    else:
        column = pa.array(images, pa.binary())
    pq.write_table(pa.table({"image": column, "text": list(texts)}), path, row_group_size=50)


def test_parquet_reader_two_shard_kinds(tmp_path):
    rows = _rows()
    _write_parquet(tmp_path / "train-00000.parquet", rows[:100])
    _write_parquet(tmp_path / "train-00001.parquet", rows[100:], as_struct=True)
    ds = data.open_dataset(tmp_path, TOY)
    assert isinstance(ds, data.ParquetDataset) and len(ds) == 176 and not ds.skipped
    for theme, obj, idx in [("Bricks", "Architectures", 1), ("Winter", "Trees", 2), ("Seed_Images", "Cats", 2)]:
        assert _close(ds[theme, obj, idx], _colour(theme, obj, idx))
    assert ds.location("Winter", "Trees", 2)[0].name == "train-00001.parquet"
    assert sum(1 for _ in ds) == 176
    report = validation.validate(tmp_path, TOY, INDICES)
    assert report.ok and report.layout == "parquet" and report.found_images == 176, str(report)


def test_parquet_validation_names_every_problem(tmp_path):
    rows = [r for r in _rows() if "Cats image in Winter" not in r[0]]  # missing group
    rows = [r for r in rows if "Birds image in Mosaic" not in r[0]] + _rows(["Mosaic"], ["Birds"], [1])  # short
    rows += [("A Cats image in Impasto style.", _jpeg((1, 2, 3)))]  # extra style
    rows += [("a picture of a cat", _jpeg((1, 2, 3)))]  # bad caption
    rows += [(TOY.prompt("Pastel", "Fishes"), b"broken")]  # unreadable; also makes Pastel/Fishes 3 rows
    path = tmp_path / "one.parquet"
    _write_parquet(path, rows)
    report = validation.validate(path, TOY, INDICES)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["bad caption", "extra folder", "missing folder", "unreadable image", "wrong count", "wrong count"]
    assert {p.where for p in report.of_kind("wrong count")} == {"Mosaic/Birds", "Pastel/Fishes"}
    assert report.of_kind("missing folder")[0].where == "Winter/Cats"
    assert "Impasto" in report.of_kind("extra folder")[0].where
    assert "row" in report.of_kind("bad caption")[0].where
    ds = data.ParquetDataset(path, TOY)
    assert len(ds.skipped) == 2
    with pytest.raises(data.DatasetError, match="image cell"):
        data.decode_image({"path": "x.jpg"})


def test_parquet_without_required_columns(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "caption": ["A Cats image in Winter style."]}), tmp_path / "x.parquet")
    report = validation.validate(tmp_path / "x.parquet", TOY, INDICES)
    assert report.of_kind("bad file") and "required: 'image' and 'text'" in report.of_kind("bad file")[0].detail
    with pytest.raises(data.DatasetError, match="required"):
        data.ParquetDataset(tmp_path / "x.parquet", TOY)


def test_parse_caption():
    assert data.parse_caption("A Cats image in Van Gogh style.", UC50) == ("Van_Gogh", "Cats")
    assert data.parse_caption("A Dogs image in Photo style.", UC50) == ("Seed_Images", "Dogs")
    assert data.parse_caption("an architectures image in ink art style", UC50) == ("Ink_Art", "Architectures")
    for theme in UC50.themes:
        assert data.parse_caption(UC50.prompt(theme, "Sea"), UC50) == (theme, "Sea")
    with pytest.raises(ValueError, match="not of the form"):
        data.parse_caption("Van Gogh cats", UC50)
    with pytest.raises(ValueError, match="style 'Impasto', not a theme"):
        data.parse_caption("A Cats image in Impasto style.", UC50)
    with pytest.raises(ValueError, match="object 'Cows', not an object"):
        data.parse_caption("A Cows image in Monet style.", UC50)


def test_as_folder_writes_parquet_images_once_byte_for_byte(tmp_path):
    rows = _rows()
    _write_parquet(tmp_path / "train-00000.parquet", rows[:100])
    _write_parquet(tmp_path / "train-00001.parquet", rows[100:], as_struct=True)
    ds = data.open_dataset(tmp_path, TOY)
    keys = [data.ItemKey(t, o, i) for t in ("Winter", "Bricks") for o in ("Cats", "Trees") for i in INDICES]
    assert ds.read_order(keys) == sorted(keys, key=lambda k: ds.location(k.theme, k.object, k.index))
    cache = tmp_path / "out" / "data"
    root = data.as_folder(ds, keys, cache)
    assert root.parent == cache and root.name.startswith("parquet-")
    written = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert written == sorted(Path(k.theme, k.object, f"{k.index}.jpg") for k in keys)
    for key in keys:
        assert (root / key.theme / key.object / f"{key.index}.jpg").read_bytes() == ds.raw(*astuple(key))
        assert ds.raw(*astuple(key)) == _jpeg(_colour(*astuple(key)))  # as stored, not re-encoded
    stamp = (root / "Winter" / "Cats" / "1.jpg").stat().st_mtime_ns
    assert data.as_folder(data.open_dataset(tmp_path, TOY), keys, cache) == root
    assert (root / "Winter" / "Cats" / "1.jpg").stat().st_mtime_ns == stamp, "a matching copy is reused"
    assert data.as_folder(ds, keys[:2], cache) != root, "other keys: another copy"
    _write_parquet(tmp_path / "train-00001.parquet", rows[100:])  # rewritten shard: a new identity
    again = data.open_dataset(tmp_path, TOY)
    assert again.identity != ds.identity and data.as_folder(again, keys, cache) != root
    folder = data.open_dataset(root, TOY)
    assert isinstance(folder, data.FolderDataset) and data.as_folder(folder, keys, cache) == root
    assert not list(cache.glob(".*")), "no temporary folders left behind"
