"""A Delta's weight changes as low-rank LoRA factors, in the files diffusers, ComfyUI and A1111 already load.

A Delta stores new values, so the change is `new - base` on the Delta's own base (checked by fingerprint). Each
changed Linear weight, and each Conv2d weight read as the (out, in*kh*kw) matrix it multiplies, is cut to its best
rank-R approximation by truncated SVD (Eckart-Young: exact when the change's rank is <= R, as for the closed-form
edits), with the singular values split evenly between the two factors so neither carries the whole scale. Every
other changed tensor (norms, biases, embeddings) has no LoRA form: it is listed as not exportable, never dropped
silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write
from .conditioning import is_sdxl
from .convert import unet_key
from .delta import Delta

FORMATS = ("diffusers", "kohya")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraExport:
    """The file's tensors and metadata, and per changed tensor of the Delta its rank and relative error
    ||dW - B A|| / ||dW|| (Frobenius, measured on the stored factors), or why it could not be exported."""

    format: str
    rank: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    not_exportable: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: str | Path) -> Path:
        """Write the safetensors file atomically (beside, then renamed)."""
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata))


def low_rank(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in*kh*kw), r = min(rank, out, in*kh*kw), with B @ A the best rank-r approximation of
    `change` flattened to a matrix; sqrt of the singular values on each side. Computed in float64."""
    matrix = change.detach().to(torch.float64).reshape(change.shape[0], -1)  # (out, in*kh*kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def relative_error(change: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||dW - B A|| / ||dW|| with the factors as stored (so their rounding counts); 0 for a zero change."""
    matrix = change.detach().to(torch.float64).reshape(change.shape[0], -1)
    norm = torch.linalg.norm(matrix)
    if norm == 0:
        return 0.0
    product = up.to(torch.float64).reshape(up.shape[0], -1) @ down.to(torch.float64).reshape(down.shape[0], -1)
    return float(torch.linalg.norm(matrix - product) / norm)


def _owner(pipe, full_name: str) -> tuple[str, str, nn.Module | None, str]:
    """(component, module path, module or None, parameter attribute) of a Delta tensor name."""
    component, _, name = full_name.partition(".")
    module_path, _, attribute = name.rpartition(".")
    root = getattr(pipe, component, None)
    if not isinstance(root, nn.Module):
        return component, module_path, None, attribute
    try:
        return component, module_path, root.get_submodule(module_path), attribute
    except AttributeError:
        return component, module_path, None, attribute


def _why_not(module: nn.Module | None, attribute: str, tensor: torch.Tensor) -> str | None:
    """None for a Linear or (ungrouped) Conv2d weight; else why the tensor has no LoRA form."""
    if module is None:
        return "no such module in this pipeline"
    kind = type(module).__name__
    if attribute != "weight":
        return f"{kind}.{attribute} ({tensor.dim()}-D): only Linear and Conv2d weights have a LoRA form"
    if isinstance(module, nn.Linear) and tensor.dim() == 2:
        return None
    if isinstance(module, nn.Conv2d) and tensor.dim() == 4:
        return None if module.groups == 1 else f"grouped Conv2d weight (groups={module.groups})"
    return f"{kind}.weight ({tensor.dim()}-D): only Linear and Conv2d weights have a LoRA form"


def canonical_text_module(module_path: str) -> str:
    """A CLIP text-encoder module under its long-standing name: transformers >= 5.6 dropped CLIPTextModel's
    `text_model.` level; LoRA files (and the loaders that strip it again) keep it."""
    if module_path.startswith("text_model.") or module_path == "text_projection":
        return module_path
    return "text_model." + module_path


def kohya_module(pipe, component: str, module_path: str) -> str:
    """The kohya (sd-scripts) LoRA name of a module: `lora_unet_` + its path with `_` for `.`, the UNet in
    diffusers' layout for SD 1.x/2.x and in the sgm (LDM) layout for SDXL; `lora_te_` for the one text encoder of
    SD 1.x/2.x, `lora_te1_` / `lora_te2_` for SDXL's two."""
    if component == "unet":
        if is_sdxl(pipe.unet):
            module_path = unet_key(module_path + ".weight", pipe.unet.config).removesuffix(".weight")
        return "lora_unet_" + module_path.replace(".", "_")
    first = "lora_te1_" if is_sdxl(pipe.unet) else "lora_te_"
    prefix = {"text_encoder": first, "text_encoder_2": "lora_te2_"}[component]
    return prefix + canonical_text_module(module_path).replace(".", "_")


def diffusers_module(component: str, module_path: str) -> str:
    """The PEFT-style name `pipe.load_lora_weights` reads: `<component>.<module path>`."""
    return f"{component}.{canonical_text_module(module_path) if component in TEXT_ENCODERS else module_path}"


