"""Relearning curves on the toy: erase one target with a method's toy preset, then canvas.relearning's three curves.

    python scripts/relearn_toy.py --target Pop_Art --method uce --out runs/relearn --lr 1e-3 --batch 4

Prints each curve's target rate per k, the thread count and the wall time. Tune relearning settings on the tuning
targets only (canvas.splits.tuning_targets("toy")).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import erase
from canvas import catalog as catalogs
from canvas.judge import Judge
from canvas.method_inputs import concept_text
from canvas.relearning import relearning_curves
from erase.delta import Delta
from erase.relearn import Relearning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="Pop_Art")
    parser.add_argument("--method", default="uce")
    parser.add_argument("--out", required=True)
    parser.add_argument("--schedule", default="5,10,25,50")
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--params", default=None)
    parser.add_argument("--seeds", default="188,288")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cat = catalogs.get("toy")
    out = Path(args.out)
    delta_dir = out / f"delta-{args.method}-{args.target}"
    if not (delta_dir / "delta.json").is_file():
        pipe = erase.load_pipeline("toy")
        config = erase.make_config(args.method, "toy", concepts=[concept_text(cat, args.target)])
        erase.run(pipe, config, progress=False).delta.save(delta_dir)
    base = erase.load_pipeline("toy")
    base.set_progress_bar_config(disable=True)
    overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch), ("params", args.params)) if v}
    settings = Relearning.from_preset(args.preset, **overrides)
    schedule = [int(k) for k in args.schedule.split(",")]
    result = relearning_curves(
        base, Delta.load(delta_dir), cat, args.target, schedule, out=out / f"curves-{args.method}-{args.target}",
        judge=Judge(cat), settings=settings, seeds=[int(s) for s in args.seeds.split(",")],
    )  # fmt: skip
    print(f"{args.method} erasing {args.target}; relearning {settings}")
    print("curve      " + "".join(f"{k:>7}" for k in result["schedule"]))
    for curve, record in result["curves"].items():
        rates = [record.get("points", {}).get(str(k), {}).get("rate") for k in result["schedule"]]
        cells = "".join(f"{r:7.2f}" if r is not None else "      -" for r in rates)
        print(f"{curve:<10} {cells}  {record['status']} {record.get('error', '')}")
    print(f"threads {torch.get_num_threads()}, wall {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
