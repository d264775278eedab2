"""ESD step time against the authors' code's compute, and memory against a two-UNet design, on the same model.

    python scripts/bench_esd.py [--model toy|sd-shaped|sdxl-shaped] [--steps 20] [--ddim-steps 25] [--pool 2]
        [--threads 1]

Official: the bare UNet passes one step of the authors' code needs (the partial DDIM run, the two frozen target
passes, the trained forward and backward, a deep-copied frozen UNet), timed with the same random draws and no
toolkit code around them; the floor of our default ESD step. Pool: our ESD with `trajectory_pool` (one refill of
--pool trajectories serves pool x ddim_steps steps; timed over whole refills).
Memory: parameter + gradient + optimizer + frozen-copy bytes, counted from the live tensors, for our design (one
UNet, the trained tensors' originals substituted by functional_call) and the public code's (a deep-copied UNet).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

import erase
from erase import conditioning
from erase.frozen import FrozenOriginal
from erase.params import select
from erase.sampling import ddim_partial, ddim_scheduler, randn, sample_seed
from erase.testing import sd_shaped_pipeline, sdxl_shaped_pipeline
from erase.text import PromptEncoder

SHAPED = {"sd-shaped": sd_shaped_pipeline, "sdxl-shaped": sdxl_shaped_pipeline}


def load(model: str):
    if model in SHAPED:
        pipe = SHAPED[model]()
        conditioning.install(pipe)  # SDXL: the packed prompt embedding's added conditions (no-op for SD)
        return pipe
    return erase.load_pipeline(model)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v for v in s.values() if torch.is_tensor(v)) for s in opt.state.values())


def floor_step(unet, two_unet, emb, empty, scheduler, shape, stop, generator, optimizer):
    """The bare UNet work of one ESD step with `stop` DDIM steps, on a plain (deep-copied) frozen UNet."""
    noise = randn((1, *shape), generator, unet.device, unet.dtype)

    def frozen_noise(x, t, e):
        return two_unet(x, t, encoder_hidden_states=e).sample

    x_t, t = ddim_partial(frozen_noise, scheduler, noise, emb, empty, 3.0, stop)
    tt = torch.tensor([t])
    with torch.no_grad():
        both = frozen_noise(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([empty, emb]))
    e_u, e_c = both.chunk(2)
    target = e_u - 2.0 * (e_c - e_u)
    loss = F.mse_loss(unet(x_t, tt, encoder_hidden_states=emb).sample, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--pool", type=int, default=2, help="trajectories per refill of the pool run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    print(f"model {args.model}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
          f"{args.steps} steps, ddim_steps {args.ddim_steps}, torch threads {args.threads}")  # fmt: skip

    # Ours: the toolkit's ESD run.
    config = erase.make_config("esd", concepts=["a painting"], steps=args.steps, lr=1e-5, ddim_steps=args.ddim_steps,
                               negative_guidance=2.0)  # fmt: skip
    result = erase.run(pipe, config, progress=False)
    ours_step = result.record["wall_time_s"] / args.steps

    # Ours with the trajectory pool, over whole refills (at least --steps steps).
    per_refill = args.pool * args.ddim_steps
    pool_steps = per_refill * max(1, -(-args.steps // per_refill))
    pooled = erase.run(load(args.model), dataclasses.replace(config, steps=pool_steps, trajectory_pool=args.pool),
                       progress=False)  # fmt: skip
    pool_step = pooled.record["wall_time_s"] / pool_steps

    # Floor: identical draws (the same stop indices and noise), bare UNet passes on a deep-copied frozen UNet.
    fresh = load(args.model)
    two_unet = copy.deepcopy(fresh.unet).requires_grad_(False)
    params = select(fresh.unet, "xattn")
    fresh.unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=1e-5)
    encode = PromptEncoder.of(fresh)
    emb, empty = encode("a painting"), encode("")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    scheduler = ddim_scheduler(pipe.scheduler.config, args.ddim_steps)
    start = time.perf_counter()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(sample_seed(config.seed, step, 0))
        torch.randint(1, (1,), generator=g)  # the concept draw
        stop = int(torch.randint(args.ddim_steps, (1,), generator=g))
        floor_step(fresh.unet, two_unet, emb, empty, scheduler, shape, stop, g, optimizer)
    floor = (time.perf_counter() - start) / args.steps

    # Memory accounting from live tensors: parameters + frozen copy + gradients + optimizer state.
    model_bytes = tensor_bytes(unet.parameters())
    frozen = FrozenOriginal(unet, list(select(unet, "xattn")))
    trained = select(unet, "xattn")
    trained_bytes = tensor_bytes(trained.values())
    shared = trained_bytes + optimizer_bytes(optimizer)  # gradients + Adam state: the same in both designs
    ours_mem = model_bytes + frozen.nbytes + shared
    two_mem = 2 * model_bytes + shared
    print(f"seconds per iteration at {torch.get_num_threads()} torch threads: default {ours_step:.3f}, pool "
          f"{pool_step:.3f} ({args.pool} trajectories/refill, {pool_steps} steps), official {floor:.3f}")  # fmt: skip
    print(f"ratios: default/official {ours_step / floor:.3f} (target <= 1.15), pool/official {pool_step / floor:.3f} "
          f"(target <= 0.2)")  # fmt: skip
    print(f"esd-x parameter+optimizer memory: ours {ours_mem / 2**20:.1f} MiB, two-UNet {two_mem / 2**20:.1f} MiB, "
          f"ratio {ours_mem / two_mem:.3f} (target <= 0.6)")  # fmt: skip
    print(f"peak RSS of our run: {result.record['peak_memory_bytes'] / 2**20:.1f} MiB; "
          f"losses median {statistics.median(result.record['losses']):.4g}")  # fmt: skip


if __name__ == "__main__":
    main()
