"""How small a LoRA of an erasure is, and how close: for Deltas made on the toy, the LoRA file's size against the
Delta's (safetensors bytes) at each rank, and each rank's max / mean relative error ||dW - B A|| / ||dW||.

    python scripts/bench_lora.py [--methods uce,esd,fmn] [--target Mosaic] [--ranks 1,4,16] [--esd-steps 20]
                                 [--threads 1] [--out runs/bench-lora] [--write docs/results/lora.md]

Each Delta is made once with the bench's own inputs and toy preset for the target (canvas.bench.job_config; ESD with
fewer steps to keep it short) and kept in --out; the exports are the diffusers layout (PEFT keys, per-module rank),
and the kohya file's size is shown beside it (every module padded to the full rank, one alpha).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import diffusers
import torch
import transformers

import erase
from canvas.bench import BenchConfig, job_config
from erase.atomic import write_text
from erase.delta import TENSORS_FILE, Delta
from erase.lora import export_lora


def made_delta(method: str, target: str, out: Path, esd_steps: int) -> Delta:
    folder = out / method
    if not (folder / TENSORS_FILE).is_file():
        bench = BenchConfig(methods=[method], targets=[target], out=str(out), overrides={"esd": {"steps": esd_steps}})
        started = time.perf_counter()
        result = erase.run(erase.load_pipeline("toy"), job_config(bench, method, target), progress=False)
        result.delta.save(folder)
        print(f"{method}: made in {time.perf_counter() - started:.0f} s", flush=True)
    return Delta.load(folder)


def rows_of(method: str, delta: Delta, delta_bytes: int, ranks: list[int], out: Path) -> list[list[str]]:
    pipe = erase.load_pipeline("toy")
    rows = []
    for rank in ranks:
        files = {}
        started = time.perf_counter()
        for fmt in ("diffusers", "kohya"):
            export = export_lora(delta, pipe, rank, fmt)
            files[fmt] = export.save(out / method / f"lora-r{rank}-{fmt}.safetensors").stat().st_size
        seconds = (time.perf_counter() - started) / 2
        errors = list(export.errors.values())
        rows.append([method, str(len(export.errors)), str(len(export.not_exportable)), f"{delta_bytes:,}",
                     str(rank), f"{files['diffusers']:,}", f"{files['diffusers'] / delta_bytes:.3f}",
                     f"{files['kohya']:,}", f"{max(errors):.3g}", f"{mean(errors):.3g}", f"{seconds:.2f}"])  # fmt: skip
    return rows


HEADER = ["method", "LoRA tensors", "not exportable", "Delta bytes", "rank", "LoRA bytes (diffusers)",
          "LoRA / Delta", "LoRA bytes (kohya)", "max rel. error", "mean rel. error", "export s"]  # fmt: skip


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="uce,esd,fmn")
    parser.add_argument("--target", default="Mosaic", help="a held-out target (no toy preset was tuned on it)")
    parser.add_argument("--ranks", default="1,4,16")
    parser.add_argument("--esd-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-lora")
    parser.add_argument("--write", help="also write the table, with the command, to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
    out, ranks = Path(args.out), [int(r) for r in args.ranks.split(",")]
    started = time.perf_counter()
    rows = []
    for method in args.methods.split(","):
        delta = made_delta(method, args.target, out, args.esd_steps)
        rows += rows_of(method, delta, (out / method / TENSORS_FILE).stat().st_size, ranks, out)
    table = markdown(rows)
    print(table)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        command = shlex.join(["python", "scripts/bench_lora.py", *sys.argv[1:]])
        write_text(args.write, f"# LoRA export of toy erasures: size and error by rank\n\nCommand: `{command}`; "
                   f"commit {commit}; torch threads {args.threads}; {time.perf_counter() - started:.0f} s.\n\n"
                   f"Target {args.target}, each method's toy preset (ESD with {args.esd_steps} steps).\n\n"
                   + table)  # fmt: skip


if __name__ == "__main__":
    main()
