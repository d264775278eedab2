"""How hard EraseDiff's forget term pulls on each target at the base model, with the bench's own inputs and preset.

EraseDiff's step follows ∇L_retain + α·∇f (f̄ is a constant; erase/methods/erasediff.py). Before any training, this
measures per target the relabelling gap f = ‖e(x_t, c_f) − e(x_t, c')‖² on its forget images (c' its pseudo prompt),
the retain loss, the gradient norms ‖∇f‖ and ‖∇L_retain‖ over the preset's trained tensors, their cosine, and so the
forget term's share of the step at α 0.1 and 1. It trains and chooses nothing, so it looks at tuning and held-out
targets alike: whether the targets the preset leaves half-erased are those the forget term pulls least on.

    python scripts/erasediff_pressure.py --threads 1 --targets objects --work /work/erasediff-pressure
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from canvas import catalog as catalogs
from canvas import splits
from canvas.bench import BenchConfig, job_config
from erase import load_pipeline
from erase.images import denoising_target, encoded_image_set, noised
from erase.params import select_in
from erase.text import PromptEncoder

COLUMNS = ("f", "L_retain", "‖∇f‖", "‖∇L_retain‖", "0.1·‖∇f‖ / ‖∇L_retain‖", "‖∇f‖ / ‖∇L_retain‖", "cos(∇f, ∇L_retain)")


def flat(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.cat([g.float().flatten() for g in grads if g is not None])


def pressure(pipe, encode: PromptEncoder, config, batches: int, batch_size: int) -> dict[str, float]:
    """Means over `batches` draws (generator seeds 0..batches-1) of `batch_size` forget and retain samples each,
    drawn as EraseDiff's loss draws them (a forget image, its prompts, a retain image, t uniform)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    params = list(select_in(pipe, config.parameter_set()).values())
    forget, f_prompts = encoded_image_set(pipe, "forget_images", config.forget_images, config.forget_prompts)
    retain, r_prompts = encoded_image_set(pipe, "retain_images", config.retain_images, config.retain_prompts)
    pseudo = config.pseudo_prompts
    sums = dict.fromkeys(("f", "retain", "gf", "gr", "cos"), 0.0)
    for b in range(batches):
        g = torch.Generator().manual_seed(b)
        j = torch.randint(len(forget), (batch_size,), generator=g).tolist()
        k = torch.randint(len(retain), (batch_size,), generator=g).tolist()
        x_t, t, _ = noised(scheduler, forget[j], g)
        r_x, r_t, noise = noised(scheduler, retain[k], g)
        with torch.no_grad():
            target = unet(x_t, t, encoder_hidden_states=encode([pseudo[i] for i in j])).sample
        f = F.mse_loss(unet(x_t, t, encoder_hidden_states=encode([f_prompts[i] for i in j])).sample, target)
        prediction = unet(r_x, r_t, encoder_hidden_states=encode([r_prompts[i] for i in k])).sample
        r = F.mse_loss(prediction, denoising_target(scheduler, retain[k], noise, r_t))
        gf = flat(torch.autograd.grad(f, params, allow_unused=True))
        gr = flat(torch.autograd.grad(r, params, allow_unused=True))
        sums["f"] += f.item()
        sums["retain"] += r.item()
        sums["gf"] += gf.norm().item()
        sums["gr"] += gr.norm().item()
        sums["cos"] += F.cosine_similarity(gf, gr, dim=0).item()
    m = {key: value / batches for key, value in sums.items()}
    return dict(zip(COLUMNS, (m["f"], m["retain"], m["gf"], m["gr"], 0.1 * m["gf"] / m["gr"], m["gf"] / m["gr"],
                              m["cos"])))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="objects", help="targets or keywords, as canvas bench takes them")
    parser.add_argument("--preset", help="EraseDiff preset (default: the bench's for each target's kind)")
    parser.add_argument("--work", required=True, help="folder for the toy's renders (the bench's data/toy)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = BenchConfig(methods=["erasediff"], targets=[args.targets], out=args.work,
                        presets={"erasediff": args.preset} if args.preset else {})  # fmt: skip
    cat = catalogs.get(bench.catalog)
    pipe = load_pipeline(bench.model)
    encode = PromptEncoder.of(pipe, strict=True)
    print(f"| target | split | {' | '.join(COLUMNS)} |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for target in bench.targets:
        values = pressure(pipe, encode, job_config(bench, "erasediff", target), args.batches, args.batch_size)
        split = splits.target_split(cat, target)
        print(f"| {target} | {split} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |")


if __name__ == "__main__":
    main()
