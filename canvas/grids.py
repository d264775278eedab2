"""Image grids for people to look at: labelled rows (the bench's before/after sheets, the backdoor judge's
clean/triggered sheets) and plain tiles (the toy build's theme x object sheets).

Nearest-neighbour upscaling everywhere, so 32 px toy images stay crisp instead of blurring into each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from erase.atomic import save_image

TITLE_HEIGHT = 34  # title line, then the column labels


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (3, H, W) image in [0, 1] as an RGB picture, rounded to the nearest 8-bit level."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    cell: int = 96,
    left: int = 56,
) -> Image.Image:
    """Images in a labelled grid: a title, a label over each column (15 characters at most), one left of each row."""
    top = TITLE_HEIGHT
    grid = Image.new("RGB", (left + cell * len(column_labels), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill="black")
    for c, label in enumerate(column_labels):
        draw.text((left + c * cell + 2, 18), label[:15], fill="black")
    for r, (label, row) in enumerate(zip(row_labels, rows)):
        draw.text((4, top + r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    return grid


def backdoor_grid(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor] | None,
    path: str | os.PathLike[str],
    columns: int = 8,
) -> Path:
    """Labelled rows: clean before, clean after, triggered before, triggered after (the after rows only with a
    removal); the first `columns` images of each (N, 3, H, W) set in [0, 1]. Written atomically."""
    named = [
        ("clean before", before["clean"]),
        ("clean after", after["clean"] if after else None),
        ("triggered before", before["triggered"]),
        ("triggered after", after["triggered"] if after else None),
    ]
    named = [(label, images[:columns]) for label, images in named if images is not None]
    sheet = image_grid(
        [[to_pil(im) for im in images] for _, images in named],
        [label for label, _ in named],
        [""] * min(columns, len(named[0][1])),
        "backdoor: clean and triggered prompts",
        left=110,
    )
    return save_image(sheet, path)


def tile(images: torch.Tensor, rows: int, cols: int, scale: int = 3) -> Image.Image:
    """The first rows x cols images (N, 3, H, W) in [0, 1], row-major, as one unlabelled picture upscaled `scale`x.

    Levels are floor(255 x + 0.5), not `to_pil`'s round-half-even: the toy's shipped grid.png and renders.png were
    written this way, and a rebuild should reproduce them exactly."""
    c, h, w = images.shape[1:]
    g = images[: rows * cols].reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    picture = Image.fromarray((g.numpy() * 255 + 0.5).astype(np.uint8))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
