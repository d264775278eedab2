"""The UnlearnCanvas metrics: UA / IRA / CRA and time / memory / storage (FID lives in `canvas.fid`).

A functional core on plain tensors (fractions in [0, 1]) and `torchmetrics.Metric` classes that accumulate it batch
by batch (and across processes); `canvas.report` turns fractions into the paper's percentages and tables.
Definitions follow the reference exactly (docs: shared/reference/unlearncanvas.md, "The 7 metrics").
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from canvas.catalog import Catalog

Kind = Literal["style", "object"]
KINDS: tuple[Kind, ...] = ("style", "object")
BYTES_PER_GB = 1e9  # decimal gigabytes; the paper's GB column does not say which, and 1e9 is what disks report


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
    ua_each: tuple[float, ...] = ()  # a job erasing several targets at once: the UA of each (`ua` is their mean)

    def percent(self) -> dict[str, float]:
        return {"UA": 100.0 * self.ua, "IRA": 100.0 * self.ira, "CRA": 100.0 * self.cra}


TOGETHER = "+"  # joins the targets of a job that erases several at once: "Pop_Art+Sketch+Winter"


def targets_of(target: str) -> list[str]:
    """The targets a job's target names: itself, or each of a together-job's ("A+B+C")."""
    return target.split(TOGETHER)


def target_kind(catalog: Catalog, target: str) -> Kind:
    """`style` for a benchmark style, `object` for an object; the photo class is not an unlearning target. Several
    targets erased together ("A+B") must be distinct and of one kind, which is theirs."""
    if TOGETHER in target:
        names = targets_of(target)
        kinds = {target_kind(catalog, t) for t in names}
        if len(kinds) > 1:
            raise ValueError(f"targets erased together must be of one kind (all styles or all objects), got {target!r}")
        if len(set(names)) < len(names):
            raise ValueError(f"targets erased together must be distinct, got {target!r}")
        return kinds.pop()
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
    CRA = mean Acc_S over the benchmark styles (photo excluded). Targets erased together ("A+B+C"): UA is the mean
    of their UAs, IRA the mean over the classes of their kind outside them, CRA as for one target.
    """
    acc_s = _accuracy_vector(style_accuracy, len(catalog.themes), "style", catalog.themes)
    acc_o = _accuracy_vector(object_accuracy, len(catalog.objects), "object", catalog.objects)
    styles = [catalog.style_label(s) for s in catalog.styles]  # S50: photo class left out
    objects = list(range(len(catalog.objects)))
    kind = target_kind(catalog, target)
    if kind == "style":
        own, acc_own = [catalog.style_label(t) for t in targets_of(target)], acc_s
        in_domain, in_acc, cross, cross_acc = [i for i in styles if i not in own], acc_s, objects, acc_o
        names_in, names_cross = catalog.themes, catalog.objects
    else:
        own, acc_own = [catalog.object_label(t) for t in targets_of(target)], acc_o
        in_domain, in_acc, cross, cross_acc = [j for j in objects if j not in own], acc_o, styles, acc_s
        names_in, names_cross = catalog.objects, catalog.themes
    if not in_domain:
        raise ValueError(f"{target!r} erases every {kind} of catalog {catalog.name!r}: no {kind} is left for IRA")
    _require_measured(acc_own, own, names_in, "the target")
    _require_measured(in_acc, in_domain, names_in, "IRA")
    _require_measured(cross_acc, cross, names_cross, "CRA")
    each = tuple(1.0 - float(acc_own[i]) for i in own)
    return UnlearningScores(
        target=target,
        kind=kind,
        ua=sum(each) / len(each),
        ira=float(in_acc[in_domain].mean()),
        cra=float(cross_acc[cross].mean()),
        ira_terms=len(in_domain),
        cra_terms=len(cross),
        ua_each=each if len(each) > 1 else (),
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
