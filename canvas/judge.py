"""The judge of an answer set: the catalog's style and object classifiers, the FID feature extractor, and the image
loading that feeds them ([0, 1] tensors), so every score of the benchmark sees images the same way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from canvas import answers, classifiers, data, fid, metrics
from canvas import inception as fid_inception
from canvas.catalog import Catalog
from erase.pipeline import toy_path

CHUNK = 128  # images per classifier call


def to_unit_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] of RGB pictures, the classifiers' input."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def load_images(paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] of image files."""
    pictures = []
    for path in paths:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    return to_unit_tensor(pictures)


def feature_space(catalog: Catalog, inception: str | None = None, variant: str | None = None) -> str:
    """The one name of the FID feature space, which names the report's FID column (`FID[<space>]`):
    `inception-tf2015` / `inception-torchvision` with Inception weights (`variant`, default tf2015), else
    `<catalog>-style-features` (the input of the style classifier's head, e.g. `toy-style-features`)."""
    if not inception:
        if variant is not None:
            raise ValueError(f"an Inception variant ({variant!r}) needs Inception weights (--inception FILE)")
        return f"{catalog.name}-style-features"
    return f"inception-{fid_inception.check_variant(variant or fid_inception.DEFAULT_VARIANT)}"


def current_feature_space(name: str) -> str:
    """The name a feature space has today, for rows stored under an older name (`toy-style-classifier-head-input`,
    `inception-v3-fid:<file>`), so a resumed bench's finished jobs keep their FID column."""
    legacy = "-style-classifier-head-input"
    if name.endswith(legacy):
        return name[: -len(legacy)] + "-style-features"
    return "inception-tf2015" if name.startswith("inception-v3-fid:") else name


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 (first 16 hex digits) of a file: which weights a cached feature bank came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class Judge:
    """The catalog's style and object classifiers, and the FID feature extractor: Inception-v3 from a local weights
    file when given (`inception_variant`: tf2015 or torchvision, see canvas.inception), else the input of the style
    classifier's head (on the toy: the toy classifier's features)."""

    def __init__(
        self,
        catalog: Catalog,
        classifiers_root: str | None = None,
        inception: str | None = None,
        inception_variant: str | None = None,
    ):
        self.catalog = catalog
        root = classifiers_root
        if root is None and catalog.name == "toy":  # the classifiers beside the toy in use ($ERASEKIT_TOY moves both)
            root = toy_path().parent / "toy_classifiers"
        self.style = classifiers.load(catalog.name, "style", root)
        self.object = classifiers.load(catalog.name, "object", root)
        self._features: list[torch.Tensor] = []
        self.feature_space = feature_space(catalog, inception, inception_variant)
        self.weights = None
        if inception:
            self.inception = fid_inception.load(inception, inception_variant or fid_inception.DEFAULT_VARIANT)
            self.weights = file_digest(inception)
        else:
            self.inception = None
            self.style.head.register_forward_hook(lambda m, inputs, out: self._features.append(inputs[0].detach()))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Style logits, object logits and features of a batch."""
        self._features.clear()
        style, obj = self.style(images), self.object(images)
        return style, obj, self.inception(images) if self.inception is not None else self._features[-1]

    def real_bank(self, cache: Path, indices: Sequence[int], dataset: data.Dataset) -> fid.FeatureBank:
        """Features of the real FID reference set (every theme x object x `indices` of `dataset`, either layout),
        computed once and cached under the feature space, catalog, indices and the dataset's identity.

        Images are read in the dataset's cheapest order (parquet: storage order, each row group once) and the rows
        put back in (theme, object, index) order, so the bank does not depend on how the copy is stored."""
        meta = {
            "features": self.feature_space,
            "weights": str(self.weights),
            "catalog": self.catalog.name,
            "indices": str(list(indices)),
            "data": dataset.identity,
        }

        def compute() -> fid.FeatureBank:
            keys = [data.ItemKey(t, o, i) for t in self.catalog.themes for o in self.catalog.objects for i in indices]
            order = dataset.read_order(keys)
            features: dict[data.ItemKey, torch.Tensor] = {}
            for start in range(0, len(order), CHUNK):
                chunk = order[start : start + CHUNK]
                images = to_unit_tensor([dataset.load(k.theme, k.object, k.index) for k in chunk])
                features.update(zip(chunk, self(images)[2]))
            rows = torch.stack([features[k] for k in keys]).numpy()
            return fid.FeatureBank(rows, [k.theme for k in keys], [k.object for k in keys])

        return fid.FeatureBank.cached(cache, meta, compute)


# (items, style logits, object logits, features) of one chunk of an answer set
Judged = tuple[list[answers.AnswerItem], torch.Tensor, torch.Tensor, torch.Tensor]


def _judged(judge: Judge, answer_dir: Path) -> Iterator[Judged]:
    """(items, style logits, object logits, features) of an answer set, `CHUNK` images at a time."""
    items, paths, _ = answers.load_answer_set(answer_dir)
    for start in range(0, len(items), CHUNK):
        yield (items[start : start + CHUNK], *judge(load_images(paths[start : start + CHUNK])))


def _update(accuracy: metrics.UnlearningAccuracy, items: Sequence[answers.AnswerItem], style, obj) -> None:
    labels = metrics.true_labels(accuracy.catalog, [it.theme for it in items], [it.object for it in items])
    accuracy.update(style, obj, *labels)


def accuracy_scores(judge: Judge, answer_dir: str | os.PathLike[str], target: str) -> metrics.UnlearningScores:
    """UA / IRA / CRA of `target` (one, or "A+B+..." erased together) on an answer set, without FID, which needs
    the real set's features: what a sequence of requests or a quick look in a notebook reports."""
    accuracy = metrics.UnlearningAccuracy(judge.catalog, target)
    for items, style, obj, _ in _judged(judge, Path(answer_dir)):
        _update(accuracy, items, style, obj)
    return accuracy.scores()


