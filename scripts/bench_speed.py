"""Seconds SPEED's edit takes for 10 / 100 / 500 concepts on an SD-v1-shaped K/V set (32 attn2 to_k/to_v matrices,
320-1280 x 768), from token vectors already encoded.

    python scripts/bench_speed.py [--counts 10,100,500] [--priors 1000] [--threads 1]

Wall and CPU seconds are both printed: on a shared machine the CPU figure is the one to compare. The text encoder's
cost is not in the figure (it is one batched forward pass per `encode_batch` prompts, the same for
any method that reads prompts); everything after it is: the d x d statistics, then per matrix IPF, DPA, the priors'
eigendecomposition and the solve (erase.methods.speed.speed_deltas). The vectors are synthetic but CLIP-like: a
shared mean direction, norm ~28, and priors of low effective rank (real CLIP priors leave a null space the same way).
"""

from __future__ import annotations

import argparse
import time

import torch

from erase.methods.speed import SPEEDConfig, SPEEDStatistics, speed_deltas

# SD v1's 16 cross-attention blocks (down 320, 320, 640, 640, 1280, 1280; mid 1280; up 1280 x3, 640 x3, 320 x3).
SD_V1_ATTN2_OUT = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
DIM = 768


def kv_set(generator: torch.Generator) -> dict[str, torch.Tensor]:
    weights = {}
    for i, out in enumerate(SD_V1_ATTN2_OUT):
        for kind in ("to_k", "to_v"):
            weights[f"block{i}.attn2.{kind}.weight"] = torch.randn(out, DIM, generator=generator).double() * 0.02
    return weights


def vectors(count: int, rank: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`count` CLIP-like token vectors: a shared mean, `rank` common factors and isotropic noise of std `noise`."""
    mean = torch.full((DIM,), 0.5).double()
    basis = torch.randn(rank, DIM, generator=generator).double() / DIM**0.5
    coeff = torch.randn(count, rank, generator=generator).double() * 20 / rank**0.5
    return mean + coeff @ basis * DIM**0.5 / 2 + noise * torch.randn(count, DIM, generator=generator).double()


def sample(concepts: int, priors: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Encoded-like vectors: erased (each with directions of its own), one shared anchor, priors, the empty prompt."""
    return {
        "erased": vectors(concepts, 300, 0.5, generator),
        "anchor": vectors(1, 300, 0.5, generator),
        "priors": vectors(priors, 200, 1e-3, generator),
        "empty": vectors(16, 20, 0.01, generator),
    }


def statistics(v: dict[str, torch.Tensor]) -> SPEEDStatistics:
    """The d x d sums of the closed form (what erase.methods.speed.speed_statistics forms after encoding)."""
    erased, count = v["erased"], len(v["erased"])
    return SPEEDStatistics(
        concepts=[f"c{i}" for i in range(count)],
        erase=erased.T @ erased / count,
        shift=(v["anchor"] - erased).T @ erased / count,
        erased=erased,
        owner=torch.arange(count),
        priors=v["priors"],
        invariants=v["empty"][:4],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,500")
    parser.add_argument("--priors", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = kv_set(generator)
    config = SPEEDConfig(concepts=["x"], params="kv")  # the released defaults: IPF, DPA x10, threshold 0.1, α 1
    print(f"SD-v1-shaped K/V set: {len(weights)} matrices, d={DIM}; {args.priors} priors; torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    for count in (int(c) for c in args.counts.split(",")):
        encoded = sample(count, args.priors, generator)
        start, cpu = time.perf_counter(), time.process_time()
        deltas = speed_deltas(weights, statistics(encoded), config)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        moved = sum(float(d.norm()) for d in deltas.values())
        print(f"{count:5d} concepts: {seconds:6.2f} s wall, {cpu:6.2f} s CPU  (sum of |delta| {moved:.3g})")


if __name__ == "__main__":
    main()
