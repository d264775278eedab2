"""Relearning curves: does an erased concept come back after k fine-tuning steps, and how fast against a new one?

Three fine-tunes (erase.relearn, one run each, checkpoints at the schedule's cumulative steps), each from a fresh
copy of the model (the base with the Delta applied, restored and reverted afterwards):
- `target`: the erased model on the target's images (the split's forget images: indices `forget_retain` of the
  target style x every object, or of every theme x the target object; on the toy, the renders), with their
  benchmark prompts;
- `unrelated`: the erased model on as many images of other styles (a style target) or other objects (an object
  target), spread evenly over them, with their prompts (concept resurgence: does unrelated tuning bring it back?);
- `novel`: the base model on as many renders of a style no toy model has seen (canvas.toy.NOVEL_STYLES, prompts
  "A {object} image in New style."): how fast a concept is learned from nothing. Toy catalog only.
After each k (k = 0 included) each curve's *target rate*: the fraction of images of its concept's prompts (the
catalog template for every object of a style target, every theme of an object target, or every object in the novel
style) x `seeds` (answer-set noise, canvas.answers.image_seed) that show the concept. Images are sampled with the
benchmark's protocol and JPEG-compressed (quality 95) as answer sets are, then judged:
- `target`, `unrelated`: the judge's classifier of the target's kind, as the bench scores UA: rate = accuracy on
  the target's class, `ua` = 1 − rate;
- `novel`: the classifiers do not know the novel style, so the rate is the fraction whose style features (the input
  of the style classifier's head) are nearer (L2) to the novel style's centroid than to any catalog theme's; each
  centroid is the mean feature of that style's renders (every object x indices `fid_reference`, JPEG as above).
  On held-out renders (indices 19, 20) this rule is right on every image of every toy style.
So an erased target that returns reaches its base rate in fewer steps than `novel` needs to climb from ~0.

Results go to `<out>/relearning.json` (atomically, after every checkpoint); a finished curve is reused only when its
recorded inputs (base fingerprint, delta digest, schedule, settings, seeds, training items, ...) equal the run's,
else it is run again (the novel curve's inputs hold no delta: it is reused across erasures of the same base);
a failing curve records its error and the others still run.
"""

from __future__ import annotations

import io
import json
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from canvas import answers, splits, toy
from canvas.catalog import Catalog
from canvas.judge import Judge, to_unit_tensor
from canvas.metrics import target_kind
from erase.atomic import atomic_write, write_json
from erase.delta import Delta, fingerprint
from erase.relearn import Relearning, relearn
from erase.sampling import sample_seed

CURVES = ("target", "unrelated", "novel")
NOVEL = "Stripes"
EVAL_SEEDS = (188, 288)  # the first two answer-set seeds
RESULT = "relearning.json"
Item = tuple[str, str, int]  # (theme, object, index)


def bench_schedule(model: str) -> tuple[int, ...]:
    """The schedule `canvas bench --attacks relearning` measures: the toy preset's on the toy, else the paper's."""
    return Relearning.from_preset("toy" if model == "toy" else "paper").schedule


def ua_points(result: dict[str, Any], curve: str = "target") -> dict[int, float]:
    """k -> UA (percent) of a finished curve of a `relearning_curves` result (empty when it did not finish)."""
    record = result.get("curves", {}).get(curve, {})
    if record.get("status") != "done":
        return {}
    return {int(k): 100.0 * (1.0 - float(point["rate"])) for k, point in record.get("points", {}).items()}


