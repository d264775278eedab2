"""Run by test_bench under `accelerate launch`: a two-job bench, one job per process."""

import sys

import torch

from canvas import bench

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, out = sys.argv[1], sys.argv[2]
    config = bench.BenchConfig(
        methods=["esd"], targets=["Pop_Art", "Cats"], out=out, model=model, catalog="toy", sampler="toy",
        seeds=[188], overrides={"esd": {"steps": 2, "ddim_steps": 2, "lr": 1e-3}}, presets={"esd": "paper"},
    )  # fmt: skip
    bench.Bench(config, progress=False).run()
