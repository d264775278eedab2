"""The benchmark's catalogs: re-exported from `erase.catalog`, where the data both layers need lives."""

from erase.catalog import (
    PHOTO_THEME,
    PROMPT_TEMPLATE,
    TOY_OBJECTS,
    TOY_STYLES,
    UNLEARNCANVAS_50_STYLES,
    UNLEARNCANVAS_EXTRA_10_STYLES,
    UNLEARNCANVAS_OBJECTS,
    Catalog,
    get,
    names,
    style_words,
)

__all__ = [
    "PHOTO_THEME",
    "PROMPT_TEMPLATE",
    "TOY_OBJECTS",
    "TOY_STYLES",
    "UNLEARNCANVAS_50_STYLES",
    "UNLEARNCANVAS_EXTRA_10_STYLES",
    "UNLEARNCANVAS_OBJECTS",
    "Catalog",
    "get",
    "names",
    "style_words",
]
