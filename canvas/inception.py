"""Inception-v3 features for FID, in two variants that give different numbers, so the report names which
(`FID[inception-tf2015]`, `FID[inception-torchvision]`):

- `tf2015` (default): the FID variant of the network (TF's 2015-12-05 Inception as ported for FID, with its pooling
  quirks), in plain torch, loading a local file such as `pt_inception-2015-12-05-*.pth`. Images resized to 299x299
  (bilinear) and scaled to [-1, 1]. It differs from torchvision's classifier in its pools: average pools exclude
  padding, and the last block's pool branch takes a max instead of an average.
- `torchvision`: UnlearnCanvas's own FID path (machine_unlearning/evaluation/quantitative/fid.py): torchvision's
  ImageNet `inception_v3` (weights from a local file such as `inception_v3_google-0cc3c7bd.pth`, never downloaded;
  needs torchvision), its input as that code feeds it (`TorchvisionFID`).

Module names follow torchvision's Inception-v3, the layout of both files' state dicts, so they load with
`torch.load(weights_only=True)`. Features: the 2048-d global average pool of `Mixed_7c`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double,
                          self.branch_pool(_avg_pool(x))], 1)  # fmt: skip


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled),
        ], 1)  # fmt: skip


class FIDInception(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool features. `fc` (1008 classes) exists only to load the file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # (B, 2048)


VARIANTS = ("tf2015", "torchvision")
DEFAULT_VARIANT = "tf2015"
TORCHVISION_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1"
UNLEARNCANVAS_SIDE = 512  # UnlearnCanvas resizes every image to 512x512 before the network's 299x299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CLASSES = {1008: "tf2015", 1000: "torchvision"}  # rows of `fc.weight` in each variant's weights file


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Inception variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    return variant


def load(path: str | os.PathLike, variant: str = DEFAULT_VARIANT) -> nn.Module:
    """The FID feature extractor of `variant` from a local state-dict file, read weights-only: (B, 3, H, W) in
    [0, 1] -> (B, 2048). A file of another layout, or of the other variant, is a one-line error."""
    state = _read_state(path, check_variant(variant))
    if variant == "torchvision":
        return load_torchvision(state, path)
    model = FIDInception()
    _load_state(model, state, path, variant)
    return model.eval()


def _read_state(path: str | os.PathLike, variant: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {str(path)!r} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a weights-only torch file: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__})")
    fc = state.get("fc.weight")
    other = _CLASSES.get(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.ndim == 2 else None
    if other is not None and other != variant:
        raise ValueError(f"{path} holds {other} Inception weights ({fc.shape[0]} classes), not {variant}; "
                         f"use --inception-variant {other}")  # fmt: skip
    return state


def _load_state(model: nn.Module, state: dict, path: str | os.PathLike, variant: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"{path} is not an FID Inception-v3 state dict of variant {variant}: {first}") from None


def unlearncanvas_resize(images: torch.Tensor) -> torch.Tensor:
    """UnlearnCanvas's FID resizing: to 512x512 (cv2 bilinear on uint8, so values fall on 1/255 steps), then to
    299x299 (cv2 bilinear on floats). cv2's INTER_LINEAR samples at pixel centres without antialiasing, which is
    torch's bilinear with align_corners=False; an image already 512x512 is kept as it is, as cv2 does."""
    x = images
    if tuple(x.shape[-2:]) != (UNLEARNCANVAS_SIDE,) * 2:
        x = F.interpolate(x, size=(UNLEARNCANVAS_SIDE,) * 2, mode="bilinear", align_corners=False)
        x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def imagenet_transform_input(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `inception_v3(transform_input=True)`: per channel x * std / 0.5 + (mean - 0.5) / 0.5, which maps
    an ImageNet-normalised input (u - mean) / std to the (u - 0.5) / 0.5 that the ported Google weights expect."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class TorchvisionFID(nn.Module):
    """UnlearnCanvas's FID features around `network` (torchvision's Inception-v3 without its transform and with
    `fc` = identity, so it returns the 2048-d pool): images in [0, 1] -> `unlearncanvas_resize` -> x * 2 - 1 ->
    `imagenet_transform_input` -> network. The authors' code scales to [-1, 1] and then lets `pretrained=True`'s
    transform_input=True rescale once more as if the input were ImageNet-normalised; we keep both steps, since
    that is the FID their table reports."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = unlearncanvas_resize(images) * 2.0 - 1.0
        return self.network(imagenet_transform_input(x)).flatten(1)  # (B, 2048)


def torchvision_inception(aux_logits: bool = True) -> nn.Module:
    """torchvision's ImageNet Inception-v3 architecture, untrained and without its input transform (applied by
    `TorchvisionFID`); a one-line error when torchvision is missing or does not match the installed torch."""
    try:
        from torchvision.models import inception_v3
    except (ImportError, RuntimeError, OSError) as err:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'not importable'}"
        raise ValueError(f"--inception-variant torchvision needs torchvision, not importable here ({why}); install "
                         f"it: {TORCHVISION_INSTALL}") from None  # fmt: skip
    return inception_v3(weights=None, aux_logits=aux_logits, transform_input=False, init_weights=False)


def load_torchvision(state: dict, path: str | os.PathLike = "<state dict>") -> TorchvisionFID:
    """`TorchvisionFID` over torchvision's Inception-v3 holding `state` (with or without the AuxLogits head)."""
    network = torchvision_inception(aux_logits=any(k.startswith("AuxLogits.") for k in state))
    _load_state(network, state, path, "torchvision")
    network.fc = nn.Identity()
    return TorchvisionFID(network).eval()
