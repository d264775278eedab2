"""Finer-scale targets: one style-object combination (`Pop_Art:Cats`, Cats in Pop Art), its cells, and FU / FR.

UnlearnCanvas (paper v4, "finer-scale unlearning") erases one combination while the style must stay on the other
objects and the object in the other styles, and reports FU / FR; it publishes no formula or script for them, so
`finer_scores` writes down what is computed here. These scores stand beside the 7 benchmark metrics
(canvas.metrics), never inside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from canvas.metrics import as_labels
from erase.catalog import Catalog, style_words

SEPARATOR = ":"  # `<Style>:<Object>`
OTHER_CELLS = 4  # unrelated theme x object cells in a reduced answer set, for general retain


@dataclass(frozen=True)
class Combination:
    """One style-object combination of a catalog; `name` is its target name `<Style>:<Object>`."""

    style: str
    object: str

    @property
    def name(self) -> str:
        return f"{self.style}{SEPARATOR}{self.object}"


def is_combination(target: str) -> bool:
    """Whether a target name names a combination (it holds the separator), malformed or not."""
    return SEPARATOR in target


def parse_combination(catalog: Catalog, target: str) -> Combination:
    """`Pop_Art:Cats` -> Combination; a one-line ValueError for a malformed name, an unknown style or object, the
    photo class (it is no benchmark style) or the halves swapped."""
    parts = target.split(SEPARATOR)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"malformed combination target {target!r}; accepted: <Style>{SEPARATOR}<Object>, "
                         f"e.g. {catalog.styles[0]}{SEPARATOR}{catalog.objects[0]}")  # fmt: skip
    style, obj = (p.strip() for p in parts)
    if catalog.is_object(style) and catalog.is_style(obj):
        raise ValueError(f"combination target {target!r} names the object first; accepted: {obj}{SEPARATOR}{style}")
    if style == catalog.photo:
        raise ValueError(f"combination target {target!r}: {style!r} is the photo class, not a benchmark style; "
                         f"accepted styles of catalog {catalog.name!r}: {', '.join(catalog.styles)}")  # fmt: skip
    if not catalog.is_style(style):
        raise ValueError(f"combination target {target!r}: unknown style {style!r}; accepted styles of catalog "
                         f"{catalog.name!r}: {', '.join(catalog.styles)}")  # fmt: skip
    if not catalog.is_object(obj):
        raise ValueError(f"combination target {target!r}: unknown object {obj!r}; accepted objects of catalog "
                         f"{catalog.name!r}: {', '.join(catalog.objects)}")  # fmt: skip
    return Combination(style, obj)


def combination_text(catalog: Catalog, combo: Combination) -> str:
    """The combination as the benchmark prompt names it: the prompt itself (`A Cats image in Pop Art style.`). The
    template puts the object first and the style last, and no shorter phrase of the toy's training captions holds
    both (its style-only and object-only forms name one each), so the whole prompt is the combination's text."""
    return catalog.prompt(combo.style, combo.object)


def anchor_text(catalog: Catalog, combo: Combination) -> str:
    """What the combination is mapped to where a method maps its target onto something: the object in the photo
    class (`A Cats image in Photo style.`), as style targets map to the photo class; the object is kept, so only
    this cell loses its style."""
    return catalog.template.format(object=combo.object, style=style_words(catalog.photo, catalog.photo))


def style_row(catalog: Catalog, combo: Combination) -> list[tuple[str, str]]:
    """(theme, object) cells that share only the style: the style on every other object."""
    return [(combo.style, o) for o in catalog.objects if o != combo.object]


def object_column(catalog: Catalog, combo: Combination) -> list[tuple[str, str]]:
    """Cells that share only the object: the object in every other theme, the photo class included (object accuracy
    counts every theme's images, as the benchmark's Acc_O does)."""
    return [(t, combo.object) for t in catalog.themes if t != combo.style]


def kept_cells(catalog: Catalog, combo: Combination) -> list[tuple[str, str]]:
    """What must be kept: the style row, then the object column (the combination itself left out)."""
    return [*style_row(catalog, combo), *object_column(catalog, combo)]


