"""Cost of erasing many concepts in one run: time, peak memory and storage of erasing 1, 5 and 10 toy styles at once.

    python scripts/bench_many.py [--methods uce,speed,rece,mace] [--counts 1,5,10] [--threads 1] [--repeat 2]

Each run erases the first n toy styles with the inputs a bench job would use (canvas.method_inputs.together_inputs)
and, for every n alike, the preset a together job would use (so the counts compare one recipe), from a freshly
loaded toy, and is timed as `erase.run` records it (the
encoder calls and solves, not the pipeline load). The fastest of `--repeat` runs is kept, since other work on the
shared cores only ever adds time. Memory is the process's peak RSS (a CPU figure: it includes the loaded pipeline
and never goes down, so it is an upper bound that mostly grows). Writes --out (Markdown and JSON).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import erase
from canvas import catalog
from canvas.bench import Bench, BenchConfig, job_preset
from canvas.method_inputs import together_inputs
from erase import get_method, make_config
from erase.atomic import write_json, write_text


def erase_cost(method: str, targets: list[str], data: Path) -> dict[str, float]:
    cat = catalog.get("toy")
    config = BenchConfig(methods=[method], targets=targets, out=str(data))
    root = Bench.data_root_of(config, cat) if get_method(method).reads_images else None
    values = together_inputs(method, cat, targets, root)
    preset = job_preset(config, method, "style", together=True)
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    result = erase.run(pipe, make_config(method, preset, **values), progress=False)
    record = result.record
    return {"time_s": record["wall_time_s"], "peak_rss_gb": record["peak_memory_bytes"] / 1e9,
            "storage_bytes": result.delta.nbytes, "preset": preset}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="uce,speed,rece,mace")
    parser.add_argument("--counts", default="1,5,10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="docs/results/many-concepts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    styles = list(catalog.get("toy").styles)
    counts = [int(c) for c in args.counts.split(",")]
    if max(counts) > len(styles) or min(counts) < 1:
        raise SystemExit(f"--counts must lie in 1..{len(styles)} (the toy's styles), got {args.counts!r}")
    rows = []
    with tempfile.TemporaryDirectory() as data:
        for method in args.methods.split(","):
            for n in counts:
                runs = [erase_cost(method, styles[:n], Path(data)) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: r["time_s"])
                rows.append({"method": method, "concepts": n, **best})
                print(f"{method:7s} {n:3d} concepts: {best['time_s']:.3f} s, peak RSS {best['peak_rss_gb']:.2f} GB, "
                      f"storage {best['storage_bytes']:,} B ({best['preset']})", flush=True)  # fmt: skip
    header = (f"Command: `python scripts/bench_many.py --methods {args.methods} --counts {args.counts} --threads "
              f"{args.threads} --repeat {args.repeat}`; torch threads {torch.get_num_threads()}, {os.cpu_count()} "
              "shared CPU cores; the fastest of the repeats.")  # fmt: skip
    lines = ["# Erasing many toy concepts at once", "", header, "",
             "| method | concepts | time (s) | time / concept (s) | peak RSS (GB) | storage (bytes) | preset |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['concepts']} | {r['time_s']:.3f} | {r['time_s'] / r['concepts']:.3f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['storage_bytes']:,} | {r['preset']} |")  # fmt: skip
    out = Path(args.out)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(out.with_suffix(".json"), {"command": header, "rows": rows})
    print(f"-> {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
