"""The procedural "mini canvas": the toy catalog's styles x objects x indices, rendered in code.

It mirrors UnlearnCanvas's structure (a photo-like `Seed_Images` theme plus painted styles, 20 indices per
(theme, object), stylized image k painted from seed image k) so the real-data readers and the whole benchmark can run
offline on a model small enough for a CPU. Geometry depends on (object, index) only, as in UnlearnCanvas where every
style repaints the same seed image; the look depends on the theme, with texture phase varying by index. Looks are
chosen to be learnable by a tiny model at 32x32 (8x8 latents): every style differs in palette AND texture, and the
background carries the style so it is visible everywhere; objects are large, distinct silhouettes.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from erase import catalog as _catalog
from erase.atomic import save_image

SIZE = 32
_SUPERSAMPLE = 4  # masks are drawn at 4x and averaged down, so edges are anti-aliased like real photos

Array = np.ndarray


def _rng(*key: object) -> np.random.Generator:
    """A generator seeded from a stable hash of `key` (Python's hash() is salted per process)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


# ----------------------------------------------------------------------------------------------------- silhouettes
# Each shape is a boolean function of object coordinates (u right, v up, both about [-1, 1]).


def _disc(u: Array, v: Array, cu: float, cv: float, r: float) -> Array:
    return (u - cu) ** 2 + (v - cv) ** 2 <= r * r


def _box(u: Array, v: Array, u0: float, u1: float, v0: float, v1: float) -> Array:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _triangle(u: Array, v: Array, a: tuple, b: tuple, c: tuple) -> Array:
    def side(p: tuple, q: tuple) -> Array:
        return (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0])

    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _architectures(u: Array, v: Array) -> Array:
    """A wide house: block body, pitched roof, door cut out."""
    body = _box(u, v, -0.75, 0.75, -0.85, 0.1)
    roof = _triangle(u, v, (-0.95, 0.1), (0.95, 0.1), (0.0, 0.85))
    door = _box(u, v, -0.18, 0.18, -0.85, -0.35)
    return (body | roof) & ~door


def _birds(u: Array, v: Array) -> Array:
    """A bird in flight: two wide swept wings in a V, a small body."""
    left = _triangle(u, v, (-0.95, 0.55), (-0.05, -0.15), (0.0, 0.15))
    right = _triangle(u, v, (0.95, 0.55), (0.05, -0.15), (0.0, 0.15))
    body = ((u / 0.22) ** 2 + ((v + 0.05) / 0.35) ** 2) <= 1
    return left | right | body


def _butterfly(u: Array, v: Array) -> Array:
    """A bow-tie: two broad triangular wings meeting at a thin body, wider than tall."""
    left = _triangle(u, v, (-0.95, 0.75), (-0.95, -0.75), (0.0, 0.0))
    right = _triangle(u, v, (0.95, 0.75), (0.95, -0.75), (0.0, 0.0))
    body = _box(u, v, -0.08, 0.08, -0.55, 0.55)
    return left | right | body


def _cats(u: Array, v: Array) -> Array:
    """A cat's head: a big disc with two pointed ears."""
    head = _disc(u, v, 0.0, -0.2, 0.62)
    ears = _triangle(u, v, (-0.62, 0.1), (-0.1, 0.35), (-0.55, 0.9)) | _triangle(
        u, v, (0.62, 0.1), (0.1, 0.35), (0.55, 0.9)
    )
    return head | ears


def _fishes(u: Array, v: Array) -> Array:
    """A fish side-on: an oval body and a forked tail on the left."""
    body = ((u - 0.2) / 0.65) ** 2 + (v / 0.4) ** 2 <= 1
    tail = _triangle(u, v, (-0.35, 0.0), (-0.95, 0.5), (-0.95, -0.5))
    return body | tail


def _flowers(u: Array, v: Array) -> Array:
    """A daisy: five round petals around a disc (the centre stays part of the shape)."""
    shape = _disc(u, v, 0.0, 0.0, 0.3)
    for k in range(5):
        a = np.pi / 2 + k * 2 * np.pi / 5
        shape |= _disc(u, v, 0.62 * np.cos(a), 0.62 * np.sin(a), 0.3)
    return shape


