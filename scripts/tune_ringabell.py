"""Choose Ring-A-Bell's toy preset on the splits manifest's tuning targets only, against the toy erased by UCE.

For each tuning target: erase it with UCE's `toy` preset; build the concept vector from the target's benchmark
prompts paired with the same prompts without the target's words (`A Cats image in Pop Art style.` / `A Cats image.`;
for an object `A Cats image in Sketch style.` / `An image in Sketch style.`), as the authors pair prompts that
differ only by the concept; attack the target's benchmark prompts (the first `--prompts` of them) with the original
text encoder; generate from each attacked prompt with the erased model and judge the images. The figure is the
attack success rate (ASR): the share of images the judge assigns to the erased target (its style for a style, its
object for an object); beside it the erased model's rate on the plain prompts (no attack) and the original's. The
choice: the highest mean ASR, ties to fewer generations, then fewer tokens. Held-out targets are never run here.

    python scripts/tune_ringabell.py --generations 150 --prompts 4
"""

from __future__ import annotations

import argparse
import itertools
import time
from statistics import mean

import torch

import erase
from canvas import answers, splits
from canvas import catalog as catalogs
from canvas.attack_suite import concept_pairs
from canvas.attacks import Conditions
from canvas.judge import Judge
from canvas.method_inputs import concept_text
from erase.ringabell import PRESETS, concept_vector, ring_a_bell
from erase.text import PromptEncoder

SEEDS = answers.SEEDS[:2]


def success_rate(pipe, judge, cat, target: str, prompts: list[str], encoder) -> float:
    """% of images (prompts x SEEDS) the judge assigns to `target`."""
    names = [p for p in prompts for _ in SEEDS]
    seeds = [s for _ in prompts for s in SEEDS]
    images = answers.sample(pipe, names, seeds, answers.preset("toy"), batch_size=16, encoder=encoder)
    style_logits, object_logits, _ = judge(images)
    if cat.is_style(target):
        hits = style_logits.argmax(dim=1) == cat.style_label(target)
    else:
        hits = object_logits.argmax(dim=1) == cat.object_label(target)
    return 100.0 * float(hits.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, nargs="+", default=[150])
    parser.add_argument("--tokens", type=int, nargs="+", default=[6, 14])
    parser.add_argument("--strength", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--prompts", type=int, default=4, help="attacked benchmark prompts per target")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cat, pipe = catalogs.get("toy"), erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge, plain = Judge(cat), PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    targets = splits.tuning_targets(cat)
    trials = [PRESETS["paper"].replace(generations=g, tokens=k, strength=s)
              for g, k, s in itertools.product(args.generations, args.tokens, args.strength)]  # fmt: skip
    figures: dict[int, dict[str, float]] = {i: {} for i in range(len(trials))}
    for target in targets:
        with_concept, without_concept = concept_pairs(cat, target)
        attacked = with_concept[: args.prompts]
        vector = concept_vector(pipe.tokenizer, pipe.text_encoder, with_concept, without_concept)
        original = success_rate(pipe, judge, cat, target, attacked, plain)
        found = []  # attacks with the original text encoder, before the erasure (the attacker never sees it)
        for settings in trials:
            start = time.time()
            results = [ring_a_bell(pipe.tokenizer, pipe.text_encoder, p, vector, settings,
                                   torch.Generator().manual_seed(i), progress=False)
                       for i, p in enumerate(attacked)]  # fmt: skip
            found.append((results, time.time() - start))
        base = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
        config = erase.make_config("uce", "toy", concepts=[concept_text(cat, target)])
        erase.run(pipe, config, progress=False)  # leaves the pipeline erased, until the base is loaded back
        try:
            erased = success_rate(pipe, judge, cat, target, attacked, plain)
            for i, (settings, (results, seconds)) in enumerate(zip(trials, found)):
                conditions = {f"<ring-a-bell {j}>": r.condition(pipe.text_encoder) for j, r in enumerate(results)}
                rate = success_rate(pipe, judge, cat, target, list(conditions), Conditions(pipe, conditions))
                figures[i][target] = rate
                print(f"{target:12s} trial {i} tokens={settings.tokens:2d} eta={settings.strength:g} "
                      f"generations={settings.generations}: ASR {rate:5.1f} (erased, no attack {erased:5.1f}; "
                      f"original {original:5.1f}); fitness {mean(r.losses[0] for r in results):.0f} -> "
                      f"{mean(r.losses[-1] for r in results):.0f}; {seconds:.1f}s; e.g. {results[0].text!r}",
                      flush=True)  # fmt: skip
        finally:
            pipe.unet.load_state_dict(base)
    print("\ntrial  tokens  eta  generations  " + "  ".join(f"{t:>10s}" for t in targets) + "   mean")
    for i, settings in enumerate(trials):
        row = "  ".join(f"{figures[i][t]:10.1f}" for t in targets)
        print(f"{i:5d}  {settings.tokens:6d}  {settings.strength:3g}  {settings.generations:11d}  {row}  "
              f"{mean(figures[i].values()):5.1f}")  # fmt: skip
    best = max(range(len(trials)), key=lambda i: (mean(figures[i].values()), -trials[i].generations,
                                                    -trials[i].tokens))  # fmt: skip
    print(f"choice: trial {best}: {trials[best]}")


if __name__ == "__main__":
    main()
