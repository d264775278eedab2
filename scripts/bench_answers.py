"""Answer-set generation speed: canvas.answers (erase.sampling.generate's direct loop, cached prompt embeddings)
at each torch thread count, and optionally a plain diffusers loop (one pipeline call per image, batch 1) over the
same prompts, seeds and sampler.

    python scripts/bench_answers.py [--model toy] [--images 440] [--batch-size 32] [--threads 1,2] [--plain]

Prints, per thread count and repeat, images/s (wall clock), CPU seconds per image (all threads of this process:
with other work on the cores, wall clock suffers and CPU time much less) and the load average before the run.
It uses only APIs that predate the direct loop, so it also times an older checkout (set PYTHONPATH to it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from diffusers import DDIMScheduler

import erase
from canvas import answers, catalog


def _threads(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--threads must be comma-separated positive integers (e.g. 1,2), got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--threads must be comma-separated positive integers (e.g. 1,2), got {text!r}")
    return counts


def time_answers(pipe, items, cat, sampler, batch_size: int) -> tuple[float, float]:
    """(images/s wall clock, CPU seconds per image) of generating `items` into a fresh folder."""
    with tempfile.TemporaryDirectory() as out:
        wall, cpu = time.perf_counter(), time.process_time()
        answers.generate(pipe, items, cat, out, sampler, batch_size=batch_size, shard=(0, 1), progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(items) / wall, cpu / len(items)


def time_plain(pipe, items, cat, sampler) -> float:
    """Images/s of one plain diffusers pipeline call per image."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    start = time.perf_counter()
    for it in items:
        pipe(cat.prompt(it.theme, it.object), num_inference_steps=sampler.steps, guidance_scale=sampler.guidance,
             generator=torch.Generator().manual_seed(it.seed), output_type="pil")  # fmt: skip
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--catalog", default="toy")
    parser.add_argument("--sampler", default="toy")
    parser.add_argument("--images", type=int, default=0, help="how many answer-set items to time (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per thread count")
    parser.add_argument("--plain", action="store_true", help="also time a plain diffusers loop (slow)")
    args = parser.parse_args()
    threads = _threads(args.threads)
    cat, sampler = catalog.get(args.catalog), answers.preset(args.sampler)
    pipe = erase.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    items = answers.answer_items(cat)
    items = items[: args.images] if args.images else items
    print(f"model {args.model} ({erase.__file__}), {len(items)} images, {sampler.steps} DDIM steps, guidance "
          f"{sampler.guidance}, batch {args.batch_size}, {os.cpu_count()} CPUs")  # fmt: skip
    answers.generate(pipe, items[:2], cat, tempfile.mkdtemp(), sampler, batch_size=2, shard=(0, 1), progress=False)
    for count in threads:
        torch.set_num_threads(count)
        for run in range(args.repeat):
            load = os.getloadavg()[0]
            rate, cpu = time_answers(pipe, items, cat, sampler, args.batch_size)
            print(f"threads {torch.get_num_threads()} run {run + 1}: {rate:.2f} images/s, {cpu * 1000:.1f} CPU ms "
                  f"per image (load average before: {load:.2f})", flush=True)  # fmt: skip
        if args.plain:
            print(f"threads {count} plain diffusers loop: {time_plain(pipe, items, cat, sampler):.2f} images/s")


if __name__ == "__main__":
    main()
