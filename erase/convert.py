"""Key mapping between diffusers pipelines and the original CompVis/LDM single-file checkpoint layout.

One table per component (UNet, VAE, CLIP text encoder) maps each diffusers parameter name to its LDM name. The same
table serves both directions, so a pipeline written with `to_single_file` loads back bit for bit, and checkpoints from
the original Stable Diffusion repositories (SD 1.x, SD 2.x with an OpenCLIP text encoder, and SDXL base with both)
load into diffusers modules without any hub access.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL (Stability's generative-models layout): OpenAI CLIP ViT-L first, OpenCLIP ViT-bigG (with projection) second.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Inside a ResNet block, diffusers name -> LDM name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class ConversionError(ValueError):
    """A model or checkpoint that the LDM key layout cannot express (or that does not match the config)."""


def _as_list(value: int | list[int] | tuple[int, ...], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module name of `rest` (e.g. 'conv1.weight') through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_prefix_map(config: Mapping) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for a UNet2DConditionModel config.

    LDM numbers all down/up layers in one flat list (input_blocks.N / output_blocks.N), with the ResNet at .0, the
    transformer at .1 and the resampler after the last layer of a block; diffusers nests them per block.
    """
    n_down = len(config["down_block_types"])
    per_down = _as_list(config["layers_per_block"], n_down)
    per_up = list(reversed(per_down))
    rows: list[tuple[str, str, bool]] = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),  # SDXL's pooled-text + time-ids embedding
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
    ]
    index = 1
    for i, layers in enumerate(per_down):
        for j in range(layers):
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", True))
            rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", False))
            index += 1
        if i < n_down - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", False))
            index += 1
    index = 0
    for i, layers in enumerate(per_up):
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", True))
            rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", False))
            index += 1
        if i < len(per_up) - 1:
            slot = 2 if has_attention else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{index - 1}.{slot}.conv.", False))
    return rows


def unet_key(key: str, config: Mapping) -> str:
    """LDM name (without the 'model.diffusion_model.' prefix) of a diffusers UNet parameter."""
    for old, new, is_resnet in unet_prefix_map(config):
        if key.startswith(old):
            rest = key[len(old) :]
            return new + (_rename_inner(rest, _UNET_RESNET) if is_resnet else rest)
    raise ConversionError(f"UNet parameter {key!r} has no place in the CompVis/LDM layout (SD 1.x/2.x, SDXL UNets)")