def _jpeg(image: Image.Image) -> Image.Image:
    """The image as an answer set stores it (JPEG, quality 95) and the judge reads it back."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def novel_prompt(catalog: Catalog, obj: str, style: str = NOVEL) -> str:
    return catalog.template.format(object=obj, style=toy.NOVEL_STYLE_WORDS[style])


def training_items(catalog: Catalog, target: str, curve: str) -> list[Item]:
    """The images a curve fine-tunes on (see the module docstring); all three curves get as many."""
    indices = splits.load().forget_retain
    style = target_kind(catalog, target) == "style"
    mine = [(t, o, i) for t in catalog.themes for o in catalog.objects for i in indices
            if (t if style else o) == target]  # fmt: skip
    if curve == "target":
        return mine
    if curve == "unrelated":
        others = [(t, o, i) for t in catalog.themes for o in catalog.objects for i in indices
                  if (t if style else o) != target]  # fmt: skip
        return [others[j * len(others) // len(mine)] for j in range(len(mine))]
    cycle = [(NOVEL, o, i) for i in range(1, 21) for o in catalog.objects]
    return [cycle[j % len(cycle)] for j in range(len(mine))]


def eval_items(catalog: Catalog, target: str, curve: str, seeds: Sequence[int]) -> list[answers.AnswerItem]:
    if curve == "novel":
        return [answers.AnswerItem(NOVEL, o, int(s)) for o in catalog.objects for s in seeds]
    if target_kind(catalog, target) == "style":
        return answers.answer_items(catalog, seeds, themes=[target])
    return answers.answer_items(catalog, seeds, objects=[target])


class RateMeter:
    """The target rate of one curve's model (see the module docstring), from the judge's classifiers or its style
    features' nearest centroid."""

    def __init__(self, judge: Judge, catalog: Catalog, sampler: answers.SamplerPreset, batch_size: int = 32):
        self.judge, self.catalog, self.sampler, self.batch_size = judge, catalog, sampler, batch_size
        self._centroids: torch.Tensor | None = None

    def style_features(self, images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.judge.style.head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
        try:
            with torch.no_grad():
                self.judge.style(images)
        finally:
            hook.remove()
        return captured[-1]

    def centroids(self) -> torch.Tensor:
        """(themes + 1, d): every catalog theme's centroid in label order, then the novel style's."""
        if self._centroids is None:
            indices = splits.load().fid_reference
            rows = []
            for style in (*self.catalog.themes, NOVEL):
                images = [_jpeg(toy.render(style, o, i)) for o in self.catalog.objects for i in indices]
                rows.append(self.style_features(to_unit_tensor(images)).mean(0))
            self._centroids = torch.stack(rows)
        return self._centroids

    def images(self, pipe, items: list[answers.AnswerItem], prompts: list[str]) -> torch.Tensor:
        seeds = [it.generator_seed for it in items]
        out = answers.sample(pipe, prompts, seeds, self.sampler, batch_size=self.batch_size, output_type="pil")
        return to_unit_tensor([_jpeg(image) for image in out])

    def rate(self, pipe, target: str, curve: str, seeds: Sequence[int]) -> dict[str, float]:
        items = eval_items(self.catalog, target, curve, seeds)
        if curve == "novel":
            images = self.images(pipe, items, [novel_prompt(self.catalog, it.object) for it in items])
            nearest = torch.cdist(self.style_features(images), self.centroids()).argmin(dim=1)
            return {"rate": float((nearest == len(self.catalog.themes)).float().mean())}
        images = self.images(pipe, items, [self.catalog.prompt(it.theme, it.object) for it in items])
        with torch.no_grad():
            style, obj = self.judge.style(images), self.judge.object(images)
        if target_kind(self.catalog, target) == "style":
            hits = style.argmax(dim=1) == self.catalog.style_label(target)
        else:
            hits = obj.argmax(dim=1) == self.catalog.object_label(target)
        rate = float(hits.float().mean())
        return {"rate": rate, "ua": 1.0 - rate}


def _training_images(catalog: Catalog, items: list[Item], data_root: Path | None) -> list[Image.Image]:
    if data_root is not None:
        return [Image.open(Path(data_root) / t / o / f"{i}.jpg").convert("RGB") for t, o, i in items]
    if catalog.name != "toy":
        raise ValueError(f"catalog {catalog.name!r} needs data_root (the UnlearnCanvas folder); only the toy renders")
    return [_jpeg(toy.render(t, o, i)) for t, o, i in items]


def relearning_curves(
    base_pipe,
    delta: Delta,
    catalog: Catalog,
    target: str,
    schedule: Sequence[int],
    *,
    out: str | Path,
    judge: Judge,
    settings: Relearning | None = None,
    seeds: Sequence[int] = EVAL_SEEDS,
    sampler: answers.SamplerPreset | None = None,
    data_root: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    curves: Sequence[str] = CURVES,
    progress: bool = True,
) -> dict[str, Any]:
    """The three relearning curves of `delta`'s erasure of `target` on `base_pipe` (left as it came), written to
    `<out>/relearning.json` and plotted to `<out>/relearning.png` (when matplotlib is installed); returns the JSON.

    `schedule` (strictly increasing steps >= 1) replaces `settings.schedule` (default settings: the `toy` preset on
    the toy catalog, else `paper`). Each curve's generator is seeded from (`seed`, curve), so a curve does not depend
    on which others ran. `data_root`: the dataset folder `<Theme>/<Object>/<idx>.jpg` (None: the toy's renders).
    `curves`: which of `CURVES` to run (default all)."""
    preset = "toy" if catalog.name == "toy" else "paper"
    settings = (settings or Relearning.from_preset(preset)).with_schedule(schedule)
    target_kind(catalog, target)
    sampler = sampler or answers.preset("toy" if catalog.name == "toy" else "unlearncanvas")
    unknown = [c for c in curves if c not in CURVES]
    if unknown or not curves:
        raise ValueError(f"curves {list(curves)!r}: choose one or more of {', '.join(CURVES)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out = Path(out)
    path = out / RESULT
    base_id = fingerprint(base_pipe)
    common = {
        "base_fingerprint": base_id, "delta": delta.digest(), "catalog": catalog.name, "target": target,
        "settings": asdict(settings), "seeds": seeds, "sampler": asdict(sampler), "seed": seed,
        "data_root": str(data_root) if data_root else None, "judge": judge.feature_space,
    }  # fmt: skip
    stored = json.loads(path.read_text()).get("curves", {}) if path.is_file() else {}
    result: dict[str, Any] = {"schedule": [0, *settings.schedule], "curves": {}}
    meter = RateMeter(judge, catalog, sampler, batch_size)
    points = len(curves) * (len(settings.schedule) + 1)
    bar = tqdm(total=points, desc=f"relearning {target}", disable=not progress)
    for curve in curves:
        items = training_items(catalog, target, curve)
        # the novel curve fine-tunes the base alone: no delta shapes it. JSON-normalised (lists), as stored.
        inputs = json.loads(json.dumps({**common, "curve": curve, "items": items,
                                        **({"delta": None} if curve == "novel" else {})}))  # fmt: skip
        previous = stored.get(curve, {})
        if previous.get("status") == "done" and previous.get("inputs") == inputs:
            result["curves"][curve] = previous
            bar.update(len(settings.schedule) + 1)
            continue
        record: dict[str, Any] = {"inputs": inputs, "status": "running", "points": {}}
        result["curves"][curve] = record
        if curve == "novel" and catalog.name != "toy":
            record.update(status="skipped", reason="the novel style exists only for the toy's renderer")
            bar.update(len(settings.schedule) + 1)
            continue
        try:
            _run_curve(base_pipe, delta, catalog, target, curve, items, settings, meter, seeds, seed, data_root,
                       record, lambda: (write_json(path, result), bar.update(1)))  # fmt: skip
            record["status"] = "done"
        except Exception as err:  # one failing curve must not lose the others
            record.update(
                status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:]
            )
        write_json(path, result)
    bar.close()
    if fingerprint(base_pipe) != base_id:
        raise RuntimeError("the base pipeline was not restored after relearning (its fingerprint changed)")
    result["plot"] = plot_curves(result, out / "relearning.png", target) or "skipped: matplotlib is not installed"
    write_json(path, result)
    return result


def _run_curve(base_pipe, delta, catalog, target, curve, items, settings, meter, seeds, seed, data_root, record,
               saved) -> None:  # fmt: skip
    """One curve: from the erased model (the base for `novel`), fine-tuned on `items`, measured at 0 and each k."""
    images = _training_images(catalog, items, Path(data_root) if data_root else None)
    prompts = [novel_prompt(catalog, o, t) if curve == "novel" else catalog.prompt(t, o) for t, o, _ in items]
    erased = curve != "novel"
    if erased:
        delta.apply(base_pipe)
    try:
        base_pipe.unet.eval()

        def checkpoint(k: int) -> None:
            record["points"][str(k)] = meter.rate(base_pipe, target, curve, seeds)
            saved()

        checkpoint(0)
        generator = torch.Generator().manual_seed(sample_seed(seed, "relearning", curve))
        outcome = relearn(base_pipe, images, prompts, settings, generator, checkpoint, progress=False)
        record["losses"] = outcome.losses
        outcome.restore()
    finally:
        if erased:
            delta.revert(base_pipe)


def plot_curves(result: dict[str, Any], path: Path, target: str) -> str | None:
    """The curves' target rates against k as a PNG; None (and a note in the JSON) when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # optional: plots only
    except ImportError:
        return None
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    labels = {"target": f"erased, on {target}", "unrelated": "erased, on unrelated images",
              "novel": f"base, on the unseen {NOVEL} style"}  # fmt: skip
    for curve, record in result["curves"].items():
        done = sorted((int(k), v["rate"]) for k, v in record.get("points", {}).items())
        if done:
            ax.plot(*zip(*done), marker="o", label=labels[curve])
    ax.set(xlabel="fine-tuning steps k", ylabel="target rate", ylim=(-0.03, 1.03), title=f"Relearning {target}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return str(path)