def other_cells(catalog: Catalog, combo: Combination, count: int = OTHER_CELLS) -> list[tuple[str, str]]:
    """`count` cells sharing neither the style nor the object, spread evenly over the other benchmark styles and
    objects (deterministic: no draw), for the general retain figure."""
    styles = [s for s in catalog.styles if s != combo.style]
    objects = [o for o in catalog.objects if o != combo.object]
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= min(len(styles), len(objects)):
        raise ValueError(f"other cells must be an integer in 0..{min(len(styles), len(objects))}, got {count!r}")
    return [(styles[i * len(styles) // count], objects[i * len(objects) // count]) for i in range(count)]


def reduced_cells(catalog: Catalog, combo: Combination, count: int = OTHER_CELLS) -> list[tuple[str, str]]:
    """Every cell a finer-scale answer set holds: the style's whole row (the combination included), the object's
    column in the other themes, and `count` unrelated cells, in the catalog's (theme, object) order."""
    cells = {(combo.style, combo.object), *kept_cells(catalog, combo), *other_cells(catalog, combo, count)}
    return sorted(cells, key=lambda c: (catalog.style_label(c[0]), catalog.object_label(c[1])))


# ---------------------------------------------------------------------------------------------------- FU / FR


@dataclass(frozen=True)
class FinerScores:
    """FU, FR_style, FR_object, FR and the unrelated cells' retain (FR_other) as fractions; `percent()` in %."""

    target: str
    fu: float
    fr_style: float
    fr_object: float
    fr_other: float | None  # None when the answer set holds no unrelated cell
    counts: dict[str, int]  # images behind each figure

    @property
    def fr(self) -> float:
        return (self.fr_style + self.fr_object) / 2

    def percent(self) -> dict[str, float | None]:
        other = None if self.fr_other is None else 100.0 * self.fr_other
        return {"FU": 100.0 * self.fu, "FR_style": 100.0 * self.fr_style, "FR_object": 100.0 * self.fr_object,
                "FR": 100.0 * self.fr, "FR_other": other}  # fmt: skip


def finer_scores(
    catalog: Catalog,
    combo: Combination,
    themes: Sequence[str],
    objects: Sequence[str],
    style_preds: Tensor,
    object_preds: Tensor,
) -> FinerScores:
    """FU / FR of one combination from the judge's predictions on an answer set (image k: true `themes[k]`,
    `objects[k]`; predictions as labels (N,) or scores (N, C)). Over every image of every seed:

    - FU = share of the combination's images (its style x its object) on which the judge does NOT see the
      combination: the style classifier says another theme OR the object classifier another object. Either half
      gone means the combination is gone, the dual of "both recognised".
    - FR_style = style accuracy on the style's images of the other objects (the style must stay there).
    - FR_object = object accuracy on the object's images in the other themes, photo class included.
    - FR = (FR_style + FR_object) / 2: each side weighs the same whatever its cell count (7 vs 10 on the toy).
    - FR_other = the mean of style and object accuracy on cells sharing neither (general retain; None if absent).
    """
    styles, objs = as_labels(style_preds), as_labels(object_preds)
    if not (len(themes) == len(objects) == styles.shape[0] == objs.shape[0]):
        raise ValueError(f"{len(themes)} themes, {len(objects)} objects, {styles.shape[0]} style and "
                         f"{objs.shape[0]} object predictions: one of each per image")  # fmt: skip
    true_s = torch.tensor([catalog.style_label(t) for t in themes], dtype=torch.long)
    true_o = torch.tensor([catalog.object_label(o) for o in objects], dtype=torch.long)
    style_ok, object_ok = styles == true_s, objs == true_o
    is_style = torch.tensor([t == combo.style for t in themes], dtype=torch.bool)
    is_object = torch.tensor([o == combo.object for o in objects], dtype=torch.bool)
    own, row, column = is_style & is_object, is_style & ~is_object, ~is_style & is_object
    other = ~is_style & ~is_object
    for name, mask in (("combination", own), ("style row", row), ("object column", column)):
        if not bool(mask.any()):
            raise ValueError(f"the answer set holds no image of {combo.name}'s {name}; is it the finer answer set?")
    fu = _mean(~(style_ok & object_ok), own)
    fr_other = (_mean(style_ok, other) + _mean(object_ok, other)) / 2 if bool(other.any()) else None
    counts = {"combination": int(own.sum()), "style_row": int(row.sum()), "object_column": int(column.sum()),
              "other": int(other.sum())}  # fmt: skip
    return FinerScores(combo.name, fu, _mean(style_ok, row), _mean(object_ok, column), fr_other, counts)


def _mean(hits: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float(hits[mask].sum()) / n if n else math.nan
