"""Style/object catalogs: theme and object names in classifier label order, and the benchmark prompt.

Pure data shared by both layers: methods' presets spell the benchmark's prompts from it, and `canvas` (which
re-exports it as `canvas.catalog`) scores against its label orders.

UnlearnCanvas label orders are alphabetical, which puts the photo class (`Seed_Images`) at style label 38 in the
50-style benchmark. The toy catalog follows the same conventions so every consumer treats both the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PHOTO_THEME = "Seed_Images"
PROMPT_TEMPLATE = "A {object} image in {style} style."

UNLEARNCANVAS_OBJECTS = (
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
    "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
)  # fmt: skip

UNLEARNCANVAS_50_STYLES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust", "Sketch",
    "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh", "Vibrant_Flow",
    "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
)  # fmt: skip

UNLEARNCANVAS_EXTRA_10_STYLES = (
    "Blue_Blooming", "Crypto_Punks", "Dreamweave", "Foliage_Patchwork", "Impasto", "Palette_Knife",
    "Pointillism", "Rainwash", "Realistic_Watercolor", "Techno",
)  # fmt: skip

TOY_STYLES = (
    "Bricks", "Crayon", "Mosaic", "Neon_Lines", "On_Fire", "Pastel", "Pop_Art", "Sketch", "Watercolor", "Winter",
)  # fmt: skip
TOY_OBJECTS = ("Architectures", "Birds", "Butterfly", "Cats", "Fishes", "Flowers", "Towers", "Trees")


@dataclass(frozen=True)
class Catalog:
    """Themes (benchmark styles plus the photo class) and objects, each in its classifier's label order."""

    name: str
    styles: tuple[str, ...]
    objects: tuple[str, ...]
    photo: str | None = PHOTO_THEME
    template: str = PROMPT_TEMPLATE
    themes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        themes = tuple(sorted(self.styles + ((self.photo,) if self.photo else ())))
        object.__setattr__(self, "themes", themes)

    def style_label(self, theme: str) -> int:
        """Index of `theme` in the style classifier's output."""
        return _index(self.themes, theme, f"theme of catalog {self.name!r}")

    def object_label(self, obj: str) -> int:
        """Index of `obj` in the object classifier's output."""
        return _index(self.objects, obj, f"object of catalog {self.name!r}")

    def prompt(self, theme: str, obj: str) -> str:
        """The benchmark prompt, e.g. `A Cats image in Van Gogh style.`; the photo class reads `Photo style`."""
        self.style_label(theme)
        self.object_label(obj)
        return self.template.format(object=obj, style=style_words(theme, self.photo))

    def prompts(self, exclude: tuple[str, ...] = ()) -> list[str]:
        """Every theme x object prompt, themes in the alphabetical order of their prompt words (so `Photo` sits
        where its word sorts), objects in label order; themes in `exclude` (names or prompt words) left out."""
        themes = sorted(self.themes, key=lambda theme: style_words(theme, self.photo))
        return [
            self.prompt(theme, obj)
            for theme in themes
            if theme not in exclude and style_words(theme, self.photo) not in exclude
            for obj in self.objects
        ]

    def layout_prompt(self, path: str | os.PathLike) -> str:
        """The prompt of an image at `<Theme>/<Object>/<idx>.jpg` (the UnlearnCanvas layout), whatever its names."""
        path = Path(path)
        theme, obj = path.parent.parent.name, path.parent.name
        return self.template.format(object=obj, style=style_words(theme, self.photo))

    def is_style(self, name: str) -> bool:
        return name in self.styles

    def is_object(self, name: str) -> bool:
        return name in self.objects


def style_words(theme: str, photo: str | None = PHOTO_THEME) -> str:
    """How a theme is spelled inside a prompt: underscores become spaces, the photo class is `Photo`."""
    return "Photo" if theme == photo else theme.replace("_", " ")


def _index(names: tuple[str, ...], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ValueError(f"{name!r} is not a {what}; accepted: {', '.join(names)}") from None


_CATALOGS = {
    "unlearncanvas-50": Catalog("unlearncanvas-50", UNLEARNCANVAS_50_STYLES, UNLEARNCANVAS_OBJECTS),
    "unlearncanvas-60": Catalog(
        "unlearncanvas-60", UNLEARNCANVAS_50_STYLES + UNLEARNCANVAS_EXTRA_10_STYLES, UNLEARNCANVAS_OBJECTS
    ),
    "toy": Catalog("toy", TOY_STYLES, TOY_OBJECTS),
}


def get(name: str) -> Catalog:
    """A catalog by name: `unlearncanvas-50`, `unlearncanvas-60` or `toy`."""
    try:
        return _CATALOGS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown catalog {name!r}; accepted: {', '.join(_CATALOGS)}") from None


def names() -> list[str]:
    return list(_CATALOGS)
