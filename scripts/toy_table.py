"""The whole toy table: every registered erasure method x every toy target, written to docs/results/toy.md.

    python scripts/toy_table.py --threads 1                                   # one process
    torchrun --nproc_per_node 2 scripts/toy_table.py --threads 1    # two processes, one core each

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
from typing import Any

import torch

from canvas import catalog as catalogs
from canvas import report, splits
from canvas.bench import Bench, BenchConfig
from canvas.splits import HELD_OUT, TUNING
from canvas.targets import resolve_targets
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


def goal_met(entry: dict[str, Any], kind: str) -> bool:
    return all(entry[f"{kind}_{k}"] is not None and entry[f"{kind}_{k}"] >= v for k, v in GOAL.items())


def summary_markdown(entries: list[dict[str, Any]], split: str) -> str:
    """Per method and kind: mean (min, std) of UA / IRA / CRA over the split's targets, the goal, the paper's."""
    lines = [
        "| method | kind | targets | UA mean (min, std) | IRA mean (min, std) | CRA mean (min, std) | goal | "
        "UnlearnCanvas UA / IRA / CRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in (e for e in entries if e["split"] == split):
        for kind in ("style", "object"):
            if not e[f"n_{kind}"]:
                continue
            paper = PAPER.get(e["method"])
            part = None if paper is None else (paper[:3] if kind == "style" else paper[3:])
            shown = "-" if part is None else " / ".join(f"{v:.1f}" for v in part)
            cells = [f"{e[f'{kind}_{k}']:.1f} ({e[f'{kind}_{k}_min']:.1f}, {e[f'{kind}_{k}_std']:.1f})"
                     for k in METRICS]  # fmt: skip
            goal = ("met" if goal_met(e, kind) else "**not met**") if split == HELD_OUT else "tuning, not a result"
            lines.append(f"| {e['method']} | {kind} | {e[f'n_{kind}']} | " + " | ".join(cells)
                         + f" | {goal} | {shown} |")  # fmt: skip
    return "\n".join(lines)


def efficiency_markdown(entries: list[dict[str, Any]], split: str) -> str:
    """Per method, means over the split's targets of the cost columns: training time, peak memory (RSS on a CPU),
    storage (the Delta's tensors, or a runtime patch's tensors and settings) and the FID column."""
    lines = ["| method | time (s) | memory (GB) | storage (bytes) | FID |", "|---|---:|---:|---:|---:|"]
    for e in (e for e in entries if e["split"] == split):
        fid = "-" if e["FID"] is None else f"{e['FID']:.2f}"
        lines.append(f"| {e['method']} | {e['time_s']:.1f} | {e['memory_gb']:.2f} | {e['storage_gb'] * 1e9:,.0f} | "
                     f"{fid} |")  # fmt: skip
    return "\n".join(lines)


def stage_seconds(work: Path) -> tuple[dict[str, float], int]:
    """Seconds per stage summed over jobs (each job's stages.json, written by the bench), and how many jobs
    generated an answer set."""
    totals: dict[str, float] = {}
    answer_sets = 0
    for path in (work / "jobs").glob("*/stages.json"):
        stages = json.loads(path.read_text())
        answer_sets += "answers" in stages
        for stage, seconds in stages.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals, answer_sets


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
    entries = report.aggregate(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stages, answer_sets = stage_seconds(work)
    images = answer_sets * len(config.seeds) * len(cat.themes) * len(cat.objects)
    rate = images / stages["answers"] if stages.get("answers") else float("nan")
    processes = bench.state.num_processes
    lines = [
        "# The toy table: every erasure method x every toy target",
        "",
        f"- command: `{' '.join(['python', *sys.argv])}` ({processes} process(es), {args.threads} torch thread(s) "
        "each, on 2 shared CPU cores)",
        f"- commit: {commit}; answer-set seeds {config.seeds}; FID features: {result['fid_features']}",
        f"- wall time of this invocation: {wall / 60:.1f} min (a resumed run counts only what it redid); summed over "
        "jobs: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(stages.items())),
        f"- answer sets: {images} images at {rate:.1f} images/s per process",
        f"- tuning targets (presets were chosen on these; not results): {', '.join(splits.tuning_targets(cat))}",
        f"- failed jobs: {result['failed'] or 'none'}",
        "",
        "Means over targets with, in brackets, the minimum and the population standard deviation over targets.",
        f"Goal per method and kind on held-out targets: mean UA >= {GOAL['UA']:g}, mean IRA >= {GOAL['IRA']:g}, "
        f"mean CRA >= {GOAL['CRA']:g}.",
        "",
        "## Held-out targets",
        "",
        summary_markdown(entries, HELD_OUT),
        "",
        "## Tuning targets (not results)",
        "",
        summary_markdown(entries, TUNING),
        "",
        "## Efficiency, held-out targets (one run for every method)",
        "",
        "Means over each method's held-out targets. Each time is its job's own record, made when the job ran (the",
        "record's torch_threads says at how many threads; the table's jobs ran at 1 thread per process, several",
        f"processes on 2 shared cores), so times include contention. FID: {result['fid_features']}.",
        "",
        efficiency_markdown(entries, HELD_OUT),
        "",
        "Per-target rows (with FID, time, memory, storage and split): [toy.csv](toy.csv); before/after grids in",
        "[toy-grids/](toy-grids/).",
        "",
        "![UA against IRA and CRA](toy.png)",
        "",
    ]
    backdoor = docs / "toy-backdoor.md"
    if backdoor.is_file():  # scripts/backdoor_table.py's table, one heading level down
        lines += ["#" + backdoor.read_text(), ""]
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
