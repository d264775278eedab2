"""Choose an attack's toy preset on the splits manifest's tuning targets only, with the attack suite's own protocol.

For each tuning target (canvas.splits.tuning_targets("toy")): erase it with UCE's `toy` preset (closed form, the
Delta kept under --out), then run each trial of the attack through `canvas.attacks.run_attack` on the target's first
`--prompts` benchmark prompts at seed 188, judged by the toy's classifiers. The figure is the suite's ASR (the judge
sees the target in the plain or the attacked image). Prints every trial's figures and the choice: the highest mean
ASR over the tuning targets, ties to the earlier (cheaper) trial. Held-out targets are never run here.

    python scripts/tune_attacks.py unlearndiffatk --out runs/tune-attacks
    python scripts/tune_attacks.py inversion --out runs/tune-attacks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import mean

import torch

import erase
from canvas import answers, attack_suite, attacks, splits, toy
from canvas import catalog as catalogs
from canvas.judge import Judge
from canvas.method_inputs import concept_text
from erase.delta import Delta
from erase.inversion import Inversion
from erase.unlearndiffatk import UnlearnDiffAtk

TRIALS = {
    "unlearndiffatk": [
        UnlearnDiffAtk(tokens=5, iterations=20, lr=0.01, timesteps=5),
        UnlearnDiffAtk(tokens=5, iterations=20, lr=0.05, timesteps=10),
        UnlearnDiffAtk(tokens=3, iterations=40, lr=0.05, timesteps=5),
    ],
    "inversion": [
        Inversion(steps=200, lr=0.005, batch=4, accumulate=1, init="art"),
        Inversion(steps=200, lr=0.02, batch=4, accumulate=1, init="art"),
        Inversion(steps=500, lr=0.005, batch=4, accumulate=1, init="art"),
    ],
}


def uce_delta(out: Path, cat, target: str) -> Delta:
    """UCE's toy erasure of `target`, made once and kept."""
    folder = out / "deltas" / f"uce__{target}"
    if not (folder / "delta.json").is_file():
        result = erase.run(erase.load_pipeline("toy"), erase.make_config("uce", "toy",
                           concepts=[concept_text(cat, target)]), progress=False)  # fmt: skip
        result.delta.save(folder)
    return Delta.load(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=sorted(TRIALS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=4, help="attacked benchmark prompts per target")
    parser.add_argument("--trials", help="comma-separated trial indices (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat, out = catalogs.get("toy"), Path(args.out)
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    verdict, sampler = Judge(cat), answers.preset("toy")
    attack = attack_suite.get(args.attack)
    trials = TRIALS[args.attack]
    chosen = [int(i) for i in args.trials.split(",")] if args.trials else range(len(trials))
    figures: dict[int, dict[str, float]] = {i: {} for i in chosen}
    started = time.perf_counter()
    for target in splits.tuning_targets(cat):
        delta = uce_delta(out, cat, target)
        items = attacks.attack_items(cat, target, [answers.SEEDS[0]])[: args.prompts]
        images = attacks.target_images(cat, target, toy.render, splits.load().forget_retain)
        for i in chosen:
            start = time.perf_counter()
            folder = out / args.attack / f"trial{i}" / target
            run = attacks.AttackRun(pipe, delta, cat, target, trials[i], sampler, folder, images, progress=False)
            summary = attacks.run_attack(run, attack, items, verdict)
            figures[i][target] = summary["asr"]
            print(
                f"{target:12s} trial {i} {trials[i]}: pre-ASR {summary['pre_asr']:5.1f} ASR {summary['asr']:5.1f} "
                f"({time.perf_counter() - start:.0f} s); e.g. {summary['rows'][0]['attacked']!r}",
                flush=True,
            )
    print(
        f"\n{args.attack}, {args.prompts} prompts per tuning target, {torch.get_num_threads()} thread(s), "
        f"{time.perf_counter() - started:.0f} s"
    )
    for i in chosen:
        row = "  ".join(f"{t} {v:5.1f}" for t, v in figures[i].items())
        print(f"trial {i}: mean ASR {mean(figures[i].values()):5.1f}  ({row})  {trials[i]}")
    best = max(chosen, key=lambda i: (mean(figures[i].values()), -i))
    print(f"choice: trial {best}: {trials[best]}")


if __name__ == "__main__":
    main()
