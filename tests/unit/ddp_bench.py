"""Run by test_bench under torchrun: a two-job bench, one job per process."""

import sys
from pathlib import Path

import torch

from canvas import bench

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, out = sys.argv[1], sys.argv[2]
    config = bench.BenchConfig(
        methods=["esd"], targets=["Pop_Art", "Cats"], out=out, model=model, catalog="toy", sampler="toy",
        seeds=[188], overrides={"esd": {"steps": 2, "ddim_steps": 2, "lr": 1e-3}}, presets={"esd": "paper"},
    )  # fmt: skip
    runner = bench.Bench(config, progress=False)
    runner.run()
    state = runner.state  # which process this was, so the test sees that two took part
    (Path(out) / f"process{state.process_index}_of_{state.num_processes}").write_text("done")
