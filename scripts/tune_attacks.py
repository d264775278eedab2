"""Choose an attack's toy preset on the splits manifest's tuning targets only, with the attack suite's own protocol.

For each tuning target (canvas.splits.tuning_targets("toy")) and each erasure method of `--methods`: the method's
Delta for the target from a toy bench folder (`--bench`, e.g. the toy table's; its jobs/<method>__<target>/delta),
else made here with the method's toy preset, then each trial of the attack through `canvas.attacks.run_attack` on
the target's first `--prompts` benchmark prompts at seed 188, judged by the toy's classifiers. The figure is the
suite's ASR (the judge sees the target in the plain or the attacked image). Prints every trial's figures and the
choice: the highest mean ASR over methods and tuning targets, ties to the earlier (cheaper) trial. Held-out
targets are never run here.

    python scripts/tune_attacks.py inversion --methods seot,advunlearn --bench runs/toy-table --out runs/tune-attacks
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
from canvas.bench import BenchConfig, job_config
from canvas.judge import Judge
from erase.delta import Delta
from erase.inversion import Inversion
from erase.unlearndiffatk import UnlearnDiffAtk

TRIALS = {
    "unlearndiffatk": [
        UnlearnDiffAtk(tokens=5, iterations=20, lr=0.05, timesteps=5),
        UnlearnDiffAtk(tokens=5, iterations=20, lr=0.5, timesteps=10),
        UnlearnDiffAtk(tokens=5, iterations=40, lr=0.1, timesteps=10),
    ],
    "inversion": [
        Inversion(steps=200, lr=0.02, batch=4, accumulate=1, init="art"),
        Inversion(steps=300, lr=0.005, batch=4, accumulate=1, init="art"),
    ],
}


def erased(out: Path, bench: Path | None, cat, method: str, target: str) -> Delta:
    """The method's toy erasure of `target`: the bench folder's, else made once here and kept."""
    if bench is not None and (bench / "jobs" / f"{method}__{target}" / "delta" / "delta.json").is_file():
        return Delta.load(bench / "jobs" / f"{method}__{target}" / "delta")
    folder = out / "deltas" / f"{method}__{target}"
    if not (folder / "delta.json").is_file():
        config = job_config(BenchConfig(methods=[method], targets=[target], out=str(out)), method, target)
        erase.run(erase.load_pipeline("toy"), config, progress=False).delta.save(folder)
    return Delta.load(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=sorted(TRIALS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="uce", help="comma-separated erasure methods (default uce)")
    parser.add_argument("--bench", help="a toy bench folder whose jobs' Deltas to attack (else made here)")
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
    bench = Path(args.bench) if args.bench else None
    for target in splits.tuning_targets(cat):
        items = attacks.attack_items(cat, target, [answers.SEEDS[0]])[: args.prompts]
        images = attacks.target_images(cat, target, toy.render, splits.load().forget_retain)
        for method in args.methods.split(","):
            delta = erased(out, bench, cat, method, target)
            for i in chosen:
                start = time.perf_counter()
                folder = out / args.attack / f"trial{i}" / f"{method}__{target}"
                run = attacks.AttackRun(pipe, delta, cat, target, trials[i], sampler, folder, images, progress=False)
                summary = attacks.run_attack(run, attack, items, verdict)
                figures[i][f"{method}/{target}"] = summary["asr"]
                print(f"{method:10s} {target:12s} trial {i}: pre-ASR {summary['pre_asr']:5.1f} ASR "
                      f"{summary['asr']:5.1f} ({time.perf_counter() - start:.0f} s); e.g. "
                      f"{summary['rows'][0]['attacked']!r}", flush=True)  # fmt: skip
    print(f"\n{args.attack} against {args.methods}, {args.prompts} prompts per tuning target, "
          f"{torch.get_num_threads()} thread(s), {time.perf_counter() - started:.0f} s")  # fmt: skip
    for i in chosen:
        print(f"trial {i}: {trials[i]}")
        row = "  ".join(f"{t} {v:5.1f}" for t, v in figures[i].items())
        print(f"  mean ASR {mean(figures[i].values()):5.1f}  ({row})")
    best = max(chosen, key=lambda i: (mean(figures[i].values()), -i))
    print(f"choice: trial {best}: {trials[best]}")


if __name__ == "__main__":
    main()
