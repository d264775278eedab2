"""What each method needs from the benchmark for one target: the concept's words, and for data-driven methods the
dataset images of the split's roles (UnlearnCanvas: forget/retain = indices 1-3, FMN reference = index 1).

Methods know nothing about the benchmark; this table is the one place that maps a target to their inputs. Values
given by the user (bench `overrides`) win over these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from canvas import splits
from canvas.catalog import Catalog, style_words


def concept_text(cat: Catalog, target: str) -> str:
    """How a target is named to a method that erases text: `Pop Art style` for a style, the object for an object."""
    return f"{style_words(target, cat.photo)} style" if cat.is_style(target) else target


def target_words(cat: Catalog, target: str) -> str:
    """The target's own words inside the benchmark prompt: `Pop Art` for a style, the object for an object."""
    return style_words(target, cat.photo) if cat.is_style(target) else target


def _items(cat: Catalog, target: str, indices, forget: bool) -> list[tuple[str, str, int]]:
    """(theme, object, index) of the target's images (forget) or of everything else (retain)."""
    style = cat.is_style(target)
    return [
        (t, o, i)
        for t in cat.themes
        for o in cat.objects
        for i in indices
        if ((t == target) if style else (o == target)) == forget
    ]


def _files(root: Path, items) -> list[str]:
    return [str(root / t / o / f"{i}.jpg") for t, o, i in items]


def _other_object(cat: Catalog, obj: str) -> str:
    return cat.objects[(cat.objects.index(obj) + 1) % len(cat.objects)]


def method_inputs(method: str, cat: Catalog, target: str, data_root: Path | None) -> dict[str, Any]:
    """Config values for `method` erasing `target`."""
    roles = splits.load()
    style = cat.is_style(target)
    words = target_words(cat, target)
    if method in ("esd", "uce"):
        return {"concepts": [concept_text(cat, target)]}
    if method == "fmn":
        prompts = (
            [cat.template.format(object=o, style="{concept}") for o in cat.objects]
            if style
            else [cat.template.format(object="{concept}", style=style_words(t, cat.photo)) for t in cat.themes]
        )
        images = _files(data_root, _items(cat, target, roles.fmn_reference, forget=True))
        return {"concepts": [words], "images": images, "prompts": prompts}
    if method == "ca":
        # Styles map to the photo class (the benchmark prompt with "Photo" replaced); objects to another object.
        if style:
            return {"concepts": [words], "anchors": ["Photo"],
                    "anchor_prompts": [cat.prompt(cat.photo, o) for o in cat.objects]}  # fmt: skip
        anchor = _other_object(cat, target)
        return {
            "concepts": [target],
            "anchors": [anchor],
            "anchor_prompts": [cat.prompt(t, anchor) for t in cat.themes],
        }
    if method == "salun":
        forget = _items(cat, target, roles.forget_retain, forget=True)
        retain = _items(cat, target, roles.forget_retain, forget=False)
        pseudo = [cat.prompt(cat.photo, o) if style else cat.prompt(t, _other_object(cat, o)) for t, o, _ in forget]
        return {
            "forget_images": _files(data_root, forget), "forget_prompts": [cat.prompt(t, o) for t, o, _ in forget],
            "pseudo_prompts": pseudo, "retain_images": _files(data_root, retain),
            "retain_prompts": [cat.prompt(t, o) for t, o, _ in retain],
        }  # fmt: skip
    return {"concepts": [concept_text(cat, target)]}