def vae_key(key: str, config: Mapping) -> str:
    """LDM name (without 'first_stage_model.') of a diffusers AutoencoderKL parameter; decoder blocks run reversed."""
    n_up = len(config["up_block_types"])
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise ConversionError(f"VAE parameter {key!r} has no place in the CompVis/LDM layout")
    patterns: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"down.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"down.{m[1]}.downsample.{m[2]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"mid.block_{int(m[1]) + 1}.{m[2]}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: "mid.attn_1." + _rename_inner(m[1], _VAE_ATTENTION)),
        (r"conv_norm_out\.(.*)", lambda m: f"norm_out.{m[1]}"),
        (r"(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
    ]
    for pattern, build in patterns:
        match = re.fullmatch(pattern, rest)
        if match:
            inner = build(match)
            # ResNet shortcut naming differs; apply it to the part after 'block.N.' / 'block_N.'.
            inner = re.sub(r"(block[._]\d+\.)conv_shortcut\.", r"\1nin_shortcut.", inner)
            return f"{side}.{inner}"
    raise ConversionError(f"VAE parameter {key!r} has no place in the CompVis/LDM layout")


def clip_key(key: str) -> str:
    """LDM name (without 'cond_stage_model.transformer.text_model.') of a transformers CLIPTextModel parameter.

    transformers >= 5.6 dropped the 'text_model.' level from CLIPTextModel; both spellings map to the same name.
    """
    return key.removeprefix("text_model.")


def _is_vae_attention_weight(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and ".norm." not in ldm_key


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The CompVis/LDM (SD 1.x layout) state dict of a pipeline's UNet, VAE and CLIP text encoder, on CPU."""
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out[UNET_PREFIX + unet_key(key, pipe.unet.config)] = value
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, pipe.vae.config)
        if _is_vae_attention_weight(name) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = value
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for key, value in pipe.text_encoder.state_dict().items():
        out[(SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX) + clip_key(key)] = value
    if sdxl:
        out.update(open_clip_state_dict(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def open_clip_state_dict(text_encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout under `prefix`: q/k/v fused into `in_proj`, its own names,
    and the projection as OpenCLIP's (width, projection) matrix (the transpose of the Linear weight)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        name = clip_key(key)
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif name in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[name]] = value
        else:
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
            if match is None:
                raise ConversionError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout")
            layer, module, kind = match.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in _QKV:
                layers.setdefault(f"{base}attn.in_proj_{kind}", {})[module] = value
            else:
                out[f"{base}{_OPEN_CLIP_LAYER[module]}.{kind}"] = value
    for name, parts in layers.items():
        out[name] = torch.cat([parts[m] for m in _QKV])  # q, k, v stacked along the output rows
    return out


def to_single_file(pipe, path: str | os.PathLike) -> Path:
    """Write a pipeline as one CompVis-layout .safetensors (what A1111/ComfyUI and the original repos read).

    The file is written next to its destination and renamed into place, so a failure leaves no partial file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file output must end in .safetensors, got {str(path)!r}")
    state = ldm_state_dict(pipe)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "layout": "compvis-ldm"}))


def _take(checkpoint: Mapping[str, torch.Tensor], name: str, target: torch.Tensor, what: str) -> torch.Tensor:
    if name not in checkpoint:
        raise ConversionError(f"{what}: checkpoint has no tensor {name!r}")
    value = checkpoint[name]
    if value.shape != target.shape:
        if value.numel() == target.numel() and value.squeeze().shape == target.squeeze().shape:
            value = value.reshape(target.shape)  # 1x1 conv <-> linear (VAE attention, SD1 vs SD2 proj_in)
        else:
            raise ConversionError(
                f"{what}: {name!r} has shape {tuple(value.shape)} but the config expects {tuple(target.shape)}"
                " (does config= describe this checkpoint's architecture?)"
            )
    return value


def _check_consumed(checkpoint: Mapping[str, torch.Tensor], prefix: str, used: set[str], what: str) -> None:
    """Leftover tensors under a component's prefix mean the config describes a smaller model than the file."""
    left = sorted(k for k in checkpoint if k.startswith(prefix) and k not in used)
    if left:
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        raise ConversionError(
            f"{what}: {len(left)} checkpoint tensors do not fit the config (e.g. {shown}); "
            "does config= describe this checkpoint's architecture?"
        )


def _load_into(module: nn.Module, values: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Assign `values` (diffusers names) to every parameter and persistent buffer of `module`, strictly."""
    values = {k: v.to(dtype) if v.is_floating_point() else v for k, v in values.items()}
    module.load_state_dict(values, strict=True, assign=True)


def load_unet_from_ldm(unet: nn.Module, checkpoint: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Fill a diffusers UNet (built from its config) with the 'model.diffusion_model.*' tensors of a checkpoint."""
    used: set[str] = set()
    values = {}
    for key, target in unet.state_dict().items():
        name = UNET_PREFIX + unet_key(key, unet.config)
        values[key] = _take(checkpoint, name, target, "UNet")
        used.add(name)
    _check_consumed(checkpoint, UNET_PREFIX, used, "UNet")
    _load_into(unet, values, dtype)


def load_vae_from_ldm(vae: nn.Module, checkpoint: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Fill a diffusers AutoencoderKL with the 'first_stage_model.*' tensors of a checkpoint."""
    used: set[str] = set()
    values = {}
    for key, target in vae.state_dict().items():
        name = VAE_PREFIX + vae_key(key, vae.config)
        values[key] = _take(checkpoint, name, target, "VAE")
        used.add(name)
    _check_consumed(checkpoint, VAE_PREFIX, used, "VAE")
    _load_into(vae, values, dtype)


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the order OpenCLIP fuses them in
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _open_clip_value(
    checkpoint: Mapping[str, torch.Tensor], key: str, target: torch.Tensor, prefix: str = OPEN_CLIP_PREFIX
) -> torch.Tensor:
    """SD 2.x and SDXL store an OpenCLIP text tower: fused q/k/v ('in_proj') and its own names; diffusers keeps the
    first layers of SD 2's (it conditions on the penultimate layer), so unused trailing layers in the file are
    expected."""
    if key == "text_projection.weight":  # SDXL's second encoder: OpenCLIP keeps the transpose
        return _take(checkpoint, prefix + "text_projection", target.T, "text encoder").T
    if key in _OPEN_CLIP_TOP:
        return _take(checkpoint, prefix + _OPEN_CLIP_TOP[key], target, "text encoder")
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not match:
        raise ConversionError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout")
    layer, module, kind = match.groups()
    base = f"{prefix}transformer.resblocks.{layer}."
    qkv = {name: i for i, name in enumerate(_QKV)}
    if module in qkv:
        fused = checkpoint.get(f"{base}attn.in_proj_{kind}")
        if fused is None:
            raise ConversionError(f"text encoder: checkpoint has no tensor {base}attn.in_proj_{kind!r}")
        return _take({"x": fused.chunk(3, dim=0)[qkv[module]]}, "x", target, f"text encoder ({key})")
    if module not in _OPEN_CLIP_LAYER:
        raise ConversionError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout")
    return _take(checkpoint, f"{base}{_OPEN_CLIP_LAYER[module]}.{kind}", target, "text encoder")


def load_text_encoder_from_ldm(
    text_encoder: nn.Module, checkpoint: Mapping[str, torch.Tensor], dtype: torch.dtype, which: int = 0
) -> None:
    """Fill a transformers CLIP text model from 'cond_stage_model.transformer.*' (SD 1.x, OpenAI CLIP; with or without
    the 'text_model.' level) or 'cond_stage_model.model.*' (SD 2.x, OpenCLIP); in an SDXL file, `which` 0 is the
    OpenAI CLIP under 'conditioner.embedders.0.transformer.*', 1 the OpenCLIP under
    'conditioner.embedders.1.model.*'."""
    sdxl = any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in checkpoint)
    open_clip = which == 1 or (not sdxl and any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint))
    open_prefix = SDXL_OPEN_CLIP_PREFIX if sdxl else OPEN_CLIP_PREFIX
    clip_prefix = SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX
    values = {}
    for key, target in text_encoder.state_dict().items():
        name = clip_key(key) if key != "text_projection.weight" else key
        if open_clip:
            values[key] = _open_clip_value(checkpoint, name, target, open_prefix)
            continue
        ldm = clip_prefix + name
        if ldm not in checkpoint:  # checkpoints made with old transformers lack the 'text_model.' level
            ldm = clip_prefix.removesuffix("text_model.") + name
        values[key] = _take(checkpoint, ldm, target, "text encoder")
    _load_into(text_encoder, values, dtype)
