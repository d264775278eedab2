"""The UnlearnCanvas classifier: ViT-Large/16 (timm's `vit_large_patch16_224.augreg_in21k` layout) with a new
linear head, written in plain torch so the benchmark needs neither timm nor torchvision.

The module and parameter names match timm's VisionTransformer, so the authors' `model_state_dict` checkpoints
load unchanged. Preprocessing follows the reference: resize to 224x224, normalise with mean 0.5 and std 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B,h,N,d/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTClassifier(nn.Module):
    """Pre-norm ViT with a class token; logits from the final-normed class token. Input: (B, 3, H, W) in [0, 1]."""

    def __init__(
        self, num_classes: int, image_size: int = 224, patch: int = 16, dim: int = 1024, depth: int = 24,
        heads: int = 16, mlp_ratio: float = 4.0,
    ):  # fmt: skip
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)  # fmt: skip
        x = self.patch_embed.proj((images - 0.5) / 0.5).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def load_checkpoint(path: str | os.PathLike, num_classes: int, **arch) -> ViTClassifier:
    """A classifier from the authors' checkpoint (a dict holding `model_state_dict`), read weights-only.

    Raises ValueError naming the file when it is not such a checkpoint or its head has another label count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles that need code, truncated files
        raise ValueError(f"{path} is not a weights-only torch checkpoint: {err}") from None
    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "head.weight" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"{path} holds no ViT classifier state (expected 'model_state_dict' with 'head.weight')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    found = state["head.weight"].shape[0]
    if found != num_classes:
        raise ValueError(f"{path} classifies {found} labels, but the catalog has {num_classes}")
    model = ViTClassifier(num_classes, dim=state["head.weight"].shape[1], **arch)
    model.load_state_dict(state)
    return model.eval()
