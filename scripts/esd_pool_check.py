"""Does ESD's trajectory pool erase as the default does? Both arms on held-out toy targets over several training seeds.

    python scripts/esd_pool_check.py --pool 40 --targets Mosaic,Fishes --seeds 0,1 [--threads 1]

For each target and training seed, the bench runs ESD's toy preset of the target's kind as it is (x_t from a fresh
partial DDIM run of the frozen model per step) and with `trajectory_pool` (x_t drawn, without reuse, from batched
frozen-model trajectories). A target's pool figures are "within the spread" when the pool's mean UA, IRA and CRA
over the seeds each lie in [min, max] of the default's over the same seeds. Writes --docs/esd-pool.md and .json.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from canvas import catalog, splits
from canvas.bench import Bench, BenchConfig
from erase.atomic import write_json, write_text

METRICS = ("UA", "IRA", "CRA", "time_s")


def run_arm(target: str, seed: int, pool: int, work: Path, answer_seeds: list[int]) -> dict[str, Any]:
    """One bench job: ESD `toy` on `target` with training seed `seed`, pooled when `pool` > 0."""
    arm = f"pool{pool}" if pool else "default"
    config = BenchConfig(methods=["esd"], targets=[target], out=str(work / f"{arm}-seed{seed}"), seeds=answer_seeds,
                         overrides={"esd": {"seed": seed, "trajectory_pool": pool}})  # fmt: skip
    result = Bench(config, progress=False).run()
    if result["failed"]:
        raise RuntimeError(f"{arm} seed {seed} on {target} failed: {result['failed']}")
    row = next(r for r in result["rows"] if r["target"] == target)
    return {k: row[k] for k in METRICS}


def summary(target: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    default = runs["default"]
    spread = {k: (min(r[k] for r in default), max(r[k] for r in default)) for k in METRICS[:3]}
    means = {arm: {k: mean(r[k] for r in rows) for k in METRICS} for arm, rows in runs.items()}
    within = {k: spread[k][0] <= means["pool"][k] <= spread[k][1] for k in METRICS[:3]}
    return {"target": target, "runs": runs, "means": means, "default_spread": spread, "within": within,
            "speedup": means["default"]["time_s"] / max(means["pool"]["time_s"], 1e-9)}  # fmt: skip


def markdown(rows: list[dict[str, Any]], args, commit: str) -> str:
    lines = [
        "# ESD: trajectory pool vs the default, held-out toy targets",
        "",
        f"`python scripts/esd_pool_check.py --pool {args.pool} --targets {args.targets} --seeds {args.seeds}`; "
        f"commit {commit}; {args.threads} torch thread(s); answer-set seeds {args.answer_seeds}. ESD's toy presets "
        f"(`toy-object` for objects) both ways; training seeds {args.seeds}. Within: the pool's mean lies in the "
        "default's [min, max] over seeds.",
        "",
        "| target | arm | UA per seed | IRA per seed | CRA per seed | mean UA / IRA / CRA | train s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for arm, runs in row["runs"].items():
            per = [" / ".join(f"{r[k]:.1f}" for r in runs) for k in METRICS[:3]]
            m = row["means"][arm]
            lines.append(f"| {row['target']} | {arm} | " + " | ".join(per)
                         + f" | {m['UA']:.1f} / {m['IRA']:.1f} / {m['CRA']:.1f} | {m['time_s']:.0f} |")  # fmt: skip
        verdict = ", ".join(f"{k} {'within' if ok else 'outside'}" for k, ok in row["within"].items())
        lines.append(f"| {row['target']} | pool vs default | {verdict} | | | | {row['speedup']:.1f}x faster |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=40, help="trajectories per refill")
    parser.add_argument("--targets", default="Mosaic,Fishes", help="comma list of held-out toy targets")
    parser.add_argument("--seeds", default="0,1", help="training seeds")
    parser.add_argument("--answer-seeds", default="188,288")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/esd-pool")
    parser.add_argument("--docs", default="docs/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat = catalog.get("toy")
    targets = args.targets.split(",")
    tuned = [t for t in targets if t in splits.tuning_targets(cat)]
    if tuned:
        raise SystemExit(f"{tuned} are tuning targets of the toy preset; give held-out targets")
    seeds, answer_seeds = [int(s) for s in args.seeds.split(",")], [int(s) for s in args.answer_seeds.split(",")]
    rows = []
    for target in targets:
        work = Path(args.work) / target
        runs = {arm: [run_arm(target, s, pool, work, answer_seeds) for s in seeds]
                for arm, pool in (("default", 0), ("pool", args.pool))}  # fmt: skip
        rows.append(summary(target, runs))
        print(f"{target}: default {rows[-1]['means']['default']}, pool {rows[-1]['means']['pool']}, "
              f"within {rows[-1]['within']}", flush=True)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    docs = Path(args.docs)
    write_json(docs / "esd-pool.json", {"args": vars(args), "commit": commit, "rows": rows})
    write_text(docs / "esd-pool.md", markdown(rows, args, commit))
    print(f"wrote {docs / 'esd-pool.md'}")


if __name__ == "__main__":
    main()
