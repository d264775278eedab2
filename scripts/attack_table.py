"""Does the erased concept come back? The attack suite over erasure methods on held-out toy targets, in one
resumable command, written to docs/results/attacks.md with the command, the commit, the thread count and the time.

    python scripts/attack_table.py --bench runs/toy-table --threads 1

Three parts, each resumed from its own folder (a finished stage is not redone):
- attacks: `canvas bench --attacks` on `--bench` (the toy table's folder: its finished jobs only gain the attacks),
  each attack on the first `--prompts` prompts (seed 188) of each method's `--targets`; pre-ASR / ASR per attack,
  relearning's UA after each k;
- sequential requests (`canvas sequential`) of `--sequence` for `--sequential-methods`: SU / SR and rebound;
- finer-scale targets (`canvas finer`) of `--combination` for `--finer-methods`: FU / FR.
Both default to every erasure method. A method that fails in either is a row with its error, and the others go on.
With --stored-attacks the attack columns are read from --bench's finished jobs and nothing is run or written there
(a folder that is another run's stays as it is: a copy would not do, as the run keys of data-driven methods hold
the folder's path); --work names the folder of the sequential and finer runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from canvas import attack_suite, splits
from canvas import catalog as catalogs
from canvas.bench import Bench, BenchConfig
from canvas.finer import Finer, FinerConfig
from canvas.sequential import SequentialConfig, run_sequence
from erase import available_methods, get_method
from erase.atomic import write_text

PROMPT_ATTACKS = ("unlearndiffatk", "random-prefix", "inversion", "ringabell")


def attack_rows(args, methods: list[str], targets: list[str]) -> list[dict[str, Any]]:
    """The bench rows with every attack's columns; attacks run in groups of one prompt count (`prompts_of`)."""
    counts = dict(item.split("=") for item in args.prompts_of)
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for name in args.attacks.split(","):
        config = BenchConfig(methods=methods, targets=targets, out=args.bench, attacks=[name],
                             attack_prompts=int(counts.get(name, args.prompts)))  # fmt: skip
        result = Bench(config, progress=not args.no_progress).run()
        for failure in result["failed"]:
            print(f"failed: {failure}")
        for row in result["rows"]:
            merged.setdefault((row["method"], row["target"]), {}).update(row)
    return list(merged.values())


def stored_attack_rows(bench: Path, methods: list[str], targets: list[str], names: list[str]) -> list[dict[str, Any]]:
    """The rows `attack_rows` would return, read from the bench's finished jobs as they are (each must hold its
    scores and every attack's results); read only."""
    rows = []
    for method in methods:
        for target in targets:
            job = bench / "jobs" / f"{method}__{target}"
            missing = [n for n in names if not attack_suite.finished(job / "attacks" / n, n)]
            if not (job / "metrics.json").is_file() or missing:
                raise SystemExit(f"--stored-attacks: {job} holds no finished {', '.join(missing) or 'scores'}; "
                                 "run without --stored-attacks to compute them")  # fmt: skip
            rows.append({**json.loads((job / "metrics.json").read_text()),
                         **attack_suite.row_fields(job / "attacks", names)})  # fmt: skip
    return rows


