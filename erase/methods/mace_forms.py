"""MACE's closed forms, masks, attention loss, prompt templates and t weights (for erase.methods.mace).

Every closed form here is a ridge least-squares problem over one K/V matrix W (out x d) whose data enter only as
d x d sums of token vectors, so the statistics are computed once per run, shared by all layers, and cost the same
for one concept or a thousand:
- refinement (stage 1):  min λ‖W' − W‖² + Σ_pairs ‖W' c_old − W c_new‖² + s_r Σ_P ‖W' p − W p‖²
      W' = W (λI + S + s_r P)(λI + E + s_r P)⁻¹,   E = Σ c_old c_oldᵀ,  S = Σ c_new c_oldᵀ,  P = Σ p pᵀ
- fusion (stage 3):      min λ‖W' − W_r‖² + Σ_i Σ_{c∈E_i} ‖W' c − (W_r + ΔW_i) c‖² + s_f Σ_P ‖W' p − W_0 p‖²
      W' = (λW_r + Σ_i (W_r + ΔW_i) C_i + s_f W_0 P)(λI + Σ_i C_i + s_f P)⁻¹,   C_i = Σ_{c∈E_i} c cᵀ
W the original weight W_0, W_r the refined one, ΔW_i concept i's LoRA. The preserve term's targets are the original
model's outputs, so its statistics Σ W_0 p pᵀ = W_0·P need only the d x d matrix P: that is what is cached (on disk,
keyed by the text encoder and the prompts' token ids). Sums and solves run in float64 (fp32 on MPS).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_write
from ..conditioning import context_dim, encode_ids, token_rows
from ..delta import fingerprint
from ..text import check_fits
from .uce import statistics_dtype

CACHE_VERSION = "mace-preserve-1"

# The released prompt augmentation (src/cfr_utils.py:257-331, `prompt_augmentation`): with prompt_len 30 and
# aug_length 30 (every config) the dataset samples all of the first 30 (src/dataset.py:145-147).
OBJECT_TEMPLATES = (
    "{concept} in a photo", "{concept} in a snapshot", "A snapshot of {concept}", "A photograph showcasing {concept}",
    "An illustration of {concept}", "A digital rendering of {concept}", "A visual representation of {concept}",
    "A graphic of {concept}", "A shot of {concept}", "A photo of {concept}", "A black and white image of {concept}",
    "A depiction in portrait form of {concept}", "A scene depicting {concept} during a public gathering",
    "{concept} captured in an image", "A depiction created with oil paints capturing {concept}",
    "An image of {concept}", "A drawing capturing the essence of {concept}",
    "An official photograph featuring {concept}",
    "A detailed sketch of {concept}", "{concept} during sunset/sunrise", "{concept} in a detailed portrait",
    "An official photo of {concept}", "Historic photo of {concept}", "Detailed portrait of {concept}",
    "A painting of {concept}", "HD picture of {concept}", "Magazine cover capturing {concept}",
    "Painting-like image of {concept}", "Hand-drawn art of {concept}", "An oil portrait of {concept}",
)  # fmt: skip
STYLE_TEMPLATES = (
    "An artwork by {concept}", "Art piece by {concept}", "A recent creation by {concept}", "{concept}'s renowned art",
    "Latest masterpiece by {concept}", "A stunning image by {concept}", "An art in {concept}'s style",
    "Exhibition artwork of {concept}", "Art display by {concept}", "a beautiful painting by {concept}",
    "An image inspired by {concept}'s style", "A sketch by {concept}", "Art piece representing {concept}",
    "A drawing by {concept}", "Artistry showcasing {concept}", "An illustration by {concept}",
    "A digital art by {concept}", "A visual art by {concept}",
    "A reproduction inspired by {concept}'s colorful, expressive style", "Famous painting of {concept}",
    "A famous art by {concept}", "Artistic style of {concept}", "{concept}'s famous piece",
    "Abstract work of {concept}", "{concept}'s famous drawing", "Art from {concept}'s early period",
    "A portrait by {concept}", "An imitation reflecting the style of {concept}",
    "An painting from {concept}'s collection", "Vibrant reproduction of artwork by {concept}",
)  # fmt: skip


def importance_weights(steps: int) -> torch.Tensor:
    """p(t) ∝ σ(0.05(t − 200)) − σ(0.05(t − 400)) over t = 0..steps−1 (src/cfr_utils.py:207-209)."""
    t = torch.arange(steps, dtype=torch.float64)
    weights = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return weights / weights.sum()


def aligned_positions(old_ids: Sequence[int], new_ids: Sequence[int], length: int) -> tuple[list[int], list[int]]:
    """The words around the target: positions of the erased prompt (`old_ids`, BOS..EOS unpadded) and of its mapped
    prompt (`new_ids`) that the refinement pairs up. The common prefix and the common suffix (the words before and
    after the concept, EOS included) of the two, then the padding up to `length`, the longer prompt's tail cut so
    both lists have the same length (MACE src/cfr_utils.py:10-30 and :104-113). The concept's own tokens are left
    to the LoRA stage."""
    start = 0
    for a, b in zip(old_ids, new_ids):
        if a != b:
            break
        start += 1
    end_old, end_new = len(old_ids) - 1, len(new_ids) - 1
    while end_old >= start and end_new >= start and old_ids[end_old] == new_ids[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old = list(range(start)) + list(range(end_old + 1, len(old_ids)))
    new = list(range(start)) + list(range(end_new + 1, len(new_ids)))
    shift = old[-1] - new[-1]  # how much longer the erased prompt's kept part reaches
    old += range(old[-1] + 1, length - max(0, -shift))
    new += range(new[-1] + 1, length - max(0, shift))
    return old, new


def _ids(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Padded ids (B, T) and the unpadded ids of each prompt; a prompt longer than the tokenizer's limit is an error."""
    for prompt in prompts:
        check_fits(tokenizer, prompt)
    length = tokenizer.model_max_length
    padded = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return padded.input_ids, tokenizer(list(prompts)).input_ids


