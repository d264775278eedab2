"""Image grids: labelled rows, the backdoor sheet, plain tiles."""

import numpy as np
import torch
from PIL import Image

from canvas import grids


def _images(n: int, size: int = 4) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), i / max(n - 1, 1)) for i in range(n)])


def test_labelled_grid_layout():
    rows = [[Image.new("RGB", (8, 8), (255, 0, 0))] * 3, [Image.new("RGB", (8, 8), (0, 0, 255))] * 3]
    sheet = grids.image_grid(rows, ["before", "after"], ["a", "b", "c"], "title", cell=20, left=30)
    assert sheet.size == (30 + 3 * 20, grids.TITLE_HEIGHT + 2 * 20)
    assert sheet.getpixel((30 + 45, grids.TITLE_HEIGHT + 5)) == (255, 0, 0)
    assert sheet.getpixel((30 + 45, grids.TITLE_HEIGHT + 25)) == (0, 0, 255)


def test_backdoor_sheet_rows(tmp_path):
    before = {"clean": _images(3), "triggered": _images(3)}
    path = grids.backdoor_grid(before, None, tmp_path / "one.png", columns=2)
    with Image.open(path) as sheet:
        assert sheet.size == (110 + 2 * 96, grids.TITLE_HEIGHT + 2 * 96)
    path = grids.backdoor_grid(before, dict(before), tmp_path / "two.png")
    with Image.open(path) as sheet:
        assert sheet.size == (110 + 3 * 96, grids.TITLE_HEIGHT + 4 * 96)


def test_tile_places_images_row_major():
    images = _images(6, size=2)
    picture = grids.tile(images, rows=2, cols=3, scale=2)
    assert picture.size == (3 * 2 * 2, 2 * 2 * 2)
    pixels = np.asarray(picture)
    for i in range(6):
        r, c = divmod(i, 3)
        assert pixels[r * 4, c * 4, 0] == int(images[i, 0, 0, 0] * 255 + 0.5)
    assert grids.to_pil(images[5]).getpixel((0, 0)) == (255, 255, 255)