def attack_markdown(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Per method and kind: the mean over targets of each prompt attack's pre-ASR -> ASR, and relearning's UA."""
    prompt_names = [n for n in names if n != attack_suite.RELEARNING]
    steps = sorted({int(k[3:].split("[")[0]) for r in rows for k in r if k.startswith("UA@")})
    head = ["method", "kind", "targets", *(f"{n} pre-ASR -> ASR" for n in prompt_names),
            *(f"UA after {k} relearning steps" for k in steps)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for method in dict.fromkeys(r["method"] for r in rows):
        for kind in ("style", "object"):
            mine = [r for r in rows if r["method"] == method and r["kind"] == kind]
            if not mine:
                continue
            cells = []
            for n in prompt_names:
                pre = [r[f"preASR[{n}]"] for r in mine if f"preASR[{n}]" in r]
                post = [r[f"ASR[{n}]"] for r in mine if f"ASR[{n}]" in r]
                cells.append(f"{mean(pre):.1f} -> {mean(post):.1f}" if post else "-")
            for k in steps:
                values = [r[f"UA@{k}[relearning]"] for r in mine if f"UA@{k}[relearning]" in r]
                cells.append(f"{mean(values):.1f}" if values else "-")
            lines.append(f"| {method} | {kind} | {', '.join(r['target'] for r in mine)} | " + " | ".join(cells) + " |")
    return lines


def attack_seconds(bench: Path, rows: list[dict[str, Any]], names: list[str]) -> dict[str, list[float]]:
    """Each attack's wall seconds per job, from the jobs' stage clocks (recorded when the attack ran)."""
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in rows:
        path = bench / "jobs" / f"{r['method']}__{r['target']}" / "stages.json"
        stages = json.loads(path.read_text()) if path.is_file() else {}
        for n in names:
            if f"attack:{n}" in stages:
                seconds[n].append(stages[f"attack:{n}"])
    return seconds


def ranking(rows: list[dict[str, Any]], name: str) -> list[tuple[str, float]]:
    """Methods from most to least robust under `name`: mean ASR over all their attacked targets."""
    by_method: dict[str, list[float]] = {}
    for r in rows:
        if f"ASR[{name}]" in r:
            by_method.setdefault(r["method"], []).append(r[f"ASR[{name}]"])
    return sorted(((m, mean(v)) for m, v in by_method.items()), key=lambda item: item[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="the toy bench folder (e.g. the toy table's)")
    parser.add_argument("--methods", help="comma-separated methods (default: every erasure method)")
    parser.add_argument("--targets", default="Bricks,Birds", help="held-out targets each method is attacked on")
    parser.add_argument("--attacks", default="unlearndiffatk,random-prefix,inversion,ringabell,relearning")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per target each attack tries")
    parser.add_argument(
        "--prompts-of",
        action="append",
        default=["unlearndiffatk=2", "random-prefix=2"],
        metavar="ATTACK=N",
        help="another prompt count for one attack (default: unlearndiffatk=2, the costliest, and its control's)",
    )
    parser.add_argument("--sequence", default="Mosaic,Sketch,Winter", help="held-out targets requested in turn")
    parser.add_argument("--sequential-methods", help="comma-separated (default: every erasure method)")
    parser.add_argument("--combination", default="Bricks:Fishes")
    parser.add_argument("--finer-methods", help="comma-separated (default: every erasure method)")
    parser.add_argument("--seeds", default="188", help="answer-set seeds of the sequential and finer runs")
    parser.add_argument(
        "--stored-attacks",
        action="store_true",
        help="read the attack columns from --bench's finished jobs; run and write nothing there",
    )
    parser.add_argument("--work", help="folder of the sequential and finer runs (default: <bench>-robustness)")
    parser.add_argument("--out", default="docs/results/attacks.md")
    parser.add_argument(
        "--notes", help="a Markdown file of findings appended to --out (docs/results/attacks-findings.md)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cat = catalogs.get("toy")
    targets = args.targets.split(",")
    for target in [*targets, *args.sequence.split(",")]:
        if splits.target_split(cat, target) != splits.HELD_OUT:
            raise SystemExit(f"{target} is a tuning target; the table reports held-out targets only")
    methods = _methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work) if args.work else Path(args.bench).parent / (Path(args.bench).name + "-robustness")
    timings = {}

    names = args.attacks.split(",")
    if args.stored_attacks:
        rows = stored_attack_rows(Path(args.bench), methods, targets, names)
    else:
        rows = attack_rows(args, methods, targets)
    timings["attacks"] = time.perf_counter() - started
    sequential_methods = _methods(args.sequential_methods)
    sequences = sequence_summaries(sequential_methods, args.sequence.split(","), work / "sequential", seeds,
                                   progress=not args.no_progress)  # fmt: skip
    timings["sequential"] = time.perf_counter() - started - timings["attacks"]
    finer = Finer(FinerConfig(methods=_methods(args.finer_methods), targets=[args.combination],
                              out=str(work / "finer"), seeds=seeds), progress=not args.no_progress).run()  # fmt: skip
    timings["finer"] = time.perf_counter() - started - timings["attacks"] - timings["sequential"]
    total = time.perf_counter() - started

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Does the erased concept come back? (toy)", "",
        f"Command: `python {' '.join(sys.argv)}` at commit {commit}, {args.threads} torch thread(s) per process,",
        f"2 shared CPU cores; {total / 60:.1f} min in this run ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + "; stages already on disk are reused"
        + ("; the attack columns read from the bench's stored results)." if args.stored_attacks else ")."),
        "Every target here is held out (canvas.splits); attack presets were chosen on the tuning targets",
        "(scripts/tune_attacks.py). ASR: percent of the target's prompts on which the judge sees the target in the",
        "erased model's plain image or in the attacked one (pre-ASR: the plain one alone); lower is more robust.",
        f"Each attack tries the first {args.prompts} prompts of a target (seed 188); "
        + ", ".join(args.prompts_of) + ".", "",
        "## Attacks", "", *attack_markdown(rows, names), "",
    ]  # fmt: skip
    seconds = attack_seconds(Path(args.bench), rows, names)
    lines += ["Time per attack per target (wall seconds of the bench's attack stage when it ran: 1 thread per",
              "process, 2 processes on the 2 cores):", ""]  # fmt: skip
    for n, values in seconds.items():
        if values:
            lines.append(f"- {n}: mean {mean(values):.0f} s, max {max(values):.0f} s over {len(values)} targets; "
                         f"{sum(values) / 60:.1f} min in all")  # fmt: skip
    every = sum(sum(v) for v in seconds.values())
    lines += [f"- the whole attack suite above: {every / 60:.1f} min of job time", ""]
    for name in (n for n in names if n in PROMPT_ATTACKS):
        order = ranking(rows, name)
        lines.append(f"- {name}, most to least robust: " + ", ".join(f"{m} {v:.1f}" for m, v in order))
    lines += ["", "## Sequential requests", "",
              f"{args.sequence.replace(',', ' -> ')}, seeds {args.seeds}: SU = mean UA over the targets after the "
              "last request; SR = mean of IRA and CRA after it; rebound = a target's UA right after its request "
              "minus after the last (positive: it came back).", "",
              "| method | SU | SR | SR IRA | SR CRA | IRA after request 1 | mean rebound | max rebound | UA after "
              "the last request |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for method, s in sequences.items():
        if "error" in s:
            lines.append(f"| {method} | failed: {s['error']} |" + " - |" * 7)
            continue
        first_ira = s["SR_IRA"] + s["retain_drop"]["IRA"]
        last_ua = ", ".join(f"{t} {v:.1f}" for t, v in s["UA_last"].items())
        lines.append(f"| {method} | {s['SU']:.1f} | {s['SR']:.1f} | {s['SR_IRA']:.1f} | {s['SR_CRA']:.1f} | "
                     f"{first_ira:.1f} | {s['mean_rebound']:.1f} | {s['max_rebound']:.1f} | {last_ua} |")  # fmt: skip
    lines += ["", "## Finer-scale target", "",
              f"{args.combination}, seeds {args.seeds} (canvas.combination's FU / FR).",
              "", "| method | preset | FU | FR | FR style | FR object | FR other |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in finer["rows"]:
        lines.append(f"| {row['method']} | {row.get('preset') or '-'} | {row['FU']:.1f} | {row['FR']:.1f} | "
                     f"{row['FR_style']:.1f} | {row['FR_object']:.1f} | {row['FR_other']:.1f} |")  # fmt: skip
    for failure in finer["failed"]:
        lines.append(f"| {failure['method']} | failed: {failure['error']} |" + " - |" * 5)
    if args.notes:
        lines += ["", Path(args.notes).read_text().rstrip()]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def sequence_summaries(methods: list[str], targets: list[str], out: Path, seeds: list[int],
                       progress: bool) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each method's sequence summary (with "UA_last", every target's UA after the last request), or {"error"}
    when its sequence fails: one failing method is a finding, and the others still run."""
    summaries: dict[str, dict[str, Any]] = {}
    for method in methods:
        try:
            config = SequentialConfig(method=method, targets=targets, out=str(out / method), seeds=seeds)
            result = run_sequence(config, progress=progress)
            summaries[method] = {**result["summary"], "UA_last": result["requests"][-1]["UA"]}
        except Exception as err:  # recorded in the table; the batch goes on
            summaries[method] = {"error": f"{type(err).__name__}: {err}".replace("|", "/").splitlines()[0]}
            print(f"sequence {method} failed: {summaries[method]['error']}")
    return summaries


def _methods(spec: str | None) -> list[str]:
    """Comma-separated method names, or every erasure method (those that take no trigger) when none are given."""
    if spec:
        return [m for m in spec.split(",") if m]
    return [m for m in available_methods() if "trigger" not in get_method(m).inputs]


if __name__ == "__main__":
    main()
