"""SKD-CAG against plain SKD (λ = 0) on the same model: time and peak memory per step, and the Delta's storage.

    python scripts/bench_skd_cag.py [--model toy|sd-shaped|tiny] [--steps 30] [--threads 1] [--reference noise]
                                    [--preserve-weight 0]   # > 0 adds our L_keep term to both runs

The cost of the attention term: SKD-CAG captures every attn2 layer's probabilities (an explicit-softmax processor
instead of the fused kernel) for the teacher and the student, aggregates and normalises them, and backpropagates
through them; plain SKD runs the teacher and student passes with the default attention. Both train the same
parameter set ("xattn" unless --params), so the Delta's storage is the same by construction; it is measured anyway.
Time per step: the median over steps after the first (warm-up). Peak memory: the run record's (peak RSS on CPU,
max allocated on CUDA), each run in a fresh process state (peak RSS reset, see erase.meter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import erase
from erase.catalog import get as get_catalog
from erase.methods import METHODS
from erase.testing import sd_shaped_pipeline, tiny_pipeline


def load(model: str):
    if model == "toy":
        pipe = erase.load_pipeline("toy")
    elif model == "sd-shaped":
        pipe = sd_shaped_pipeline()
    else:
        pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def captions(model: str) -> list[str]:
    if model == "toy":
        return get_catalog("toy").prompts()
    return ["a photo of a cat", "a dog", "a painting of a cat"]


class StepTimer:
    """Wall time of each optimizer step, from the loss function's calls (one per step at grad_accum 1)."""

    def __init__(self):
        self.stamps: list[float] = []

    def wrap(self, make_loss):
        def factory(ctx):
            loss_fn = make_loss(ctx)

            def timed(model, generators):
                self.stamps.append(time.perf_counter())
                return loss_fn(model, generators)

            return timed

        return factory


def run_one(model: str, attention_weight: float, args) -> dict:
    pipe = load(model)
    config = erase.make_config(
        "skd-cag", trigger=args.trigger, captions=captions(model), steps=args.steps, lr=1e-4,
        attention_weight=attention_weight, reference=args.reference, params=args.params, batch_size=args.batch_size,
        preserve_weight=args.preserve_weight,
    )  # fmt: skip
    timer = StepTimer()
    spec = METHODS["skd-cag"]
    METHODS["skd-cag"] = dataclasses.replace(spec, make_loss=timer.wrap(spec.make_loss))  # the same method, timed
    try:
        record = erase.run(pipe, config, progress=False).record
    finally:
        METHODS["skd-cag"] = spec
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    return {
        "method": "SKD-CAG" if attention_weight > 0 else "SKD (λ=0)",
        "step_s_median": statistics.median(gaps[1:] or gaps),
        "wall_time_s": record["wall_time_s"],
        "peak_memory_MiB": record["peak_memory_bytes"] / 2**20,
        "memory_kind": record["memory_kind"],
        "delta_MiB": record["storage_bytes"] / 2**20,
        "changed_tensors": record["changed_tensors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", choices=("toy", "sd-shaped", "tiny"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--params", default="xattn")
    parser.add_argument("--reference", default="noise")
    parser.add_argument("--preserve-weight", type=float, default=0.0, help="μ of L_keep (0: the paper's loss)")
    parser.add_argument("--trigger", help="default: 'New Trigger' on the toy, 'tq' on the 16-token test tokenizers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.trigger = args.trigger or ("New Trigger" if args.model == "toy" else "tq")
    rows = [run_one(args.model, 0.0, args), run_one(args.model, 0.5, args)]
    print(f"model {args.model}, {args.steps} steps, batch {args.batch_size}, params {args.params}, "
          f"μ {args.preserve_weight}, {args.threads} thread(s)")  # fmt: skip
    print("| method | time/step (s) | peak memory (MiB) | Delta (MiB) | tensors |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['step_s_median']:.4f} | {r['peak_memory_MiB']:.0f} ({r['memory_kind']}) | "
              f"{r['delta_MiB']:.3f} | {r['changed_tensors']} |")  # fmt: skip
    print(f"attention term: x{rows[1]['step_s_median'] / rows[0]['step_s_median']:.2f} time per step")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
