"""The UnlearnCanvas metrics: UA / IRA / CRA, FID, time / memory / storage, and their mean over targets.

A functional core on plain tensors and arrays (fractions in [0, 1]), `torchmetrics.Metric` classes that accumulate
it batch by batch (and across processes), and the row / table builders that turn fractions into the paper's
percentages. Definitions follow the reference exactly (docs: shared/reference/unlearncanvas.md, "The 7 metrics").
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from canvas.catalog import Catalog
from erase.atomic import atomic_write

Kind = Literal["style", "object"]
KINDS: tuple[Kind, ...] = ("style", "object")
BYTES_PER_GB = 1e9  # decimal gigabytes; the paper's GB column does not say which, and 1e9 is what disks report
ROW_KEYS = ("method", "target", "kind", "UA", "IRA", "CRA", "FID", "time_s", "memory_gb", "storage_gb")
TABLE_KEYS = (
    "method", "style_UA", "style_IRA", "style_CRA", "object_UA", "object_IRA", "object_CRA",
    "FID", "time_s", "memory_gb", "storage_gb", "n_style", "n_object",
)  # fmt: skip
KeepFn = Callable[[str, str], bool]  # (theme, object) -> keep this image?


# ---------------------------------------------------------------------------------------------------- accuracies


def as_labels(preds: Tensor) -> Tensor:
    """Predicted labels from labels (N,) or logits / probabilities (N, C)."""
    preds = torch.as_tensor(preds)
    if preds.ndim == 2:
        return preds.argmax(dim=1)
    if preds.ndim != 1 or preds.is_floating_point():
        raise ValueError(
            f"predictions must be integer labels (N,) or scores (N, C), got {preds.dtype} {tuple(preds.shape)}"
        )
    return preds


def class_counts(preds: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per true class: (number predicted correctly, number of samples), as int64 tensors of length `num_classes`."""
    preds, target = as_labels(preds).long(), torch.as_tensor(target).long()
    if preds.shape != target.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {target.shape[0]} true labels; they must pair up")
    bad = target[(target < 0) | (target >= num_classes)]
    if bad.numel():
        raise ValueError(f"true labels {sorted(set(bad.tolist()))} outside 0..{num_classes - 1}")
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[preds == target], minlength=num_classes)
    return correct, total