@torch.no_grad()
def _encode(pipe, ids: torch.Tensor) -> torch.Tensor:
    device = next(pipe.text_encoder.parameters()).device
    return token_rows(encode_ids(pipe, ids), pipe.unet).to(statistics_dtype(device))


def refinement_statistics(pipe, pairs: Sequence[tuple[str, str]], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, S) = (Σ c_old c_oldᵀ, Σ c_new c_oldᵀ) over the aligned positions of every (erased, mapped) prompt pair."""
    dim = context_dim(pipe)
    device = next(pipe.text_encoder.parameters()).device
    erase = torch.zeros(dim, dim, dtype=statistics_dtype(device), device=device)
    shift = erase.clone()
    length = pipe.tokenizer.model_max_length
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        padded, raw = _ids(pipe.tokenizer, [p for pair in chunk for p in pair])
        emb = _encode(pipe, padded)
        for k in range(len(chunk)):
            old, new = aligned_positions(raw[2 * k], raw[2 * k + 1], length)
            c_old, c_new = emb[2 * k, old], emb[2 * k + 1, new]
            erase += c_old.T @ c_old
            shift += c_new.T @ c_old
    return erase, shift


def gram(pipe, prompts: Sequence[str], batch: int) -> torch.Tensor:
    """Σ x xᵀ over every token vector (BOS, words, EOS, padding) of every prompt (the code's all_words=True)."""
    dim = context_dim(pipe)
    device = next(pipe.text_encoder.parameters()).device
    total = torch.zeros(dim, dim, dtype=statistics_dtype(device), device=device)
    for start in range(0, len(prompts), batch):
        emb = _encode(pipe, _ids(pipe.tokenizer, prompts[start : start + batch])[0])
        flat = emb.reshape(-1, dim)
        total += flat.T @ flat
    return total


def preserve_gram(pipe, prompts: Sequence[str], batch: int, cache: Path | None) -> torch.Tensor:
    """`gram` of the preserve prompts, read from `cache` (a folder) when computed before for the same text encoder
    and token ids, else computed and stored there (the released code's pre-cached COCO statistics, src/cache_coco.py,
    hold the same sums per layer)."""
    if not prompts:
        dim = context_dim(pipe)
        device = next(pipe.text_encoder.parameters()).device
        return torch.zeros(dim, dim, dtype=statistics_dtype(device), device=device)
    if cache is None:
        return gram(pipe, prompts, batch)
    digest = hashlib.sha256(f"{CACHE_VERSION}:{fingerprint(pipe, ('text_encoder', 'text_encoder_2'))}".encode())
    for prompt in prompts:
        digest.update(torch.tensor(pipe.tokenizer(prompt).input_ids).numpy().tobytes() + b"|")
    path = cache / f"preserve-{digest.hexdigest()[:24]}.pt"
    device = next(pipe.text_encoder.parameters()).device
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["gram"].to(device)
    total = gram(pipe, prompts, batch)
    atomic_write(path, lambda tmp: torch.save({"gram": total.cpu(), "prompts": len(prompts)}, tmp))
    return total


def _check_solvable(system: torch.Tensor, lam: float, what: str) -> None:
    if lam > 0:
        return
    rank = int(torch.linalg.matrix_rank(system))
    if rank < system.shape[0]:
        raise ValueError(f"{what}: with λ=0 the system is singular (its token vectors span {rank} of "
                         f"{system.shape[0]} dimensions); use a λ > 0 or give more preserve prompts")  # fmt: skip


def refinement_matrix(erase: torch.Tensor, shift: torch.Tensor, preserve: torch.Tensor, lam: float, scale: float):
    """K (d x d) with W' = W·K for every K/V matrix: K = (λI + S + sP)(λI + E + sP)⁻¹, one solve for all layers."""
    eye = torch.eye(erase.shape[0], dtype=erase.dtype, device=erase.device)
    system = lam * eye + erase + scale * preserve  # symmetric
    _check_solvable(system, lam, "MACE refinement")
    rhs = lam * eye + shift + scale * preserve
    return torch.linalg.solve(system, rhs.T).T  # A·B⁻¹ = (B⁻¹Aᵀ)ᵀ, B symmetric


class Fusion:
    """The fusion's shared left-hand side D = λI + Σ_i C_i + s_f P, factorised once; `fuse` solves each layer."""

    def __init__(self, grams: Sequence[torch.Tensor], preserve: torch.Tensor, lam: float, scale: float):
        self.grams, self.preserve, self.lam, self.scale = list(grams), preserve, lam, scale
        eye = torch.eye(preserve.shape[0], dtype=preserve.dtype, device=preserve.device)
        self.total = sum(self.grams, torch.zeros_like(preserve))
        system = lam * eye + self.total + scale * preserve
        _check_solvable(system, lam, "MACE fusion")
        self.lu = torch.linalg.lu_factor(system)

    def fuse(self, refined: torch.Tensor, original: torch.Tensor, loras: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        """W' for one layer from W_r (`refined`), W_0 (`original`) and each concept's LoRA as (up·scale, down),
        ΔW_i = up_i down_i, in the statistics dtype and device."""
        numerator = self.lam * refined + refined @ self.total + self.scale * (original @ self.preserve)
        for (up, down), c in zip(loras, self.grams, strict=True):
            numerator = numerator + up @ (down @ c)  # ΔW_i C_i without forming ΔW_i
        return torch.linalg.lu_solve(*self.lu, numerator.T, left=True, adjoint=True).T  # N·D⁻¹, D symmetric


def square_side(queries: int) -> int:
    side = math.isqrt(queries)
    if side * side != queries:
        raise ValueError(f"MACE's masks need square attention maps; a layer has {queries} queries")
    return side


def layer_inside(mask: torch.Tensor, queries: int, threshold: float = 0.5) -> torch.Tensor:
    """Which of a layer's `queries` (a square map, row-major) lie inside `mask` (H, W in [0, 1]): the mask resized
    to the map by nearest neighbour and thresholded (`> threshold`, the code's 0.5: src/cfr_utils.py:225-233)."""
    side = square_side(queries)
    resized = F.interpolate(mask[None, None].float(), size=(side, side), mode="nearest")
    return (resized > threshold).reshape(-1)


def masked_attention_loss(
    maps: dict[str, torch.Tensor], inside: Callable[[int], torch.Tensor | None], positions: Sequence[int]
) -> torch.Tensor:
    """Σ_l ‖A_l[:, inside_l, positions]‖_F for one sample's maps {layer: (heads, Q, K)}: the attention the queries
    inside the concept's mask pay to its token positions, one Frobenius norm per layer, summed (the code's
    AttnController.loss, src/cfr_utils.py:217-249). `inside(Q)` is a (Q,) bool mask, or None for every query (a
    style: the whole image)."""
    if not maps:
        raise ValueError("no cross-attention maps were captured")
    total = None
    for a in maps.values():
        index = torch.as_tensor(list(positions), device=a.device)
        chosen = a.index_select(-1, index)
        rows = inside(a.shape[-2])
        if rows is not None:
            chosen = chosen[:, rows.to(a.device)]
        norm = chosen.float().pow(2).sum().sqrt()
        total = norm if total is None else total + norm
    return total


def attention_mask(maps: dict[str, torch.Tensor], positions: Sequence[int], size: int, threshold: float):
    """A mask (size, size) in {0, 1} from one sample's maps {layer: (heads, Q, K)}: the attention to the concept's
    `positions`, averaged over heads, upsampled (bilinear) to `size`, averaged over layers, scaled to [0, 1] by its
    minimum and maximum, then `> threshold`. Ours, for images without a segmentation mask (the paper uses
    Grounded-SAM's)."""
    index = torch.as_tensor(list(positions))
    layers = []
    for a in maps.values():
        heat = a.float().mean(0)[:, index.to(a.device)].sum(-1)  # (Q,)
        side = square_side(heat.numel())
        grid = heat.reshape(1, 1, side, side)
        layers.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0].cpu())
    heat = torch.stack(layers).mean(0)
    low, high = heat.min(), heat.max()
    if high <= low:
        return torch.ones(size, size)
    return ((heat - low) / (high - low) > threshold).float()