def export_lora(delta: Delta, pipe, rank: int, format: str = "diffusers") -> LoraExport:
    """Low-rank factors of `delta`'s weight changes against `pipe`, its base (refused if the fingerprint differs),
    named for `format` ("diffusers" or "kohya")."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; accepted: {', '.join(FORMATS)}")
    if delta.runtime is not None:
        raise ValueError(f"this delta is a runtime patch ({delta.runtime.kind}): it changes no weight, so it has no "
                         "LoRA form; attach it with Delta.load(folder).apply(pipe)")  # fmt: skip
    delta.check_base(pipe)
    factors: dict[str, tuple[str, str, torch.Tensor, torch.Tensor]] = {}
    result = LoraExport(format, rank, {}, {})
    for full_name in sorted(delta.tensors):
        new = delta.tensors[full_name]
        component, module_path, module, attribute = _owner(pipe, full_name)
        reason = _why_not(module, attribute, new)
        if reason is None:
            base = getattr(module, attribute)
            if base.shape != new.shape:
                reason = f"shape {tuple(new.shape)} differs from the pipeline's {tuple(base.shape)}"
        if reason is not None:
            result.not_exportable[full_name] = reason
            continue
        change = new.detach().cpu().double() - base.detach().cpu().double()
        up, down = low_rank(change, rank)
        up, down = up.to(new.dtype), down.to(new.dtype)
        result.ranks[full_name] = down.shape[0]
        result.errors[full_name] = relative_error(change, up, down)
        if new.dim() == 4:  # A: a kh x kw conv to r channels; B: a 1x1 conv back to `out`
            down = down.reshape(down.shape[0], *new.shape[1:])  # (r, in, kh, kw)
            up = up.reshape(*up.shape, 1, 1)  # (out, r, 1, 1)
        factors[full_name] = (component, module_path, up.contiguous(), down.contiguous())
    if not factors:
        listed = "; ".join(f"{n}: {why}" for n, why in result.not_exportable.items()) or "it holds no tensor"
        raise ValueError(f"this delta has no Linear or Conv2d weight change to export as LoRA ({listed})")
    if format == "diffusers":
        _name_diffusers(result, factors)
    else:
        _name_kohya(result, factors, pipe, rank)
    result.metadata.update(_erasekit_metadata(result, delta))
    return result


def _name_diffusers(result: LoraExport, factors: dict) -> None:
    """PEFT keys, plus the LoraConfig diffusers builds the adapter from (`lora_adapter_metadata`): lora_alpha = r
    for every module, so each scale is exactly 1."""
    config: dict[str, dict] = {}
    for full_name, (component, module_path, up, down) in factors.items():
        name = diffusers_module(component, module_path)
        result.tensors[f"{name}.lora_A.weight"] = down
        result.tensors[f"{name}.lora_B.weight"] = up
        # Suffix-matched by PEFT, so a text-encoder module without `text_model.` matches either transformers layout.
        target = name.partition(".")[2].removeprefix("text_model.")
        config.setdefault(component, {})[target] = result.ranks[full_name]
    adapter: dict[str, object] = {}
    for component, ranks in config.items():
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: r for m, r in ranks.items() if r != common}
        adapter |= {f"{component}.r": common, f"{component}.lora_alpha": common, f"{component}.rank_pattern": pattern,
                    f"{component}.alpha_pattern": pattern, f"{component}.target_modules": sorted(ranks)}  # fmt: skip
    result.metadata["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)


def _name_kohya(result: LoraExport, factors: dict, pipe, rank: int) -> None:
    """kohya keys, every module at rank `rank` with alpha = `rank` (scale alpha / rank = 1). A module whose change
    has fewer than `rank` singular values (a small matrix) gets zero rows and columns: one rank and one alpha for
    the whole file is what every loader reads the same way (diffusers' kohya path sizes some text-encoder modules,
    e.g. SDXL's text_projection, by the file's most common rank)."""
    for component, module_path, up, down in factors.values():
        name = kohya_module(pipe, component, module_path)
        missing = rank - down.shape[0]
        if missing:
            down = torch.cat([down, down.new_zeros(missing, *down.shape[1:])])
            up = torch.cat([up, up.new_zeros(up.shape[0], missing, *up.shape[2:])], dim=1)
        result.tensors[f"{name}.lora_down.weight"] = down
        result.tensors[f"{name}.lora_up.weight"] = up
        result.tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=down.dtype)
    result.metadata |= {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                        "ss_network_alpha": str(rank)}  # fmt: skip


def _erasekit_metadata(result: LoraExport, delta: Delta) -> dict[str, str]:
    """What the file says about itself (safetensors metadata holds strings only; JSON for the tables)."""
    return {
        "format": "pt",  # the safetensors framework tag loaders expect; the LoRA layout is erasekit.format
        "erasekit.format": result.format,
        "erasekit.rank": str(result.rank),
        "erasekit.method": str(delta.metadata.get("method", "")),
        "erasekit.base_fingerprint": str(delta.metadata.get("base_fingerprint", "")),
        "erasekit.relative_errors": json.dumps(result.errors, sort_keys=True),
        "erasekit.ranks": json.dumps(result.ranks, sort_keys=True),
        "erasekit.not_exportable": json.dumps(result.not_exportable, sort_keys=True),
    }
