"""Answer-set generation speed: canvas.answers (batched, cached prompt embeddings) against a plain diffusers loop
(one pipeline call per image, batch 1) over the same prompts, seeds and sampler.

    python scripts/bench_answers.py [--model toy] [--images 88] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import DDIMScheduler

import erase
from canvas import answers, catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--catalog", default="toy")
    parser.add_argument("--sampler", default="toy")
    parser.add_argument("--images", type=int, default=88, help="how many answer-set items to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat, sampler = catalog.get(args.catalog), answers.preset(args.sampler)
    pipe = erase.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    items = answers.answer_items(cat)[: args.images]
    print(f"model {args.model}, {len(items)} images, {sampler.steps} DDIM steps, guidance {sampler.guidance}, "
          f"torch threads {args.threads}")  # fmt: skip

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        answers.generate(pipe, items, cat, out, sampler, batch_size=args.batch_size, shard=(0, 1), progress=False)
        ours = len(items) / (time.perf_counter() - start)

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    start = time.perf_counter()
    for it in items:
        pipe(cat.prompt(it.theme, it.object), num_inference_steps=sampler.steps, guidance_scale=sampler.guidance,
             generator=torch.Generator().manual_seed(it.seed), output_type="pil")  # fmt: skip
    plain = len(items) / (time.perf_counter() - start)
    print(f"canvas.answers: {ours:.2f} images/s (batch {args.batch_size}); plain diffusers loop: {plain:.2f} "
          f"images/s; speed-up {ours / plain:.2f}x (target >= 2x)")  # fmt: skip
    full = len(answers.answer_items(cat))
    print(f"whole answer set ({full} images): {full / ours:.0f} s with canvas.answers")


if __name__ == "__main__":
    main()
