"""FID: the Fréchet distance between feature statistics, the one accumulator of those statistics (`FeatureStats`),
the saved feature bank of the real set (`FeatureBank`), and a thin torchmetrics wrapper (`FrechetDistance`).

Every FID figure the toolkit reports is accumulated by `FeatureStats` (Chan's parallel update in float64): the
metric class keeps its state as packed `FeatureStats` and reduces across processes with `FeatureStats.merge`, so
there is no second implementation of the moments. Which feature space a figure lives in (Inception-v3, or a
classifier's features on the toy) is named by the judge and carried into the report's column name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from canvas.catalog import Catalog
from canvas.metrics import target_kind, targets_of
from erase.atomic import atomic_write

KeepFn = Callable[[str, str], bool]  # (theme, object) -> keep this image?


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

    def pack(self) -> Tensor:
        """One float64 vector [count, mean (d), scatter (d*d)]: a torchmetrics state that reduces as a whole."""
        parts = [np.array([self.count], dtype=np.float64), self.mean, self.scatter.reshape(-1)]
        return torch.from_numpy(np.concatenate(parts))

    @classmethod
    def unpack(cls, packed: Tensor) -> FeatureStats:
        """The inverse of `pack`; the dimension follows from the length 1 + d + d^2."""
        values = packed.detach().cpu().to(torch.float64).numpy()
        dim = math.isqrt(4 * values.size - 3) // 2  # d^2 + d + 1 = n  ->  d = (sqrt(4n - 3) - 1) / 2
        if 1 + dim + dim * dim != values.size:
            raise ValueError(f"{values.size} values are not a packed FeatureStats (1 + d + d^2 for some d)")
        count = values[0]
        if count != int(count) or count < 0:
            raise ValueError(f"packed FeatureStats count {count!r} is not a non-negative integer")
        return cls(int(count), values[1 : 1 + dim].copy(), values[1 + dim :].reshape(dim, dim).copy())

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
        return _cached(cls, path, meta, compute)


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
    kind, dropped = target_kind(catalog, target), set(targets_of(target))  # targets erased together: all of them
    if kind == "style":
        return lambda theme, obj: theme not in dropped
    return lambda theme, obj: obj not in dropped


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
        return _cached(cls, path, meta, compute)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureBank:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(z["features"], z["themes"], z["objects"], json.loads(str(z["meta"])))


def _merge_packed(stacked: Tensor) -> Tensor:
    """torchmetrics' reduction of packed stats gathered from processes (k, 1 + d + d^2): their exact merge."""
    if stacked.ndim == 1:
        return stacked
    merged = FeatureStats.unpack(stacked[0])
    for row in stacked[1:]:
        merged = merged.merge(FeatureStats.unpack(row))
    return merged.pack().to(stacked.device)


class FrechetDistance(Metric):
    """FID from features fed batch by batch; real statistics can come from a cache (`reference`).

    `update(features, real, themes=None, objects=None)`: with a `keep` filter (e.g. `exclude_target`), each row's
    theme and object must be given and rows the filter rejects are ignored. Each side's state is a packed
    `FeatureStats` (see `FeatureStats.pack`) updated by `FeatureStats.update` and reduced across processes by
    `FeatureStats.merge`, so the metric and the cached real statistics share one accumulator.
    """

    full_state_update = False

    def __init__(self, dim: int, keep: KeepFn | None = None, reference: FeatureStats | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if reference is not None and reference.dim != dim:
            raise ValueError(f"reference statistics have dimension {reference.dim}, expected {dim}")
        self.dim, self.keep, self.reference = dim, keep, reference
        for side in ("real", "fake"):
            self.add_state(side, FeatureStats.empty(dim).pack(), dist_reduce_fx=_merge_packed)

    def update(
        self, features: Tensor, real: bool, themes: Sequence[str] | None = None, objects: Sequence[str] | None = None
    ) -> None:
        if real and self.reference is not None:
            raise ValueError("real statistics come from `reference`; do not also add real features")
        x = torch.as_tensor(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(x.shape)}")
        mask = None
        if self.keep is not None:
            if themes is None or objects is None:
                raise ValueError("a `keep` filter is set: pass the theme and object of every feature row")
            mask = keep_mask(self.keep, themes, objects)
        side = "real" if real else "fake"
        state = getattr(self, side)
        setattr(self, side, FeatureStats.unpack(state).update(x, mask).pack().to(state.device))

    def generated_stats(self) -> FeatureStats:
        return FeatureStats.unpack(self.fake)

    def real_stats(self) -> FeatureStats:
        return self.reference if self.reference is not None else FeatureStats.unpack(self.real)

    def compute(self) -> Tensor:
        return torch.tensor(fid(self.generated_stats(), self.real_stats()), dtype=torch.float64)


def _save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _cached(cls, path: str | os.PathLike[str], meta: Mapping[str, str], compute: Callable[[], Any]):
    """`cls.load(path)` when it was saved with exactly `meta` (the cache key), else `compute()` saved under it."""
    path, meta = Path(path), {str(k): str(v) for k, v in meta.items()}
    if path.exists():
        value = cls.load(path)
        if value.meta == meta:
            return value
    value = compute()
    value.meta = meta
    value.save(path)
    return value