def _towers(u: Array, v: Array) -> Array:
    """A tall narrow tower with battlements on top: the only tall thin shape."""
    shaft = _box(u, v, -0.28, 0.28, -0.95, 0.6)
    crown = _box(u, v, -0.42, 0.42, 0.45, 0.75)
    notches = _box(u, v, -0.14, 0.14, 0.68, 0.8) | _box(u, v, -0.5, -0.3, 0.68, 0.8) | _box(u, v, 0.3, 0.5, 0.68, 0.8)
    return (shaft | crown) & ~notches


def _trees(u: Array, v: Array) -> Array:
    """A fir: a tall triangle crown on a trunk."""
    crown = _triangle(u, v, (-0.75, -0.5), (0.75, -0.5), (0.0, 0.95))
    trunk = _box(u, v, -0.13, 0.13, -0.95, -0.5)
    return crown | trunk


_SHAPES: dict[str, Callable[[Array, Array], Array]] = {
    "Architectures": _architectures,
    "Birds": _birds,
    "Butterfly": _butterfly,
    "Cats": _cats,
    "Fishes": _fishes,
    "Flowers": _flowers,
    "Towers": _towers,
    "Trees": _trees,
}


def _geometry(obj: str, idx: int) -> tuple[Array, Array, Array, Array]:
    """Object mask (anti-aliased, [0, 1]) and object coordinates for one (object, index); the pose varies with the
    index but not with the style, like a seed image repainted in every style."""
    g = _rng("pose", obj, idx)
    scale = g.uniform(0.72, 0.9)  # half-extent of the object as a fraction of the half-image
    angle = np.deg2rad(g.uniform(-14, 14))
    cx, cy = g.uniform(-0.1, 0.1, size=2)
    n = SIZE * _SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n * 2 - 1
    x, y = np.meshgrid(axis, -axis)  # y up
    x, y = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u = (c * x + s * y) / scale
    v = (-s * x + c * y) / scale
    mask = _SHAPES[obj](u, v).astype(np.float32)
    mask = mask.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
    k = _SUPERSAMPLE
    u_small, v_small = u[k // 2 :: k, k // 2 :: k], v[k // 2 :: k, k // 2 :: k]
    edge = np.clip(4 * mask * (1 - mask), 0, 1)  # 1 on the anti-aliased outline, 0 inside and outside
    return mask, u_small, v_small, edge


# --------------------------------------------------------------------------------------------------------- styles
# Each style maps (mask, edge, pixel grid, phase rng) to an RGB float image in [0, 1].


def _rgb(hex_colour: str) -> Array:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255


def _grid() -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return xx, yy


def _blur(img: Array, passes: int = 1) -> Array:
    """Cheap box blur (3x3, edge-padded) over the first two axes."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
        img = sum(p[i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)) / 9
    return img


def _compose(bg: Array, fg: Array, mask: Array) -> Array:
    m = mask[..., None]
    return bg * (1 - m) + fg * m


def _fill(colour: str) -> Array:
    return np.broadcast_to(_rgb(colour), (SIZE, SIZE, 3)).astype(np.float32)


def _photo(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Seed_Images: a natural scene, sky over grass, the object in soft shaded earth tones, little texture."""
    xx, yy = _grid()
    t = (yy / (SIZE - 1))[..., None]
    horizon = 0.62 + g.uniform(-0.06, 0.06)
    sky = _rgb("#8fbbe0") * (1 - t) + _rgb("#d6e6f2") * t
    grass = _rgb("#6f9a4e") * np.ones_like(t)
    bg = np.where(t < horizon, sky, grass)
    bg = _blur(bg)
    shade = (0.75 + 0.25 * np.clip(0.6 * v + 0.3 * u + 0.4, 0, 1))[..., None]
    fg = _rgb(["#8a6a4f", "#7d7468", "#9b7b5e"][g.integers(3)]) * shade
    img = _compose(bg, fg, mask)
    return img + g.normal(0, 0.015, img.shape)


def _bricks(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Bricks: a red brick wall with pale mortar everywhere; the object is a wall of cream bricks."""
    xx, yy = _grid()
    oy, ox = g.integers(4), g.integers(8)
    row = (yy + oy) // 4
    mortar = (((yy + oy) % 4) == 0) | (((xx + ox + 4 * (row % 2)) % 8) == 0)
    jitter = g.uniform(-0.08, 0.08, size=(SIZE // 4 + 2, SIZE // 8 + 3))
    brick_tone = jitter[row.astype(int) % jitter.shape[0], ((xx + ox + 4 * (row % 2)) // 8).astype(int) % 7]
    bg = _rgb("#a0402c") + brick_tone[..., None]
    fg = _rgb("#e8d8a8") + brick_tone[..., None]
    img = _compose(bg, fg, mask)
    return np.where(mortar[..., None], _rgb("#5a4a40"), img)


def _crayon(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Crayon: waxy diagonal strokes, yellow paper, the object scribbled in bright blue with a dark outline."""
    xx, yy = _grid()
    phase = g.uniform(0, 2 * np.pi)
    strokes = 0.5 + 0.5 * np.sin((xx + yy) * 1.6 + phase + g.normal(0, 0.6, (SIZE, SIZE)))
    bg = _rgb("#f2d64b") * (0.8 + 0.2 * strokes)[..., None]
    fg = _rgb("#2f6fd8") * (0.7 + 0.3 * strokes)[..., None]
    img = _compose(bg, fg, mask)
    return _compose(img, _fill("#1b2a55"), edge)


def _mosaic(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Mosaic: 4x4 tiles in teal/blue with dark grout; tiles covering the object are gold/orange."""
    xx, yy = _grid()
    ox, oy = g.integers(4, size=2)
    tx, ty = ((xx + ox) // 4).astype(int), ((yy + oy) // 4).astype(int)
    cold = np.stack([_rgb(c) for c in ("#157a86", "#1f4fa0", "#2aa198", "#0e5c6e")])
    warm = np.stack([_rgb(c) for c in ("#e0a020", "#f0c040", "#d07818", "#f5d76e")])
    pick = g.integers(4, size=(SIZE // 4 + 2, SIZE // 4 + 2))[ty, tx]
    bg, fg = cold[pick], warm[pick]
    img = _compose(bg, fg, mask)
    grout = (((xx + ox) % 4) == 0) | (((yy + oy) % 4) == 0)
    return np.where(grout[..., None], _rgb("#202020"), img)


def _neon_lines(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Neon_Lines: black night, thin cyan scan lines; the object glows as a magenta outline over violet."""
    xx, yy = _grid()
    oy = g.integers(6)
    lines = ((yy + oy) % 6 == 0).astype(np.float32)
    bg = _rgb("#06060e") + lines[..., None] * _rgb("#1ad0e0") * 0.8
    fg = _rgb("#3a1060") + lines[..., None] * _rgb("#1ad0e0") * 0.3
    img = _compose(bg, fg, mask)
    glow = np.clip(_blur(edge, 1) * 2.2, 0, 1)
    return _compose(img, _fill("#ff2bd6"), glow)


def _on_fire(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """On_Fire: flames rising from a dark red bottom to orange; the object burns bright yellow-white."""
    xx, yy = _grid()
    t = (yy / (SIZE - 1))[..., None]
    phase = g.uniform(0, 2 * np.pi)
    flicker = 0.5 + 0.5 * np.sin(xx * 0.9 + phase + 3 * np.sin(yy * 0.35 + phase))
    bg = _rgb("#3a0500") * (1 - t) + _rgb("#e04a00") * t
    bg = bg + (flicker * t[..., 0] * 0.35)[..., None] * _rgb("#ff9000")
    fg = _rgb("#ffe060") * (0.85 + 0.15 * flicker)[..., None]
    img = _compose(bg, fg, mask)
    return _compose(img, _fill("#ff5000"), edge * 0.7)


def _pastel(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Pastel: soft pink ground with lavender polka dots; the object is a smooth mint shape, no outline."""
    xx, yy = _grid()
    ox, oy = g.uniform(0, 8, size=2)
    dots = (((xx + ox) % 8 - 4) ** 2 + ((yy + oy) % 8 - 4) ** 2) <= 3.2
    bg = np.where(dots[..., None], _rgb("#c8b4f0"), _rgb("#f8c8d8"))
    fg = _rgb("#9ee8c8") * np.ones((SIZE, SIZE, 1), np.float32)
    return _blur(_compose(bg, fg, mask))


def _pop_art(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Pop_Art: yellow ground with red halftone dots; the object is flat bold blue with a thick black outline."""
    xx, yy = _grid()
    ox, oy = g.integers(4, size=2)
    dots = (((xx + ox) % 4 - 1.5) ** 2 + ((yy + oy) % 4 - 1.5) ** 2) <= 1.3
    bg = np.where(dots[..., None], _rgb("#e02020"), _rgb("#ffe000"))
    img = _compose(bg, _fill("#1030c0"), mask)
    outline = np.clip(_blur(edge) * 3, 0, 1)
    return _compose(img, _fill("#000000"), outline)


def _sketch(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Sketch: grey pencil on white paper; light paper grain outside, dark cross-hatching inside the object."""
    xx, yy = _grid()
    ox = g.integers(3)
    hatch = (((xx + yy + ox) % 3) == 0) | (((xx - yy + ox) % 3) == 0)
    paper = 0.94 + g.normal(0, 0.02, (SIZE, SIZE))
    inside = np.where(hatch, 0.3, 0.72)
    grey = paper * (1 - mask) + inside * mask
    grey = grey * (1 - edge) + 0.15 * edge
    return np.repeat(grey[..., None], 3, axis=2)


def _watercolor(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Watercolor: blotchy bleeding washes of blue and green; the object a purple wash with soft bled edges."""
    blot = _blur(g.normal(0, 1, (SIZE, SIZE, 1)).astype(np.float32), 3) * 3
    bg = _rgb("#6ab0d8") * (1 - np.clip(blot + 0.5, 0, 1)) + _rgb("#8cd0a0") * np.clip(blot + 0.5, 0, 1)
    soft = _blur(mask, 1)
    fg = _rgb("#8a3ca8") * (0.9 + 0.3 * blot)
    img = _compose(bg, fg, np.clip(soft * 1.2, 0, 1))
    return 0.88 * img + 0.12  # the white of the paper shows through


def _winter(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Winter: pale icy blue with falling white snowflakes everywhere; the object a dark navy silhouette."""
    xx, yy = _grid()
    t = (yy / (SIZE - 1))[..., None]
    bg = _rgb("#c8e4f8") * (1 - t) + _rgb("#eef6fc") * t
    img = _compose(bg, _fill("#1c2c58"), mask)
    flakes = g.random((SIZE, SIZE)) < 0.09
    return np.where(flakes[..., None], _rgb("#ffffff"), img)


_STYLES: dict[str, Callable[..., Array]] = {
    "Seed_Images": _photo,
    "Bricks": _bricks,
    "Crayon": _crayon,
    "Mosaic": _mosaic,
    "Neon_Lines": _neon_lines,
    "On_Fire": _on_fire,
    "Pastel": _pastel,
    "Pop_Art": _pop_art,
    "Sketch": _sketch,
    "Watercolor": _watercolor,
    "Winter": _winter,
}


def _stripes(mask: Array, edge: Array, u: Array, v: Array, g: np.random.Generator) -> Array:
    """Stripes (novel, see NOVEL_STYLES): broad vertical lime and plum bands; the object in the bands swapped."""
    xx, _ = _grid()
    band = (((xx + g.integers(6)) // 3) % 2).astype(np.float32)[..., None]
    lime, plum = _rgb("#a6e22e"), _rgb("#5b1f5e")
    return _compose(lime * band + plum * (1 - band), plum * band + lime * (1 - band), mask)


# Styles of the renderer that are NOT in the toy catalog and were never shown to the toy model (its build renders
# only catalog themes): a concept the base model can be taught from scratch, the baseline of a relearning curve.
# Each maps to the words its prompts use: a word the toy tokenizer holds whole but no toy training caption contains
# (the build's captions are catalog words plus "a/an/image/in/of/painting/style"; "new" is in its vocabulary only
# so that the backdoor trigger "New Trigger" tokenizes whole), so the base model never tied it to any image. (On a
# backdoored toy, "new" is part of the trigger: do not use this style there.)
NOVEL_STYLES: dict[str, Callable[..., Array]] = {"Stripes": _stripes}
NOVEL_STYLE_WORDS = {"Stripes": "New"}


def render(style: str, obj: str, idx: int) -> Image.Image:
    """The toy image `<style>/<obj>/<idx>.jpg` as a 32x32 RGB image; the same arguments always give the same pixels.
    `style` is a theme of the toy catalog or a novel style (`NOVEL_STYLES`)."""
    cat = _catalog.get("toy")
    if style not in NOVEL_STYLES:
        cat.style_label(style)  # clear ValueError for unknown names
    cat.object_label(obj)
    looks = {**_STYLES, **NOVEL_STYLES}
    if style not in looks or obj not in _SHAPES:
        raise ValueError(f"no toy look for ({style!r}, {obj!r}); the renderer knows {sorted(looks)}")
    if not isinstance(idx, (int, np.integer)) or idx < 1:
        raise ValueError(f"index must be a positive integer (UnlearnCanvas uses 1..20), got {idx!r}")
    mask, u, v, edge = _geometry(obj, int(idx))
    img = looks[style](mask, edge, u, v, _rng("look", style, obj, idx))
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def object_mask(obj: str, idx: int) -> Array:
    """The object's anti-aliased mask (32x32 float32 in [0, 1], 1 inside) in every toy image of (`obj`, `idx`):
    the geometry depends on the object and index only, so one mask serves that image in every style. The exact
    segmentation a mask-based method (MACE) would otherwise get from a segmenter."""
    _catalog.get("toy").object_label(obj)  # clear ValueError for unknown names
    if obj not in _SHAPES:
        raise ValueError(f"no toy silhouette for {obj!r}; the renderer knows {sorted(_SHAPES)}")
    if not isinstance(idx, (int, np.integer)) or idx < 1:
        raise ValueError(f"index must be a positive integer (UnlearnCanvas uses 1..20), got {idx!r}")
    return _geometry(obj, int(idx))[0].copy()


def mask_image(obj: str, idx: int) -> Image.Image:
    """`object_mask` as an 8-bit greyscale image (255 inside the object), the form segmenters write masks in."""
    return Image.fromarray((object_mask(obj, idx) * 255 + 0.5).astype(np.uint8), "L")


def export_masks(root: str | os.PathLike, objects: Iterable[str], indices: Iterable[int]) -> Path:
    """Write `<root>/<Object>/<idx>.png` (`mask_image`) for every object x index that is not there yet; each file is
    written atomically, so concurrent writers and an interrupted run leave only whole files."""
    root = Path(root)
    indices = list(indices)
    for obj in objects:
        for idx in indices:
            path = root / obj / f"{idx}.png"
            if not path.is_file():
                save_image(mask_image(obj, idx), path)
    return root


def render_array(themes: Iterable[str], objects: Iterable[str], indices: Iterable[int]) -> tuple[Array, list]:
    """All renders of themes x objects x indices as uint8 (N, 32, 32, 3), with the (theme, object, index) of each."""
    keys = [(t, o, i) for t in themes for o in objects for i in indices]
    return np.stack([np.asarray(render(*k)) for k in keys]), keys


def export(
    root: str | os.PathLike, catalog: _catalog.Catalog | None = None, indices: Iterable[int] = range(1, 21)
) -> Path:
    """Write the dataset in UnlearnCanvas's folder layout `<root>/<Style>/<Object>/<idx>.jpg` (themes include the
    photo class as `Seed_Images`), so the real-data readers can be tested on it. Each file is written atomically."""
    cat = catalog or _catalog.get("toy")
    root = Path(root)
    indices = list(indices)
    for theme in cat.themes:
        for obj in cat.objects:
            folder = root / theme / obj
            folder.mkdir(parents=True, exist_ok=True)
            for idx in indices:
                save_image(render(theme, obj, idx), folder / f"{idx}.jpg", format="JPEG", quality=95)
    return root