def score(
    judge: Judge, answer_dir: Path, target: str, real: fid.FeatureStats, keep: fid.KeepFn | None = None
) -> dict[str, Any]:
    """UA / IRA / CRA of one target on an answer set, and FID against the real statistics."""
    accuracy = metrics.UnlearningAccuracy(judge.catalog, target)
    frechet = fid.FrechetDistance(real.dim, keep=keep, reference=real)
    for items, style, obj, feats in _judged(judge, Path(answer_dir)):
        _update(accuracy, items, style, obj)
        frechet.update(feats, real=False, themes=[it.theme for it in items], objects=[it.object for it in items])
    return {"scores": accuracy.scores(), "FID": float(frechet.compute())}


def target_probability(judge: Judge, answer_dir: str | os.PathLike[str], target: str) -> float:
    """Mean probability the judge gives the target's own class on the answer images that show it (a style target's
    images under the style classifier, an object's under the object classifier; "A+B": the mean over its targets).

    UA counts those images' argmax only, so it saturates at 100 once the target is never the top class; this is the
    continuous margin beneath it: lower means the erased model moved its images further from the target."""
    catalog = judge.catalog
    kind = metrics.target_kind(catalog, target)
    names = metrics.targets_of(target)
    totals = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for items, style, obj, _ in _judged(judge, Path(answer_dir)):
        logits = style if kind == "style" else obj
        probs = logits.softmax(dim=-1)
        for row, item in zip(probs, items):
            shown = item.theme if kind == "style" else item.object
            if shown in totals:
                label = catalog.style_label(shown) if kind == "style" else catalog.object_label(shown)
                totals[shown] += float(row[label])
                counts[shown] += 1
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"the answer set {answer_dir} has no image of {', '.join(missing)}")
    return sum(totals[n] / counts[n] for n in names) / len(names)
