"""SDXL's added conditions carried inside the text embedding, so every UNet call stays `unet(x, t, emb)`.

An SDXL UNet needs, beside the cross-attention context (B, T, D), the pooled embedding of its second text encoder
(B, P) and six time ids per sample. Threading those through every method, frozen prediction and sampler would double
each call site, so an SDXL prompt embedding carries its pooled embedding as one extra row after the T token rows
(zero-padded to D; P <= D on every SDXL model). A forward pre-hook on the UNet takes the row off and adds the time
ids of the sample's own size (original size = target size = the image size, crop (0, 0): what diffusers' SDXL
pipeline passes by default and what ESD's SDXL script uses). A call that brings its own `added_cond_kwargs` (the
pipeline's own `__call__`) is left as it is. SD 1.x / 2.x UNets get neither the row nor the hook.

Code that treats embedding rows as tokens (the closed-form K/V edits, token statistics) takes `token_rows` first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HOOK_ATTRIBUTE = "_erasekit_added_conditions"


def is_sdxl(unet: nn.Module) -> bool:
    """Whether the UNet takes SDXL's added conditions (a pooled text embedding and time ids)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def check_supported(pipe) -> None:
    """ValueError for a UNet conditioned on something this toolkit cannot supply (not SD 1.x/2.x or SDXL base)."""
    config = pipe.unet.config
    kind = getattr(config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise ValueError(f"the UNet's addition_embed_type is {kind!r}; supported: none (SD 1.x/2.x) or 'text_time' "
                         "(SDXL)")  # fmt: skip
    if kind == "text_time":
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError("an SDXL pipeline without both text encoders (e.g. the refiner) is not supported: "
                             "erasure edits the base model, which has text_encoder and text_encoder_2")  # fmt: skip
        if getattr(pipe.config, "requires_aesthetics_score", False):
            raise ValueError("SDXL refiner pipelines (requires_aesthetics_score) are not supported; use the base model")
        if pipe.tokenizer.get_vocab() != pipe.tokenizer_2.get_vocab():  # `second_ids` re-pads one for the other
            raise ValueError("the SDXL pipeline's two tokenizers have different vocabularies; expected the shared CLIP "
                             "one")  # fmt: skip


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, T + 1, D): the token rows (B, T, D), then the pooled embedding (B, P) zero-padded to D."""
    batch, _, dim = tokens.shape
    if pooled.shape[-1] > dim:
        raise ValueError(f"pooled embedding of width {pooled.shape[-1]} does not fit a {dim}-wide context row")
    row = tokens.new_zeros(batch, 1, dim)
    row[:, 0, : pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def unpack(states: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T, D), pooled (B, P)) of a packed SDXL embedding."""
    return states[:, :-1], states[:, -1, :pooled_dim]


def pooled_dim(unet: nn.Module) -> int:
    """P, the pooled text embedding's width the SDXL UNet's added embedding expects (its input minus 6 time ids)."""
    config = unet.config
    return int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)


def token_rows(states: torch.Tensor, unet: nn.Module) -> torch.Tensor:
    """The rows of a prompt embedding that are tokens (the cross-attention context): all of them except SDXL's
    pooled row."""
    return states[:, :-1] if is_sdxl(unet) else states


def context_dim(pipe) -> int:
    """D, the width of the cross-attention context: the text encoder's (SD) or both encoders' side by side (SDXL)."""
    return int(pipe.unet.config.cross_attention_dim)


def time_ids(height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's six micro-conditions per sample: original size, crop top-left (0, 0), target size."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).expand(batch, 6)


def install(pipe) -> None:
    """Make the pipeline's UNet accept packed SDXL embeddings (idempotent; a no-op on SD 1.x/2.x)."""
    unet = pipe.unet
    if not is_sdxl(unet) or getattr(unet, HOOK_ATTRIBUTE, None) is not None:
        return
    check_supported(pipe)
    scale, width = int(pipe.vae_scale_factor), pooled_dim(unet)

    def add_conditions(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get("added_cond_kwargs") is not None:
            return None  # the pipeline's own call brings them
        args, kwargs = list(args), dict(kwargs)
        in_args = len(args) > 2
        states = args[2] if in_args else kwargs.get("encoder_hidden_states")
        if states is None:
            raise ValueError("an SDXL UNet was called without encoder_hidden_states")
        tokens, pooled = unpack(states, width)
        sample = args[0] if args else kwargs["sample"]
        height, breadth = sample.shape[-2] * scale, sample.shape[-1] * scale
        ids = time_ids(height, breadth, sample.shape[0], sample.device, tokens.dtype)
        if in_args:
            args[2] = tokens
        else:
            kwargs["encoder_hidden_states"] = tokens
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
        return tuple(args), kwargs

    # prepend: runs before any method's own pre-hook (SEOT, SPM), which then see token rows only
    handle = unet.register_forward_pre_hook(add_conditions, with_kwargs=True, prepend=True)
    setattr(unet, HOOK_ATTRIBUTE, handle)


def second_ids(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The ids of `pipe.tokenizer` re-padded for `pipe.tokenizer_2`: SDXL's two tokenizers share the CLIP vocabulary
    and differ in their padding token only, so the tokens before the first end-of-text are the same."""
    first, second = pipe.tokenizer, pipe.tokenizer_2  # same vocabulary: checked once, by `check_supported`
    if second.pad_token_id == first.pad_token_id:
        return ids
    eos = first.eos_token_id
    after_eos = (ids == eos).long().cumsum(dim=1) - (ids == eos).long() > 0  # past the first end-of-text
    return torch.where(after_eos, torch.full_like(ids, second.pad_token_id), ids)


def encode_ids(pipe, ids: torch.Tensor, text_encoder: nn.Module | None = None) -> torch.Tensor:
    """The prompt embedding the UNet is given for `ids` (B, T) of `pipe.tokenizer`: the text encoder's last states
    (SD 1.x/2.x), or (SDXL) both encoders' penultimate states side by side, packed with the second's pooled
    embedding. `text_encoder` replaces `pipe.text_encoder` (e.g. a frozen or live copy)."""
    first = text_encoder if text_encoder is not None else pipe.text_encoder
    device = next(first.parameters()).device
    ids = ids.to(device)
    if not is_sdxl(pipe.unet):
        return first(ids)[0]
    one = first(ids, output_hidden_states=True).hidden_states[-2]
    out = pipe.text_encoder_2(second_ids(pipe, ids).to(device), output_hidden_states=True)
    tokens = torch.cat([one, out.hidden_states[-2].to(one.dtype)], dim=-1)
    return pack(tokens, out.text_embeds)


def architecture(pipe) -> str:
    """ "sdxl" or "sd" (SD 1.x / 2.x): what a Delta records, so it is never written into the other kind of UNet."""
    return "sdxl" if is_sdxl(pipe.unet) else "sd"


def sampling_unconditional(pipe, empty: torch.Tensor) -> torch.Tensor:
    """The negative embedding the pipeline samples with when given no negative prompt: `empty` (the encoded empty
    prompt), or zeros for an SDXL pipeline with `force_zeros_for_empty_prompt` (its pooled row too)."""
    config = getattr(pipe, "config", None)
    if is_sdxl(pipe.unet) and getattr(config, "force_zeros_for_empty_prompt", False):
        return torch.zeros_like(empty)
    return empty
