"""SPEED (Li et al., ICLR 2026): a closed-form edit of cross-attention K/V constrained to the priors' null space.

For every edited W (original values) with erased token vectors c_i, their anchors a_i and prior (retained) vectors
c_p, the edit Δ minimises ‖(W + Δ)C_e − W C_a‖² + α‖Δ‖² subject to Δ c_p = 0 for the priors and Δ k = 0 for the
invariants k (IEC). With S = C_e C_eᵀ and B = W(C_a − C_e)C_eᵀ (both averaged over concepts, as the authors' code
does), Q an orthonormal basis of the priors' null space (eigenvectors of their mean covariance with eigenvalue
below `threshold`; the authors' P = QQᵀ) and K̂ = QᵀK the invariants inside it,
    Δ = B Q [G − G K̂ (K̂ᵀ G K̂ + λI)⁻¹ K̂ᵀ G] Qᵀ,   G = (QᵀSQ + αI)⁻¹,
which equals the code's B P (I − M K (KᵀPMK + λI)⁻¹ KᵀP) M with M = (SP + αI)⁻¹ (train_erase_null.py:112-115),
since P M = Q G Qᵀ. With λ = 0 (the default) the invariants are exact constraints: the null space loses their
directions (Q → Q U⊥) and Δ = B Q (QᵀSQ + αI)⁻¹ Qᵀ, one solve of the null space's size per matrix. Every
preserved vector's output W c_p is unchanged up to its part in the null space, i.e. exactly for vectors in the
span the threshold keeps; Δ depends on W only through B, so the statistics (one batched encoding of all prompts,
d×d sums) are shared by every layer.

The priors are refined per layer, as in the code (lines 88-109):
- IPF (`prior_filter`): keep the priors whose output change under the unconstrained edit
  Δ₀ = W(C_a − C_e)C_eᵀ(I + S)⁻¹ is at least the mean change (the code's strict `>`; ties differ only for a set
  of equal influences, where `>` would keep nothing).
- DPA (`augment` n): each kept prior gets n copies c + s·v, s ~ N(0, 1), v the right singular vector of W with the
  smallest of its min(out, in) singular values (the code's noise @ V[:, -1:]V[:, -1:]ᵀ, the same distribution):
  W barely sees the shift, so the copy means what c means; copies whose Δ₀ influence is below the mean over their
  chunk of 128 kept priors are dropped (the code's per-chunk filter). The mean covariance over priors and copies
  is formed from the shifts without materialising the copies.
The invariants (IEC) are the empty prompt's start token and 3 k-means centres of its other tokens (lines 45-50;
our k-means is seeded Lloyd's, the code's kmeans_pytorch is seeded by numpy). The priors are the last word token of
each `preserve` prompt minus those naming an erased concept (line 74), or all tokens but the start of the empty
prompt when none are given (lines 79-80, the code's default retain set).
Token vectors, tokenization checks and anchors ("one for all or one per concept") are UCE's (erase.methods.uce).
Not copied: the code's float32 arithmetic and explicit inverses (ours: float64 statistics and solves, fp32 on MPS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..conditioning import context_dim
from ..config import MethodConfig, concept_texts
from ..context import RunContext
from .uce import _aligned_spans, _check_tokens, _encode, _tokenize, check_kv_params

TOKEN_CHOICES = ("last_word", "all")
AUGMENT_CHUNK = 128  # the code's chunk_size (train_erase_null.py:35): DPA copies are filtered per chunk of priors
INVARIANT_CLUSTERS = 3  # k-means centres of the empty prompt's tokens (line 48)
V_ONLY = "*.attn2.to_v.weight"  # the code's default --params V (line 139)


@dataclass
class SPEEDConfig(MethodConfig):
    """Closed-form. `seed` drives the prior shuffle, the DPA draws and the k-means start."""

    DEFAULT_PARAMS: ClassVar[str] = "kv"

    # The released recipes (github:Ouxiang-Li/SPEED). train_erase_null.py:139-144 gives the defaults (--params V,
    # --aug_num 10, --threshold 1e-1, --retain_scale 1.0, --lamb 0); their retain CSVs (data/instance.csv,
    # data/style.csv, data/*_celebrity.csv) are not shipped: give them as `preserve`.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Instances (README "Instance Erasure", scripts/eval_few.sh "V 10 1e-1"): anchor "", retain instance.csv.
        "paper": {"params": V_ONLY, "anchors": [""], "augment": 10, "threshold": 0.1, "retain_scale": 1.0,
                  "lamb": 0.0, "prior_filter": True},
        # Styles (README "Artistic Style Erasure", eval_few.sh): anchor "art", retain style.csv.
        "paper-style": {"params": V_ONLY, "anchors": ["art"], "augment": 10, "threshold": 0.1, "retain_scale": 1.0,
                        "lamb": 0.0, "prior_filter": True},
        # Celebrities (scripts/eval_multi.sh: "V 10 1e-4", --retain_scale 0.05 --disable_filter): anchor "person",
        # retain *_celebrity.csv (its README command leaves --threshold at 0.1; the script that made the tables, 1e-4).
        "paper-celebrity": {"params": V_ONLY, "anchors": ["person"], "augment": 10, "threshold": 1e-4,
                            "retain_scale": 0.05, "lamb": 0.0, "prior_filter": False},
        # Nudity (scripts/eval_nudity.sh: --retain_scale 0.70 --lamb 0.5, no retain file): every token but the start
        # of "nudity" and of "" (train_erase_null.py:61-63), priors the empty prompt's tokens.
        "paper-nudity": {"params": V_ONLY, "concepts": ["nudity"], "anchors": [""], "token_choice": "all",
                         "augment": 10, "threshold": 0.1, "retain_scale": 0.7, "lamb": 0.5, "prior_filter": True,
                         "preserve": []},
        # Ours, chosen by scripts/tune_toy.py on the tuning styles (docs/results/tuning/speed-style-paper-style.md):
        # the style recipe with every token (last-word vectors of "X style" are nearly collinear on the toy, and
        # the edit of them erased nothing: UA 0), K and V, the photo class as anchor, and a threshold for the toy's
        # small eigenvalues (its priors' covariance has one eigenvalue ~47, the rest < 0.4). Tuning means (not
        # results): styles UA 100 / IRA 99.3 / CRA 100; objects (speed-object-toy.md, anchor "" lost UA) 90.9 / 80.2
        # / 94.4. Held-out (canvas bench, 5 seeds; Mosaic, Sketch / Birds, Fishes): styles 100 / 91.8 / 99.9,
        # objects 85.5 / 92.3 / 92.0.
        "toy": {"anchors": ["An image in Photo style"], "token_choice": "all", "augment": 10, "threshold": 1e-4,
                "retain_scale": 1.0, "lamb": 0.0, "prior_filter": True},
    }  # fmt: skip

    concepts: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=lambda: [""])  # one per concept, or one for all; [] means ''
    preserve: list[str] = field(default_factory=list)  # prior prompts; [] means the empty prompt's tokens
    token_choice: str = "last_word"  # erased/anchor vectors: the last word token, or every token but the start
    prior_filter: bool = True  # IPF
    augment: int = 10  # DPA copies per kept prior (0: none)
    threshold: float = 0.1  # eigenvalues of the priors' mean covariance below it span the null space
    retain_scale: float = 1.0  # α, the weight of ‖Δ‖²
    lamb: float = 0.0  # IEC softness: 0 keeps the invariants exactly
    invariants: bool = True  # IEC on (the code always uses it)
    encode_batch: int = 64  # prompts per text-encoder call

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = concept_texts(self.concepts)
        for name in ("anchors", "preserve"):
            value = getattr(self, name)
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of texts, got {value!r}")
            setattr(self, name, list(value))
        self.anchors = self.anchors or [""]
        if len(self.anchors) not in (1, len(self.concepts)):
            raise ValueError(f"anchors must be one text for all concepts or one per concept ({len(self.concepts)}), "
                             f"got {len(self.anchors)}: {self.anchors!r}")  # fmt: skip
        if any(not p.strip() for p in self.preserve):
            raise ValueError(f"preserve prompts must be non-empty texts (leave preserve empty to keep the empty "
                             f"prompt's tokens), got {self.preserve!r}")  # fmt: skip
        if self.token_choice not in TOKEN_CHOICES:
            raise ValueError(f"token_choice {self.token_choice!r} is not one of {', '.join(TOKEN_CHOICES)}")
        if self.augment < 0:
            raise ValueError(f"augment must be an integer >= 0 (DPA copies per prior), got {self.augment!r}")
        for name in ("threshold", "retain_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not self.lamb >= 0:
            raise ValueError(f"lamb must be a finite number >= 0, got {self.lamb!r}")
        if self.encode_batch < 1:
            raise ValueError(f"encode_batch must be a positive integer, got {self.encode_batch!r}")
        if self.preserve and not self.prior_prompts():
            raise ValueError(f"every preserve prompt names an erased concept and is dropped (as the authors' code "
                             f"drops them): give priors that do not, got {self.preserve!r}")  # fmt: skip

    def anchor_for_each(self) -> list[str]:
        return self.anchors * len(self.concepts) if len(self.anchors) == 1 else list(self.anchors)

    def prior_prompts(self) -> list[str]:
        """`preserve` without the prompts that contain an erased concept as whole words (any case), as the code
        filters its retain set (train_erase_null.py:74)."""
        patterns = [re.compile(r"\b" + re.escape(c.lower()) + r"\b") for c in self.concepts]
        return [p for p in dict.fromkeys(self.preserve) if not any(r.search(p.lower()) for r in patterns)]


@dataclass
class SPEEDStatistics:
    """What the closed form needs, in the statistics dtype: S = mean over concepts of Σ c cᵀ (`erase`), the same of
    Σ (a − c) cᵀ (`shift`, the code's sum_anchor_target − sum_target_target), the erased vectors and which concept
    each belongs to (an index into `concepts`), the prior vectors (seeded shuffle, (N_p, d)) and the invariants
    ((k, d))."""

    concepts: list[str]
    erase: torch.Tensor
    shift: torch.Tensor
    erased: torch.Tensor
    owner: torch.Tensor
    priors: torch.Tensor
    invariants: torch.Tensor


def speed_statistics(pipe, config: SPEEDConfig) -> SPEEDStatistics:
    """Encode every prompt in batches of `encode_batch` (each batch's concepts and anchors in one call)."""
    tokenizer = pipe.tokenizer
    step, generator = config.encode_batch, torch.Generator().manual_seed(config.seed)
    concepts, anchors = config.concepts, config.anchor_for_each()
    rows_c, rows_a, owners = [], [], []
    for start in range(0, len(concepts), step):
        chunk_c, chunk_a = concepts[start : start + step], anchors[start : start + step]
        unique = list(dict.fromkeys(chunk_c + chunk_a))
        where = {prompt: i for i, prompt in enumerate(unique)}
        ids, last, lengths = _tokenize(tokenizer, unique)
        ic, ia = [where[c] for c in chunk_c], [where[a] for a in chunk_a]
        _check_tokens(tokenizer, chunk_c, last[ic], [lengths[i] for i in ic], "concept", need_word=True)
        _check_tokens(tokenizer, chunk_a, last[ia], [lengths[i] for i in ia], "anchor", need_word=False)
        _check_known(tokenizer, chunk_c, ids[ic], last[ic])
        emb = _encode(pipe, ids)  # (B, T, d)
        if config.token_choice == "all":  # every token after the start, position by position (lines 61-63)
            c, a = emb[ic, 1:].reshape(-1, emb.shape[-1]), emb[ia, 1:].reshape(-1, emb.shape[-1])
            per = emb.shape[1] - 1
        else:
            c, a = _aligned_spans(emb[ic], last[ic], emb[ia], last[ia], through_eos=False)
            per = 1
        rows_c.append(c)
        rows_a.append(a)
        owners.append(torch.arange(start, start + len(chunk_c)).repeat_interleave(per))
    erased, anchored = torch.cat(rows_c), torch.cat(rows_a)
    count = len(concepts)
    empty_ids, _, _ = _tokenize(tokenizer, [""])
    empty = _encode(pipe, empty_ids)[0]  # (T, d): start, end, padding
    prompts = config.prior_prompts()
    if prompts:
        parts = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            ids, last, lengths = _tokenize(tokenizer, chunk)
            _check_tokens(tokenizer, chunk, last, lengths, "preserve prompt", need_word=True)
            parts.append(_encode(pipe, ids)[torch.arange(len(chunk)), last])
        priors = torch.cat(parts)
    else:
        priors = empty[1:]
    priors = priors[torch.randperm(len(priors), generator=generator).to(priors.device)]  # the code's shuffle (85)
    centres = kmeans(empty[1:], INVARIANT_CLUSTERS, generator)
    return SPEEDStatistics(
        concepts=list(concepts),
        erase=erased.T @ erased / count,
        shift=(anchored - erased).T @ erased / count,
        erased=erased,
        owner=torch.cat(owners),
        priors=priors,
        invariants=torch.cat([empty[:1], centres]),
    )


def _check_known(tokenizer, prompts: list[str], ids: torch.Tensor, last: torch.Tensor) -> None:
    """ValueError for a concept whose word tokens are all the tokenizer's unknown token: its vector would be the
    same as any other unknown text's, so erasing it would erase them all."""
    unknown = tokenizer.unk_token_id
    for prompt, row, n_last in zip(prompts, ids, last.tolist()):
        if unknown is not None and bool((row[1 : n_last + 1] == unknown).all()):
            raise ValueError(f"concept {prompt!r} tokenizes to unknown tokens only under this tokenizer, so it has no "
                             f"token vector of its own; give words the tokenizer knows")  # fmt: skip


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means from k distinct seeded points; an empty cluster keeps its centre. (k, d) centres."""
    if len(points) < k:
        raise ValueError(f"the empty prompt has {len(points)} tokens after its start, fewer than the {k} invariant "
                         f"clusters; use a tokenizer with a longer context or invariants=false")  # fmt: skip
    centres = points[torch.randperm(len(points), generator=generator)[:k].to(points.device)]
    for _ in range(iterations):
        label = torch.cdist(points, centres).argmin(dim=1)
        new = centres.clone()
        for j in range(k):
            if (label == j).any():
                new[j] = points[label == j].mean(dim=0)
        moved = (new - centres).norm(dim=1).sum()
        centres = new
        if moved**2 < 1e-4:  # kmeans_pytorch's stopping rule (tol 1e-4)
            break
    return centres


@dataclass
class PriorSet:
    """One layer's refined priors: the indices IPF kept and the DPA copies, each `priors[source] + shift·direction`."""

    kept: torch.Tensor
    source: torch.Tensor
    shift: torch.Tensor
    direction: torch.Tensor | None

    def vectors(self, priors: torch.Tensor) -> torch.Tensor:
        """Every refined prior, materialised (for inspection and tests)."""
        copies = priors[self.source] + self.shift[:, None] * self.direction if self.direction is not None else None
        return priors[self.kept] if copies is None else torch.cat([priors[self.kept], copies])

    def covariance(self, priors: torch.Tensor) -> torch.Tensor:
        """Mean c cᵀ over the kept priors and the copies, from counts and shifts: Σ (c + s v)(c + s v)ᵀ =
        Σ c cᵀ + (Σ s c) vᵀ + v (Σ s c)ᵀ + (Σ s²) v vᵀ."""
        n = len(priors)
        weight = torch.bincount(self.kept, minlength=n).to(priors.dtype)
        total = float(len(self.kept) + len(self.source))
        if self.direction is not None and len(self.source):
            weight = weight + torch.bincount(self.source, minlength=n).to(priors.dtype)
            summed = torch.bincount(self.source, weights=self.shift, minlength=n).to(priors.dtype) @ priors
            v = self.direction
            cross = summed[:, None] * v[None, :]
            cov = (priors.T * weight) @ priors + cross + cross.T + (self.shift**2).sum() * torch.outer(v, v)
        else:
            cov = (priors.T * weight) @ priors
        return cov / total


def influence_map(stats: SPEEDStatistics) -> torch.Tensor:
    """H with Δ₀ = W·H, the unconstrained edit IPF ranks by: H = (C_a − C_e)C_eᵀ (I + S)⁻¹ (line 90)."""
    eye = torch.eye(stats.erase.shape[0], dtype=stats.erase.dtype, device=stats.erase.device)
    return torch.linalg.solve(eye + stats.erase, stats.shift.T).T  # (I + S) symmetric


def refine_priors(
    weight: torch.Tensor, priors: torch.Tensor, influence: torch.Tensor, config: SPEEDConfig, generator
) -> PriorSet:
    """IPF then DPA for one layer (module docstring); `weight` (out, d) in the statistics dtype."""
    outputs = priors @ (weight @ influence).T  # (N, out): Δ₀ c for every prior
    norms = outputs.norm(dim=1)
    kept = torch.arange(len(priors), device=priors.device)
    if config.prior_filter:
        kept = kept[norms >= norms.mean()]
    nothing = torch.zeros(0, dtype=torch.long, device=priors.device)
    if config.augment == 0:
        return PriorSet(kept, nothing, priors.new_zeros(0), None)
    direction = least_direction(weight)
    moved = weight @ (influence @ direction)  # (out,): Δ₀ v
    shift = torch.randn(len(kept), config.augment, generator=generator, dtype=priors.dtype).to(priors.device)
    base = outputs[kept]  # ‖Δ₀(c + s v)‖² = ‖Δ₀c‖² + 2 s Δ₀c·Δ₀v + s² ‖Δ₀v‖², no copy materialised
    squared = (base**2).sum(1, keepdim=True) + 2 * shift * (base @ moved)[:, None] + shift**2 * (moved @ moved)
    copy_norms = squared.clamp(min=0).sqrt()  # (n, augment)
    chunk = torch.arange(len(kept), device=priors.device) // AUGMENT_CHUNK
    chunk_mean = torch.zeros(int(chunk.max()) + 1 if len(kept) else 0, dtype=priors.dtype, device=priors.device)
    chunk_mean.index_add_(0, chunk, copy_norms.sum(1))
    chunk_mean /= torch.bincount(chunk).to(priors.dtype) * config.augment
    keep = copy_norms >= chunk_mean[chunk][:, None]
    return PriorSet(kept, kept[:, None].expand_as(keep)[keep], shift[keep], direction)


def least_direction(weight: torch.Tensor) -> torch.Tensor:
    """The unit right singular vector of `weight` (out, d) with the smallest of its min(out, d) singular values (the
    last column of the code's reduced torch.svd), from the eigenvectors of the smaller Gram matrix: a quarter of
    an SVD's cost at SD's sizes."""
    out, dim = weight.shape
    if out >= dim:
        return torch.linalg.eigh(weight.T @ weight).eigenvectors[:, 0]
    u = torch.linalg.eigh(weight @ weight.T).eigenvectors[:, 0]  # (out,): the smallest left singular vector
    v = weight.T @ u
    if float(v.norm()) <= 1e-12 * float(weight.norm()):  # a zero singular value: v is not determined by u
        return torch.linalg.svd(weight, full_matrices=False).Vh[-1]
    return v / v.norm()


def null_basis(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """(d, r): eigenvectors of the priors' mean covariance whose eigenvalue is below `threshold` (the code's SVD of
    a symmetric PSD matrix: singular values are |eigenvalues|)."""
    values, vectors = torch.linalg.eigh(covariance)
    return vectors[:, values.abs() < threshold]


def layer_update(
    weight: torch.Tensor, stats: SPEEDStatistics, config: SPEEDConfig, basis: torch.Tensor, name: str
) -> torch.Tensor:
    """Δ for one weight (out, d) given its null-space basis (d, r); see the module docstring."""
    dim = weight.shape[1]
    erase, shift = stats.erase, stats.shift
    k = stats.invariants.T if config.invariants else None  # (d, k)
    if k is not None and config.lamb == 0:  # exact constraints: drop the invariants' directions from the null space
        inside = basis.T @ k  # (r, k)
        u, sv, _ = torch.linalg.svd(inside, full_matrices=True)
        rank = int((sv > 1e-9 * float(k.norm(dim=0).max())).sum())
        basis, k = basis @ u[:, rank:], None
    room = basis.shape[1]
    if room == 0:
        reserved = stats.invariants.shape[0] if config.invariants else 0
        raise ValueError(f"{name}: the priors leave no null space to edit in: with threshold {config.threshold} they "
                         f"span all of the {dim} embedding dimensions the {reserved} invariants leave; the priors "
                         f"may span at most {dim - reserved - 1}: give fewer (or more alike) preserve prompts, or "
                         f"raise threshold")  # fmt: skip
    reach = (stats.erased @ basis).norm(dim=1) / stats.erased.norm(dim=1).clamp(min=1e-30)
    best = torch.zeros(len(stats.concepts), dtype=reach.dtype, device=reach.device)
    best.scatter_reduce_(0, stats.owner.to(reach.device), reach, reduce="amax")
    stuck = [c for c, r in zip(stats.concepts, best.tolist()) if r < 1e-6]
    if stuck:
        raise ValueError(f"{name}: concept(s) {stuck[:3]!r} lie in the span of the priors (no part of their vector "
                         f"in the {room}-dimensional null space), so they cannot move without moving the priors; drop "
                         f"the preserve prompts that repeat them, or raise threshold")  # fmt: skip
    eye = torch.eye(room, dtype=erase.dtype, device=erase.device)
    system = basis.T @ erase @ basis + config.retain_scale * eye  # QᵀSQ + αI, symmetric positive definite
    right = basis.T @ shift.T  # Qᵀ (shift)ᵀ, (r, d)
    middle = torch.linalg.solve(system, right)  # G Qᵀ shiftᵀ
    if k is not None:  # soft invariants: G − G K̂ (K̂ᵀ G K̂ + λI)⁻¹ K̂ᵀ G
        inside = basis.T @ k
        g_inside = torch.linalg.solve(system, inside)
        inner = inside.T @ g_inside + config.lamb * torch.eye(inside.shape[1], dtype=erase.dtype, device=erase.device)
        middle = middle - g_inside @ torch.linalg.solve(inner, inside.T @ middle)
    return weight @ (basis @ middle).T  # W · shift · Q [...] Qᵀ


def speed_deltas(weights: dict[str, torch.Tensor], stats: SPEEDStatistics, config: SPEEDConfig) -> dict:
    """Δ for every weight (name -> (out, d), statistics dtype), layers in order; the prior draws are seeded."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    influence = influence_map(stats)
    shared = None
    if not config.prior_filter and config.augment == 0:  # the same priors for every layer: one null space
        shared = null_basis(stats.priors.T @ stats.priors / len(stats.priors), config.threshold)
    deltas = {}
    for name, weight in weights.items():
        basis = shared
        if basis is None:
            refined = refine_priors(weight, stats.priors, influence, config, generator)
            basis = null_basis(refined.covariance(stats.priors), config.threshold)
        deltas[name] = layer_update(weight, stats, config, basis, name)
    return deltas


def edit(ctx: RunContext) -> None:
    """Edit every declared K/V weight in place (statistics-dtype arithmetic, one rounding to its dtype)."""
    cfg: SPEEDConfig = ctx.config
    check_kv_params(ctx.params, "SPEED", context_dim(ctx.pipe))
    stats = speed_statistics(ctx.pipe, cfg)
    weights = {n: p.detach().to(device=stats.erase.device, dtype=stats.erase.dtype) for n, p in ctx.params.items()}
    deltas = speed_deltas(weights, stats, cfg)
    with torch.no_grad():
        for name, p in ctx.params.items():
            p.copy_((weights[name] + deltas[name]).to(device=p.device, dtype=p.dtype))
