"""How far FMN's objective can go on each toy target: its images with cross-attention to token positions blocked.

FMN trains the UNet to stop attending to the concept's tokens (and, with the official loss's pooler positions, the
EOS/padding tokens). Its best case is attention there being exactly zero. This script measures that best case: it
generates each target's benchmark prompts with those key positions masked in every cross-attention layer
(`encoder_attention_mask`, conditional branch only) and judges how many images still show the target. A target that
survives the mask is read from other tokens, so attention at FMN's positions is not what carries it; FMN then
erases it only through side effects of its weight changes on the other tokens. The measurement needs no training,
so it looks at every target, tuning and held-out alike, without choosing anything.

    python scripts/fmn_ceiling.py --threads 1 --out docs/results/fmn-ceiling.md
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable

import torch

from canvas import answers, metrics
from canvas import catalog as catalogs
from canvas.judge import Judge
from canvas.method_inputs import target_words
from erase import load_pipeline
from erase.atomic import write_text
from erase.methods.fmn import loss_positions
from erase.text import token_positions

# Which key positions each variant masks, given (tokenizer, prompt, concept words).
Variant = Callable[[object, str, str], list[int]]


def after_concept(tokenizer, prompt: str, concept: str) -> list[int]:
    """The concept's tokens and every position after them (the rest of the prompt, EOS and padding)."""
    start = token_positions(tokenizer, prompt, concept)[0]
    return list(range(start, tokenizer.model_max_length))


VARIANTS: dict[str, Variant] = {
    "none": lambda tok, prompt, concept: [],
    "concept": lambda tok, prompt, concept: loss_positions(tok, prompt, concept, pooler=False),
    "concept + EOS/padding (FMN's loss)": lambda tok, prompt, concept: loss_positions(tok, prompt, concept, True),
    "concept and everything after it": after_concept,
}


def masked_images(pipe, prompts: list[str], seeds: list[int], positions: list[list[int]], sampler) -> torch.Tensor:
    """Answer-protocol images of `prompts` with the conditional branch blind to `positions` (one batch)."""
    length = pipe.tokenizer.model_max_length
    keep = torch.ones(len(prompts), length)
    for row, blocked in enumerate(positions):
        keep[row, blocked] = 0.0
    mask = torch.cat([torch.ones_like(keep), keep])  # the loop stacks [uncond, cond]

    def inject(module, args, kwargs):
        kwargs["encoder_attention_mask"] = mask.to(kwargs["encoder_hidden_states"].device)
        return args, kwargs

    handle = pipe.unet.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        return answers.sample(pipe, prompts, seeds, sampler, batch_size=len(prompts))
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="188,288,388")
    parser.add_argument("--out", default="docs/results/fmn-ceiling.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cat = catalogs.get("toy")
    pipe = load_pipeline("toy")
    judge = Judge(cat)
    sampler = answers.preset("toy")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    rows = []
    for target in [*(t for t in cat.themes if t != cat.photo), *cat.objects]:
        style = cat.is_style(target)
        words = target_words(cat, target)
        keys = [(target, o, s) for o in cat.objects for s in seeds] if style else [
            (t, target, s) for t in cat.themes for s in seeds]  # fmt: skip
        prompts = [cat.prompt(t, o) for t, o, _ in keys]
        image_seeds = [answers.image_seed(*k) for k in keys]
        label = cat.style_label(target) if style else cat.object_label(target)
        shown = {}
        for name, variant in VARIANTS.items():
            positions = [variant(pipe.tokenizer, p, words) for p in prompts]
            images = masked_images(pipe, prompts, image_seeds, positions, sampler)
            style_logits, object_logits, _ = judge(images)
            predicted = metrics.as_labels(style_logits if style else object_logits)
            shown[name] = 100.0 * float((predicted == label).float().mean())
        rows.append((target, len(keys), shown))
        print(target, {k: f"{v:.0f}" for k, v in shown.items()}, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# FMN's ceiling on the toy: targets with cross-attention to token positions blocked",
        "",
        f"Command: `python scripts/fmn_ceiling.py --threads {args.threads} --seeds {args.seeds}`; commit {commit}; "
        f"torch threads {args.threads}; {time.perf_counter() - started:.0f} s.",
        "",
        f"Each cell: % of the target's benchmark-prompt images (a style with every object, an object in every theme; "
        f"seeds {args.seeds}) its classifier still calls the target, when every cross-attention layer's conditional "
        "branch cannot attend to the named positions. FMN's loss drives attention at its positions toward zero: the "
        "third column is what that alone leaves of the target.",
        "",
        "| target | images | " + " | ".join(VARIANTS) + " |",
        "|---" * (len(VARIANTS) + 2) + "|",
    ]
    lines += [f"| {t} | {n} | " + " | ".join(f"{shown[k]:.0f}" for k in VARIANTS) + " |" for t, n, shown in rows]
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