def class_accuracy(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Accuracy per true class (float64); NaN for a class with no samples, so a gap is never read as 0 or 1."""
    correct, total = class_counts(preds, target, num_classes)
    return _ratio(correct, total)


def _ratio(correct: Tensor, total: Tensor) -> Tensor:
    total = total.to(torch.float64)
    return torch.where(total > 0, correct.to(torch.float64) / total.clamp(min=1), torch.full_like(total, math.nan))


def true_labels(catalog: Catalog, themes: Sequence[str], objects: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(style labels, object labels) of images named by theme and object, in the classifiers' label order."""
    return (
        torch.tensor([catalog.style_label(t) for t in themes], dtype=torch.long),
        torch.tensor([catalog.object_label(o) for o in objects], dtype=torch.long),
    )


# ---------------------------------------------------------------------------------------------------- UA / IRA / CRA


@dataclass(frozen=True)
class UnlearningScores:
    """UA, IRA, CRA of one target as fractions; `percent()` gives the paper's numbers."""

    target: str
    kind: Kind
    ua: float
    ira: float
    cra: float
    ira_terms: int  # classes averaged into IRA: 49 for a style and 19 for an object target in UnlearnCanvas-50
    cra_terms: int

    def percent(self) -> dict[str, float]:
        return {"UA": 100.0 * self.ua, "IRA": 100.0 * self.ira, "CRA": 100.0 * self.cra}


def target_kind(catalog: Catalog, target: str) -> Kind:
    """`style` for a benchmark style, `object` for an object; the photo class is not an unlearning target."""
    if catalog.is_style(target):
        return "style"
    if catalog.is_object(target):
        return "object"
    hint = " (the photo class is not a benchmark style)" if target == catalog.photo else ""
    raise ValueError(f"{target!r} is neither a style nor an object of catalog {catalog.name!r}{hint}")


def unlearning_scores(
    style_accuracy: Tensor | Sequence[float],
    object_accuracy: Tensor | Sequence[float],
    catalog: Catalog,
    target: str,
) -> UnlearningScores:
    """UA / IRA / CRA of `target` from per-class accuracies over the answer set.

    `style_accuracy[i]` is Acc_S of theme `catalog.themes[i]` (photo class included, as the classifier's head is);
    `object_accuracy[j]` is Acc_O of `catalog.objects[j]`, counted over ALL themes' images, the unlearned style
    included, as UnlearnCanvas does; so erasing a style can lower CRA through its own images' objects.

    Style target c: UA = 1 - Acc_S(c); IRA = mean Acc_S over the benchmark styles except c (photo excluded);
    CRA = mean Acc_O over all objects. Object target c: UA = 1 - Acc_O(c); IRA = mean Acc_O over the other objects;
    CRA = mean Acc_S over the benchmark styles (photo excluded).
    """
    acc_s = _accuracy_vector(style_accuracy, len(catalog.themes), "style", catalog.themes)
    acc_o = _accuracy_vector(object_accuracy, len(catalog.objects), "object", catalog.objects)
    styles = [catalog.style_label(s) for s in catalog.styles]  # S50: photo class left out
    objects = list(range(len(catalog.objects)))
    kind = target_kind(catalog, target)
    if kind == "style":
        own, acc_own = catalog.style_label(target), acc_s
        in_domain, in_acc, cross, cross_acc = [i for i in styles if i != own], acc_s, objects, acc_o
        names_in, names_cross = catalog.themes, catalog.objects
    else:
        own, acc_own = catalog.object_label(target), acc_o
        in_domain, in_acc, cross, cross_acc = [j for j in objects if j != own], acc_o, styles, acc_s
        names_in, names_cross = catalog.objects, catalog.themes
    _require_measured(acc_own, [own], names_in, "the target")
    _require_measured(in_acc, in_domain, names_in, "IRA")
    _require_measured(cross_acc, cross, names_cross, "CRA")
    return UnlearningScores(
        target=target,
        kind=kind,
        ua=1.0 - float(acc_own[own]),
        ira=float(in_acc[in_domain].mean()),
        cra=float(cross_acc[cross].mean()),
        ira_terms=len(in_domain),
        cra_terms=len(cross),
    )


def _accuracy_vector(values: Any, n: int, what: str, names: Sequence[str]) -> Tensor:
    acc = torch.as_tensor(values, dtype=torch.float64).flatten()
    if acc.numel() != n:
        raise ValueError(
            f"{acc.numel()} {what} accuracies given; catalog has {n} classes ({', '.join(names[:3])}, ...)"
        )
    return acc


def _require_measured(acc: Tensor, idx: list[int], names: Sequence[str], role: str) -> None:
    gaps = [names[i] for i in idx if math.isnan(float(acc[i]))]
    if gaps:
        raise ValueError(f"no answer-set images for {', '.join(gaps)}, needed for {role}; is the answer set complete?")


# ---------------------------------------------------------------------------------------------------- Metric classes


class ClassAccuracy(Metric):
    """Accuracy per true class, accumulated over batches; NaN for classes never seen."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        correct, total = class_counts(preds, target, self.num_classes)
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        return _ratio(self.correct, self.total)


class UnlearningAccuracy(Metric):
    """UA / IRA / CRA of one unlearning target over an answer set, fed batch by batch.

    `update(style_preds, object_preds, themes, objects)`: classifier outputs (labels or logits) and the true labels
    (`true_labels` maps names to them). `compute()` returns fractions {"UA", "IRA", "CRA"}; `scores()` the full
    `UnlearningScores`; `style_accuracy()` / `object_accuracy()` the per-class tables.
    """

    full_state_update = False

    def __init__(self, catalog: Catalog, target: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        target_kind(catalog, target)  # fail at construction, not after an hour of generation
        self.catalog, self.target = catalog, target
        for name, n in (("style", len(catalog.themes)), ("object", len(catalog.objects))):
            self.add_state(f"{name}_correct", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{name}_total", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, style_preds: Tensor, object_preds: Tensor, themes: Tensor, objects: Tensor) -> None:
        correct, total = class_counts(style_preds, themes, len(self.catalog.themes))
        self.style_correct += correct.to(self.style_correct.device)
        self.style_total += total.to(self.style_total.device)
        correct, total = class_counts(object_preds, objects, len(self.catalog.objects))
        self.object_correct += correct.to(self.object_correct.device)
        self.object_total += total.to(self.object_total.device)

    def style_accuracy(self) -> Tensor:
        """Acc_S per theme, in the style classifier's label order (photo class included)."""
        return _ratio(self.style_correct, self.style_total)

    def object_accuracy(self) -> Tensor:
        """Acc_O per object over all themes' images, the unlearned style's included."""
        return _ratio(self.object_correct, self.object_total)

    def scores(self) -> UnlearningScores:
        return unlearning_scores(self.style_accuracy(), self.object_accuracy(), self.catalog, self.target)

    def compute(self) -> dict[str, Tensor]:
        s = self.scores()
        return {
            name: torch.tensor(v, dtype=torch.float64) for name, v in (("UA", s.ua), ("IRA", s.ira), ("CRA", s.cra))
        }


# ---------------------------------------------------------------------------------------------------- FID


@dataclass
class FeatureStats:
    """Mean and covariance of feature vectors, built in chunks (Chan's parallel update, float64) and cacheable.

    Merging two stats is exact, so real-image statistics are computed once, saved with `save`, and reused by every
    job; `meta` records what they describe (extractor, catalog, indices, filter) so a stale cache is detected.
    """

    count: int
    mean: np.ndarray  # (d,) float64
    scatter: np.ndarray  # (d, d) float64: sum of outer products of deviations from the mean
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, dim: int, meta: Mapping[str, str] | None = None) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)), dict(meta or {}))

    @classmethod
    def from_features(
        cls, features: Tensor | np.ndarray, keep: Sequence[bool] | np.ndarray | None = None
    ) -> FeatureStats:
        x = _features(features)
        return cls.empty(x.shape[1]).update(x, keep)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (the n - 1 denominator, as the reference FID implementations use)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.scatter / (self.count - 1)

    def update(self, features: Tensor | np.ndarray, keep: Sequence[bool] | np.ndarray | None = None) -> FeatureStats:
        """Add a chunk (N, d); `keep` (N,) bool selects rows, e.g. to leave the unlearning target out."""
        x = _features(features)
        if keep is not None:
            mask = np.asarray(keep, dtype=bool)
            if mask.shape != (x.shape[0],):
                raise ValueError(f"keep mask of shape {mask.shape} for {x.shape[0]} feature rows")
            x = x[mask]
        if x.shape[1] != self.dim:
            raise ValueError(f"features of dimension {x.shape[1]} added to statistics of dimension {self.dim}")
        if x.shape[0]:
            mean = x.mean(axis=0)
            centred = x - mean
            self._merge_in(x.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of both sets together (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        out = FeatureStats(self.count, self.mean.copy(), self.scatter.copy(), dict(self.meta))
        out._merge_in(other.count, other.mean, other.scatter)
        return out

    def _merge_in(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz (no pickled objects) atomically."""
        arrays = {
            "count": np.array(self.count, dtype=np.int64),
            "mean": self.mean,
            "scatter": self.scatter,
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        return _save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        with np.load(Path(path), allow_pickle=False) as z:
            missing = {"count", "mean", "scatter", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStats file: missing {sorted(missing)}")
            return cls(
                int(z["count"]),
                z["mean"].astype(np.float64),
                z["scatter"].astype(np.float64),
                json.loads(str(z["meta"])),
            )

    @classmethod
    def cached(
        cls, path: str | os.PathLike[str], meta: Mapping[str, str], compute: Callable[[], FeatureStats]
    ) -> FeatureStats:
        """Load `path` if it was saved with exactly `meta`, else `compute()`, save and return (the real-set cache)."""
        path, meta = Path(path), {str(k): str(v) for k, v in meta.items()}
        if path.exists():
            stats = cls.load(path)
            if stats.meta == meta:
                return stats
        stats = compute()
        stats.meta = meta
        stats.save(path)
        return stats


def _features(features: Tensor | np.ndarray) -> np.ndarray:
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a matrix (N, d), got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S2^(1/2) S1 S2^(1/2), a symmetric PSD matrix
    with the same spectrum; symmetric eigendecompositions (eigh) keep it real and stable even for the singular
    covariances that fewer samples than dimensions give, where a general sqrtm returns complex noise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = _symmetric(sigma1), _symmetric(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root2 = _psd_sqrt(s2)
    inner = np.linalg.eigvalsh(_symmetric(root2 @ s1 @ root2))
    trace_sqrt = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def _symmetric(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return (m + m.T) / 2.0


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(m)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def fid(generated: FeatureStats, real: FeatureStats) -> float:
    """FID between two feature statistics (same extractor, same dimension)."""
    return frechet_distance(generated.mean, generated.cov, real.mean, real.cov)


def fid_from_features(generated: Tensor | np.ndarray, real: Tensor | np.ndarray) -> float:
    return fid(FeatureStats.from_features(generated), FeatureStats.from_features(real))


def exclude_target(catalog: Catalog, target: str) -> KeepFn:
    """A `keep(theme, object)` filter dropping every image of `target` (its theme, or its object in all themes).

    UnlearnCanvas's FID example keeps the target in; pass this filter to both sets to leave it out, and say which
    was used (the bench records it in the report).
    """
    kind = target_kind(catalog, target)
    if kind == "style":
        return lambda theme, obj: theme != target
    return lambda theme, obj: obj != target


def keep_mask(keep: KeepFn | None, themes: Sequence[str], objects: Sequence[str]) -> np.ndarray | None:
    """The boolean row mask of a `keep` filter over images named by theme and object (None: keep all)."""
    if keep is None:
        return None
    if len(themes) != len(objects):
        raise ValueError(f"{len(themes)} themes for {len(objects)} objects; each image needs both")
    return np.array([bool(keep(t, o)) for t, o in zip(themes, objects)], dtype=bool)


@dataclass
class FeatureBank:
    """Features of named images (rows: theme, object), saved once so any filter's statistics cost no extractor run.

    5,100 Inception features take 42 MB in float32, far less than per-filter covariance caches (32 MB each).
    """

    features: np.ndarray  # (N, d) float32
    themes: np.ndarray  # (N,) str
    objects: np.ndarray  # (N,) str
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = _features(self.features).astype(np.float32)
        self.themes, self.objects = np.asarray(self.themes, dtype=str), np.asarray(self.objects, dtype=str)
        n = self.features.shape[0]
        if self.themes.shape != (n,) or self.objects.shape != (n,):
            raise ValueError(
                f"{n} feature rows need {n} themes and objects, got {self.themes.shape}, {self.objects.shape}"
            )

    def stats(self, keep: KeepFn | None = None) -> FeatureStats:
        mask = keep_mask(keep, list(self.themes), list(self.objects))
        return FeatureStats.empty(self.features.shape[1], self.meta).update(self.features, mask)

    def save(self, path: str | os.PathLike[str]) -> Path:
        arrays = {
            "features": self.features,
            "themes": self.themes,
            "objects": self.objects,
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        return _save_npz(path, arrays)

    @classmethod
    def cached(
        cls, path: str | os.PathLike[str], meta: Mapping[str, str], compute: Callable[[], FeatureBank]
    ) -> FeatureBank:
        """Load `path` if saved with exactly `meta`, else `compute()`, save and return: real features extracted once."""
        path, meta = Path(path), {str(k): str(v) for k, v in meta.items()}
        if path.exists():
            bank = cls.load(path)
            if bank.meta == meta:
                return bank
        bank = compute()
        bank.meta = meta
        bank.save(path)
        return bank

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureBank:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(z["features"], z["themes"], z["objects"], json.loads(str(z["meta"])))


class FrechetDistance(Metric):
    """FID from features fed batch by batch; real statistics can come from a cache (`reference`).

    `update(features, real, themes=None, objects=None)`: with a `keep` filter (e.g. `exclude_target`), each row's
    theme and object must be given and rows the filter rejects are ignored. States are float64 sums, so chunking and
    multi-process reduction give the same result.
    """

    full_state_update = False

    def __init__(self, dim: int, keep: KeepFn | None = None, reference: FeatureStats | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if reference is not None and reference.dim != dim:
            raise ValueError(f"reference statistics have dimension {reference.dim}, expected {dim}")
        self.dim, self.keep, self.reference = dim, keep, reference
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, features: Tensor, real: bool, themes: Sequence[str] | None = None, objects: Sequence[str] | None = None
    ) -> None:
        if real and self.reference is not None:
            raise ValueError("real statistics come from `reference`; do not also add real features")
        x = torch.as_tensor(features).to(dtype=torch.float64, device=self.real_sum.device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(x.shape)}")
        if self.keep is not None:
            if themes is None or objects is None:
                raise ValueError("a `keep` filter is set: pass the theme and object of every feature row")
            x = x[torch.from_numpy(keep_mask(self.keep, themes, objects)).to(x.device)]
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + x.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + x.T @ x)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + x.shape[0])

    def _stats(self, side: str) -> FeatureStats:
        n = int(getattr(self, f"{side}_count").item())
        total = getattr(self, f"{side}_sum").cpu().numpy()
        mean = total / max(n, 1)
        scatter = getattr(self, f"{side}_outer").cpu().numpy() - n * np.outer(mean, mean)
        return FeatureStats(n, mean, scatter)

    def generated_stats(self) -> FeatureStats:
        return self._stats("fake")

    def real_stats(self) -> FeatureStats:
        return self.reference if self.reference is not None else self._stats("real")

    def compute(self) -> Tensor:
        return torch.tensor(fid(self.generated_stats(), self.real_stats()), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- efficiency


@dataclass(frozen=True)
class Efficiency:
    """Cost of one unlearning request: wall seconds, peak accelerator memory and storage, in decimal GB (1e9 B)."""

    time_s: float | None
    memory_gb: float | None
    storage_gb: float | None
    memory_kind: str | None = None  # e.g. "cuda_max_allocated" or "peak_rss": CPU figures are not GPU figures


def efficiency(record: Mapping[str, Any] | Any) -> Efficiency:
    """Read time / memory / storage from an erasure record (`wall_time_s`, `peak_memory_bytes`, `storage_bytes`).

    A missing or None value stays None (shown as "-"), e.g. peak memory on a CPU run; a negative or non-numeric one is
    an error. Accepts a mapping, a dataclass, or any object with those attributes.
    """
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    get = record.get if isinstance(record, Mapping) else (lambda k: getattr(record, k, None))
    time_s = _non_negative(get("wall_time_s"), "wall_time_s")
    memory = _non_negative(get("peak_memory_bytes"), "peak_memory_bytes")
    storage = _non_negative(get("storage_bytes"), "storage_bytes")
    kind = get("memory_kind")
    return Efficiency(
        time_s=time_s,
        memory_gb=None if memory is None else memory / BYTES_PER_GB,
        storage_gb=None if storage is None else storage / BYTES_PER_GB,
        memory_kind=str(kind) if kind else None,
    )


def storage_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes one unlearning request must keep: a file's size, or the sum over a folder (e.g. a saved Delta)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    raise FileNotFoundError(f"no file or folder {path} to measure")


def _non_negative(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"record field {name!r} is {value!r}; accepted: a non-negative finite number or None")
    return float(value)


# ---------------------------------------------------------------------------------------------------- rows and table


def target_row(
    method: str,
    scores: UnlearningScores,
    fid_value: float | None = None,
    cost: Efficiency | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One per-target row of the report: UA / IRA / CRA in percent (the core keeps fractions), FID, cost.

    `memory_kind` is added when the record says how memory was measured, since CPU peak RSS and GPU peak allocation
    are not comparable."""
    cost = cost or Efficiency(None, None, None)
    row = {"method": method, "target": scores.target, "kind": scores.kind, **scores.percent()}
    row.update(FID=fid_value, time_s=cost.time_s, memory_gb=cost.memory_gb, storage_gb=cost.storage_gb)
    if cost.memory_kind:
        row["memory_kind"] = cost.memory_kind
    clash = sorted(set(extra) & set(row))
    if clash:
        raise ValueError(f"extra row fields {clash} would overwrite metric columns")
    return {**row, **extra}


def check_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as plain dicts after checking each has the report keys, a known kind and numeric (or None) values."""
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} ({row.get('method')!r}, {row.get('target')!r}) lacks {missing}")
        if row["kind"] not in KINDS:
            raise ValueError(f"row {i} has kind {row['kind']!r}; accepted: {', '.join(KINDS)}")
        clean = dict(row)
        for key in ROW_KEYS[3:]:
            value = row[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"row {i} field {key!r} is {value!r}; accepted: a number or None")
            clean[key] = None if value is None else float(value)  # numpy / torch scalars become plain floats
        out.append(clean)
    return out


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's table: per method, UA / IRA / CRA averaged over its style targets and over its object targets,
    and FID / time / memory / storage averaged over all its targets. Methods keep their first-appearance order;
    a mean over nothing (no object targets, no FID measured) is None."""
    rows = check_rows(rows)
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"method": method}
        for kind in KINDS:
            of_kind = [r for r in mine if r["kind"] == kind]
            for key in ("UA", "IRA", "CRA"):
                entry[f"{kind}_{key}"] = _mean(r[key] for r in of_kind)
        for key in ("FID", "time_s", "memory_gb", "storage_gb"):
            entry[key] = _mean(r[key] for r in mine)
        entry["n_style"] = sum(r["kind"] == "style" for r in mine)
        entry["n_object"] = sum(r["kind"] == "object" for r in mine)
        table.append(entry)
    return table


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def _save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)
