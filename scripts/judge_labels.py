"""What the judge calls a target's images, per answer set: how many it still labels as the target, and the rest.

UA counts the target's images (a style on every object, an object in every theme) that the judge no longer labels as
the target. When UA is low, this tells apart a judge that misses an erasure from an erasure that did not happen: it
gives the judge's labels on the base model's images of the target (which must be the target's) beside those of each
erased model, and the themes (or objects) whose images still show the target.

    python scripts/judge_labels.py --target Birds --base /work/x/base-answers JOB/answers [JOB2/answers ...]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from canvas import answers
from canvas import catalog as catalogs
from canvas.judge import Judge, load_images
from erase import load_pipeline
from erase.catalog import Catalog


@dataclass(frozen=True)
class Labels:
    """The judge's verdict on one answer set's images of a target."""

    name: str
    kept: int  # images still labelled as the target
    total: int
    others: dict[str, int]  # the other labels given, most frequent first
    still: list[str]  # the cells (themes of an object, objects of a style) with an image still labelled the target


def target_cells(cat: Catalog, target: str, seeds: Sequence[int]) -> list[answers.AnswerItem]:
    """The answer items of the target's images: the style on every object, or the object in every theme."""
    if cat.is_style(target):
        return answers.answer_items(cat, seeds, themes=[target])
    if cat.is_object(target):
        return answers.answer_items(cat, seeds, objects=[target])
    raise ValueError(f"unknown target {target!r}; accepted: a style or object of catalog {cat.name!r}: "
                     f"{', '.join((*cat.styles, *cat.objects))}")  # fmt: skip


def count_labels(name: str, cat: Catalog, target: str, items: Sequence[answers.AnswerItem], labels: Sequence[str]):
    """`Labels` of the target's `items` given the judge's label for each (a style's or object's name)."""
    if len(items) != len(labels):
        raise ValueError(f"{len(items)} items but {len(labels)} labels")
    style = cat.is_style(target)
    counts = Counter(labels)
    kept = counts.pop(target, 0)
    still = sorted({it.object if style else it.theme for it, label in zip(items, labels) if label == target})
    return Labels(name, kept, len(items), dict(counts.most_common()), still)


def judge_answer_set(judge: Judge, name: str, directory: Path, target: str) -> Labels:
    """The judge's labels on the target's images of one answer set (every seed it holds)."""
    cat = judge.catalog
    items, paths, _ = answers.load_answer_set(directory)
    style = cat.is_style(target)
    rows = [(it, p) for it, p in zip(items, paths) if (it.theme if style else it.object) == target]
    if not rows:
        raise ValueError(f"answer set {directory} holds no image of {target!r}")
    style_logits, object_logits, _ = judge(load_images([p for _, p in rows]))
    names = cat.themes if style else cat.objects
    labels = [names[i] for i in (style_logits if style else object_logits).argmax(1).tolist()]
    return count_labels(name, cat, target, [it for it, _ in rows], labels)


def markdown(target: str, results: Sequence[Labels]) -> str:
    lines = [
        f"| answer set | judged {target} | other labels | cells still judged {target} |",
        "|---|---|---|---|",
    ]
    for r in results:
        others = ", ".join(f"{k} {v}" for k, v in r.others.items()) or "-"
        lines.append(f"| {r.name} | {r.kept} / {r.total} | {others} | {', '.join(r.still) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="a style or object of the catalog")
    parser.add_argument("--catalog", default="toy")
    parser.add_argument("--model", default="toy", help="the base model, for --base")
    parser.add_argument("--base", help="folder of the base model's images of the target (generated if missing)")
    parser.add_argument("--seeds", default=",".join(map(str, answers.SEEDS)), help="seeds of the --base images")
    parser.add_argument("--classifiers", help="folder of the judge's classifiers (the toy's: shipped)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("answer_sets", nargs="*", help="answer-set folders (a bench job's answers/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat = catalogs.get(args.catalog)
    seeds = [int(s) for s in args.seeds.split(",")]
    items = target_cells(cat, args.target, seeds)
    judge = Judge(cat, args.classifiers)
    results = []
    if args.base:
        base = Path(args.base)
        if not (base / answers.MANIFEST).is_file():
            pipe = load_pipeline(args.model)
            pipe.set_progress_bar_config(disable=True)
            sampler = answers.preset("toy" if cat.name == "toy" else "unlearncanvas")
            answers.generate(pipe, items, cat, base, sampler, progress=False)
        results.append(judge_answer_set(judge, "base model", base, args.target))
    for folder in args.answer_sets:
        path = Path(folder)
        in_bench = path.name == "answers" and path.parent.parent.name == "jobs"  # <bench>/jobs/<job>/answers
        name = f"{path.parents[2].name}/{path.parent.name}" if in_bench else str(path)
        results.append(judge_answer_set(judge, name, path, args.target))
    print(markdown(args.target, results))


if __name__ == "__main__":
    main()
