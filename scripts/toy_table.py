"""The whole toy table: every registered erasure method x every toy target, written to docs/results/toy.md.

    python scripts/toy_table.py --threads 1                                   # one process
    accelerate launch --cpu --num_processes 2 scripts/toy_table.py --threads 1  # two processes, one core each

The bench folder (--work) is resumed: a finished job is not redone unless its inputs changed. The Markdown puts
the held-out targets' figures first and the tuning targets' (where presets were chosen, so not results) apart; its
header gives the command, the commit, the thread count and the time split into erase / answers / scoring.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import torch

from canvas import catalog as catalogs
from canvas import splits
from canvas.bench import Bench, BenchConfig, resolve_targets
from erase import available_methods, get_method
from erase.atomic import write_text

# UnlearnCanvas's own table (paper v1 Table 3 / v4): style UA / IRA / CRA, object UA / IRA / CRA.
PAPER = {
    "esd": (98.58, 80.97, 93.96, 92.15, 55.78, 44.23),
    "fmn": (88.48, 56.77, 46.60, 45.64, 90.63, 73.46),
    "uce": (98.40, 60.22, 47.71, 94.31, 39.35, 34.67),
    "ca": (60.82, 96.01, 92.70, 46.67, 90.11, 81.97),
    "salun": (86.26, 90.39, 95.08, 86.91, 96.35, 99.59),
    "seot": (56.90, 94.68, 84.31, 23.25, 95.57, 82.71),
    "spm": (60.94, 92.39, 84.33, 71.25, 90.79, 81.65),
    "erasediff": (92.42, 73.91, 98.93, 86.67, 94.03, 48.48),
    "scissorhands": (95.84, 80.42, 43.27, 80.73, 81.15, 67.99),
}
GOAL = {"UA": 80.0, "IRA": 70.0, "CRA": 70.0}  # the goal for held-out means, per kind
METRICS = ("UA", "IRA", "CRA")


def erasure_methods() -> list[str]:
    """Registered methods that erase a style or object (backdoor removal, whose target is a trigger, is not)."""
    return [m for m in available_methods() if "trigger" not in get_method(m).inputs]


def summary(rows: list[dict[str, Any]], split_of) -> list[dict[str, Any]]:
    """Per (method, kind, split): mean, minimum and population standard deviation over targets of UA/IRA/CRA."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["kind"], split_of(row["target"])), []).append(row)
    out = []
    for (method, kind, split), group in sorted(groups.items()):
        entry: dict[str, Any] = {"method": method, "kind": kind, "split": split, "n": len(group)}
        for key in METRICS:
            values = [r[key] for r in group]
            entry.update({f"{key}_mean": mean(values), f"{key}_min": min(values), f"{key}_std": pstdev(values)})
        entry["met"] = all(entry[f"{k}_mean"] >= v for k, v in GOAL.items())
        out.append(entry)
    return out


def summary_markdown(entries: list[dict[str, Any]], split: str) -> str:
    lines = [
        "| method | kind | targets | UA mean (min, std) | IRA mean (min, std) | CRA mean (min, std) | goal | "
        "UnlearnCanvas UA / IRA / CRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in (e for e in entries if e["split"] == split):
        paper = PAPER.get(e["method"])
        part = None if paper is None else (paper[:3] if e["kind"] == "style" else paper[3:])
        shown = "-" if part is None else " / ".join(f"{v:.1f}" for v in part)
        cells = [f"{e[f'{k}_mean']:.1f} ({e[f'{k}_min']:.1f}, {e[f'{k}_std']:.1f})" for k in METRICS]
        goal = ("met" if e["met"] else "**not met**") if split == "held-out" else "tuning, not a result"
        lines.append(f"| {e['method']} | {e['kind']} | {e['n']} | " + " | ".join(cells) + f" | {goal} | {shown} |")
    return "\n".join(lines)


def stage_seconds(work: Path) -> dict[str, float]:
    """Seconds per stage summed over jobs (each job's stages.json, written by the bench)."""
    totals: dict[str, float] = {}
    for path in (work / "jobs").glob("*/stages.json"):
        for stage, seconds in json.loads(path.read_text()).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/toy-table", help="the bench folder (resumed)")
    parser.add_argument("--docs", default="docs/results", help="where toy.md, toy.csv, the plot and grids go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--methods", default=",".join(erasure_methods()))
    parser.add_argument("--targets", default="all", help="target names or keywords (canvas bench --targets)")
    parser.add_argument("--notes", help="a Markdown file of findings appended to toy.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat = catalogs.get("toy")
    started = time.perf_counter()
    config = BenchConfig(methods=args.methods.split(","), targets=resolve_targets(cat, args.targets.split(",")),
                         out=args.work)  # fmt: skip
    bench = Bench(config, progress=True)
    result = bench.run()
    if result is None:  # not the main process
        return
    wall = time.perf_counter() - started
    work, docs = Path(args.work), Path(args.docs)
    rows = result["rows"]
    entries = summary(rows, lambda target: splits.target_split(cat, target))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stages = stage_seconds(work)
    processes = bench.state.num_processes
    lines = [
        "# The toy table: every erasure method x every toy target",
        "",
        f"- command: `{' '.join(['python', *sys.argv])}` ({processes} process(es), {args.threads} torch thread(s) "
        "each, on 2 shared CPU cores)",
        f"- commit: {commit}; answer-set seeds {config.seeds}; FID features: {result['fid_features']}",
        f"- wall time of this invocation: {wall / 60:.1f} min (a resumed run counts only what it redid); summed over "
        "jobs: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(stages.items())),
        f"- tuning targets (presets were chosen on these; not results): {', '.join(splits.tuning_targets(cat))}",
        f"- failed jobs: {result['failed'] or 'none'}",
        "",
        "Means over targets with, in brackets, the minimum and the population standard deviation over targets.",
        f"Goal per method and kind on held-out targets: mean UA >= {GOAL['UA']:g}, mean IRA >= {GOAL['IRA']:g}, "
        f"mean CRA >= {GOAL['CRA']:g}.",
        "",
        "## Held-out targets",
        "",
        summary_markdown(entries, "held-out"),
        "",
        "## Tuning targets (not results)",
        "",
        summary_markdown(entries, "tuning"),
        "",
        "Per-target rows (with FID, time, memory, storage and split): [toy.csv](toy.csv); before/after grids in",
        "[toy-grids/](toy-grids/).",
        "",
        "![UA against IRA and CRA](toy.png)",
        "",
    ]
    if args.notes:
        lines += [Path(args.notes).read_text()]
    docs.mkdir(parents=True, exist_ok=True)
    write_text(docs / "toy.md", "\n".join(lines))
    shutil.copyfile(work / "rows.csv", docs / "toy.csv")
    shutil.copyfile(work / "ua_vs_retain.png", docs / "toy.png")
    shutil.copytree(work / "grids", docs / "toy-grids", dirs_exist_ok=True)
    print(f"wrote {docs / 'toy.md'} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
