"""Style and object classifiers that judge generated images, keyed by catalog name.

`load(name, kind)` returns an `nn.Module` mapping a float batch in [0, 1] of shape (B, 3, H, W) to logits in the
catalog's label order (style: `catalog.themes`, object: `catalog.objects`). Each catalog registers its own loader in
`_LOADERS`, so the UnlearnCanvas ViT-L/16 loader can sit next to the toy one. Weights load with safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from canvas.vit import load_checkpoint
from erase import catalog as _catalog
from erase.paths import toy_classifiers_path

KINDS = ("style", "object")


class ToyClassifier(nn.Module):
    """A small CNN for the 32x32 toy images: four conv stages with BatchNorm, global pooling, linear head.

    Inputs of any size are resized to `size` first, so images from a pipeline run at another resolution still work.
    """

    def __init__(self, num_classes: int, width: int = 32, size: int = 32) -> None:
        super().__init__()
        self.size = size

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            stage(3, width),
            nn.MaxPool2d(2),  # 16x16
            stage(width, 2 * width),
            nn.MaxPool2d(2),  # 8x8
            stage(2 * width, 4 * width),
            nn.MaxPool2d(2),  # 4x4
            stage(4 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        x = self.features(images * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))


def _labels(name: str, kind: str) -> tuple[str, ...]:
    cat = _catalog.get(name)
    return cat.themes if kind == "style" else cat.objects


def _load_toy(kind: str, root: str | os.PathLike | None = None) -> nn.Module:
    """The toy classifiers written by scripts/build_toy.py: `<root>/config.json` plus `<root>/<kind>.safetensors`."""
    root = Path(root) if root is not None else toy_classifiers_path()
    config_path, weights_path = root / "config.json", root / f"{kind}.safetensors"
    if not weights_path.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"toy {kind} classifier not found under {root}; build it with scripts/build_toy.py")
    config = json.loads(config_path.read_text())[kind]
    expected = _labels("toy", kind)
    if tuple(config["labels"]) != expected:
        raise ValueError(
            f"toy {kind} classifier at {root} has {len(config['labels'])} labels {config['labels']}, but the toy "
            f"catalog has {len(expected)}: {list(expected)}; rebuild it with scripts/build_toy.py"
        )
    model = ToyClassifier(len(expected), width=config["width"], size=config["size"])
    model.load_state_dict(load_file(weights_path))
    return model.eval()


def _load_unlearncanvas(catalog_name: str) -> Callable[..., nn.Module]:
    """The authors' ViT-L/16 checkpoints: `root` is the `.pth` file, or a folder holding `<kind>.pth`."""

    def load_vit(kind: str, root: str | os.PathLike | None = None) -> nn.Module:
        if root is None:
            raise ValueError(f"the {catalog_name} {kind} classifier needs its checkpoint: pass root=<file or folder>")
        path = Path(root) / f"{kind}.pth" if Path(root).is_dir() else Path(root)
        return load_checkpoint(path, len(_labels(catalog_name, kind)))

    return load_vit


_LOADERS: dict[str, Callable[..., nn.Module]] = {
    "toy": _load_toy,
    "unlearncanvas-50": _load_unlearncanvas("unlearncanvas-50"),
    "unlearncanvas-60": _load_unlearncanvas("unlearncanvas-60"),
}


def load(name: str, kind: str, root: str | os.PathLike | None = None) -> nn.Module:
    """The `kind` ("style" or "object") classifier of catalog `name`, in eval mode, logits in catalog label order.

    `root` overrides where the weights are read from (e.g. a fresh build); by default the shipped assets.
    """
    if name.lower() not in _LOADERS:
        raise ValueError(f"no classifiers for catalog {name!r}; accepted: {', '.join(_LOADERS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown classifier kind {kind!r}; accepted: {', '.join(KINDS)}")
    return _LOADERS[name.lower()](kind, root)


def names() -> list[str]:
    """Catalogs that have classifiers."""
    return list(_LOADERS)
