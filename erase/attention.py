"""Cross-attention probabilities with gradients, captured per model instance on chosen layers.

Fused kernels (SDPA, xformers) never materialise the softmax, so methods that optimise attention maps (FMN, MACE,
SKD-CAG) need a processor that computes it explicitly. `capture_cross_attention` installs one on the chosen attn2
modules of one UNet and always restores the previous processors, also after an exception.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


class AttentionStore:
    """Probabilities of the latest forward pass per layer name, shape (batch, heads, queries, keys)."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}

    def take(self) -> dict[str, torch.Tensor]:
        """The captured maps, emptying the store so the next forward pass (say, another model's) starts clean."""
        maps, self.maps = self.maps, {}
        return maps


class CapturingProcessor:
    """Plain attention whose softmax probabilities are kept (with their autograd graph) in a store."""

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        # (B, N, heads*d) -> (B*heads, N, d)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, K)
        self.store.maps[self.name] = probs.view(batch, attn.heads, *probs.shape[1:])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module, layers: str | list[str] = "all") -> list[str]:
    """Names of the attn2 modules selected by `layers`: "all", or glob patterns over module names."""
    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and n.split(".")[-1] == "attn2"]
    if layers == "all":
        chosen = names
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"layers {layers!r} select no cross-attention module; available: {names[:4]} ...")
    return chosen


@contextmanager
def capture_cross_attention(unet: nn.Module, layers: str | list[str] = "all") -> Iterator[AttentionStore]:
    """Within the block, every forward of `unet` records cross-attention probabilities of the chosen layers."""
    modules = dict(unet.named_modules())
    chosen = cross_attention_layers(unet, layers)
    store = AttentionStore()
    previous = {name: modules[name].processor for name in chosen}
    try:
        for name in chosen:
            modules[name].set_processor(CapturingProcessor(store, name))
        yield store
    finally:
        for name, processor in previous.items():
            modules[name].set_processor(processor)
