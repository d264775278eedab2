"""Find a method's `toy` preset by measurement: run the bench for each candidate set of config values on one
target of the toy, and print UA / IRA / CRA / time per candidate.

    python scripts/tune_toy.py --method esd --target Pop_Art --candidates '[{"lr": 1e-3}, {"lr": 3e-3}]'
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from canvas.bench import Bench, BenchConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--target", default="Pop_Art")
    parser.add_argument("--candidates", required=True, help="JSON list of config-value dicts (over the toy preset)")
    parser.add_argument("--seeds", default="188,288", help="answer-set seeds (fewer than the protocol's five: faster)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="tune-")
    print(f"{args.method} on {args.target}, seeds {seeds}, torch threads {args.threads}, runs in {out}")
    for n, values in enumerate(json.loads(args.candidates)):
        config = BenchConfig(methods=[args.method], targets=[args.target], out=f"{out}/{n}", seeds=seeds,
                             overrides={args.method: values})  # fmt: skip
        result = Bench(config, progress=False).run()
        if not result["rows"]:
            print(f"{values}: failed: {result['failed']}")
            continue
        row = result["rows"][0]
        print(f"{json.dumps(values)}: UA {row['UA']:.1f} IRA {row['IRA']:.1f} CRA {row['CRA']:.1f} "
              f"FID {row['FID']:.2f} time {row['time_s']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
