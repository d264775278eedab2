"""Efficiency of one erasure per method, printed as UnlearnCanvas's columns: Time (s), Memory (GB), Storage (GB).

    python scripts/bench_methods.py [--methods uce,fmn] [--models tiny,sd-shaped,toy] [--threads 1]

Time is the run's wall clock and Memory its peak (CUDA max allocated, or peak RSS on CPU), both from the run
record (erase.meter.Meter); Storage is the saved Delta's tensor bytes, shown beside the bytes of the tensors the
method actually changed (the target: equal). Each method has its own `<name>_config(model, workdir)` function below:
add a method by adding one function and one row in CONFIGS.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import erase
from canvas.toy import render
from erase.catalog import TOY_OBJECTS, TOY_STYLES
from erase.methods.uce import uce_statistics, uce_update
from erase.testing import sd_shaped_pipeline, tiny_pipeline, word_tokenizer

TOY_STYLE, TOY_STYLE_WORDS = "Pop_Art", "Pop Art"


def load(model: str):
    if model == "tiny":
        return tiny_pipeline()
    if model == "sd-shaped":
        return sd_shaped_pipeline()
    return erase.load_pipeline(model)


def random_images(folder: Path, n: int, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


def toy_style_images(folder: Path) -> Path:
    """UnlearnCanvas's FMN choice on the toy: image 1 of every object in the target style, rendered."""
    folder.mkdir(parents=True, exist_ok=True)
    for obj in TOY_OBJECTS:
        render(TOY_STYLE, obj, 1).save(folder / f"{obj}.png")
    return folder


def uce_config(model: str, workdir: Path):
    if model == "toy":
        return erase.make_config("uce", preset="toy", concepts=[f"An image in {TOY_STYLE_WORDS} style"])
    return erase.make_config("uce", preset="paper", concepts=["van gogh"], guides=["painting"], preserve=["cat"])


def fmn_config(model: str, workdir: Path):
    if model == "toy":
        return erase.make_config("fmn", preset="toy", concepts=[TOY_STYLE_WORDS],
                                 images=str(toy_style_images(workdir / "fmn-toy")))  # fmt: skip
    return erase.make_config("fmn", preset="paper", concepts=["van gogh"], prompts=["a {concept} painting"],
                             images=str(random_images(workdir / "fmn-random", 10)))  # fmt: skip


def ca_config(model: str, workdir: Path):
    """Anchor images are generated into a fresh cache, so the time includes generating them (a first run)."""
    if model == "toy":
        return erase.make_config("ca", preset="toy", concepts=[TOY_STYLE_WORDS], cache_dir=str(workdir / "ca-cache"))
    return erase.make_config("ca", preset="paper", concepts=["van gogh painting"], anchors=["painting"],
                             anchor_prompts=["a painting of a cat"], cache_dir=str(workdir / "ca-cache"))  # fmt: skip


def toy_split_images(folder: Path, styles: list[str], indices=(1, 2, 3)) -> Path:
    """UnlearnCanvas's forget/retain sets on the toy: images 1-3 of every object, as <Style>/<Object>/<idx>.png."""
    for style in styles:
        for obj in TOY_OBJECTS:
            (folder / style / obj).mkdir(parents=True, exist_ok=True)
            for idx in indices:
                render(style, obj, idx).save(folder / style / obj / f"{idx}.png")
    return folder


def salun_config(model: str, workdir: Path):
    if model == "toy":
        others = [s for s in TOY_STYLES if s != TOY_STYLE][:2]
        forget = toy_split_images(workdir / "forget", [TOY_STYLE])
        retain = toy_split_images(workdir / "retain", others)
    else:
        forget = random_images(workdir / "forget" / "Van_Gogh" / "cat", 8)
        retain = random_images(workdir / "retain" / "Monet" / "dog", 8)
    return erase.make_config("salun", preset="toy" if model == "toy" else "paper", forget_images=str(forget),
                             retain_images=str(retain))  # fmt: skip


CONFIGS: dict[str, Callable] = {"uce": uce_config, "fmn": fmn_config, "ca": ca_config, "salun": salun_config}


SD_KV_CHANNELS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)  # 16 attn2


def uce_sd_scale(n_concepts: int, text_layers: int) -> dict:
    """UCE with SD v1's K/V shapes (32 matrices, 768-d text, 77 tokens) and a random CLIP-L-width text encoder of
    `text_layers` layers (CLIP-L has 12): the closed form's cost at SD scale without building an 860 M UNet."""

    words = ("a", "photo", "of", "cat", "dog", "style", "van", "gogh", "painting", "in", "image", "art")
    tokenizer = word_tokenizer(words, model_max_length=77)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    weights = [torch.randn(c, 768) * 0.02 for c in SD_KV_CHANNELS for _ in range(2)]
    concepts = [f"{a} {b} {c}" for a in words for b in words for c in words][:n_concepts]
    config = erase.make_config("uce", preset="original-code", concepts=concepts, guides=["art"], preserve=["a photo"])
    start = time.perf_counter()
    stats = uce_statistics(SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder), config)
    encoded = time.perf_counter()
    update = uce_update(stats, config.lam, config.erase_scale, config.effective_preserve_scale())
    with torch.no_grad():
        edited = [w + w @ update.float() for w in weights]  # as erase() does
    end = time.perf_counter()
    assert all(torch.isfinite(e).all() for e in edited)
    return {"concepts": n_concepts, "text_layers": text_layers, "tokens": stats.erase_tokens,
            "encode_s": encoded - start, "solve_edit_s": end - encoded, "total_s": end - start}  # fmt: skip


def bench_one(method: str, model: str, workdir: Path) -> dict:
    pipe = load(model)
    pipe.set_progress_bar_config(disable=True)
    config = CONFIGS[method](model, workdir)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = erase.run(pipe, config, progress=False)
    changed = [p for n, p in pipe.unet.named_parameters() if not torch.equal(before[n], p)]
    touched = sum(p.numel() * p.element_size() for p in changed)
    path = workdir / f"{method}-{model}"
    result.delta.save(path)
    record = result.record
    return {
        "method": method, "model": model, "time_s": record["wall_time_s"],
        "memory_gb": record["peak_memory_bytes"] / 1e9, "memory_kind": record["memory_kind"],
        "storage_gb": record["storage_bytes"] / 1e9, "touched_bytes": touched,
        "storage_bytes": record["storage_bytes"], "file_bytes": sum(f.stat().st_size for f in path.iterdir()),
        "steps": len(record["losses"]), "last_loss": record["losses"][-1] if record["losses"] else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--models", default="tiny,sd-shaped,toy", help="tiny, sd-shaped, toy or a model path")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--uce-sd-scale", action="store_true", help="also time UCE at SD v1 K/V scale (see below)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown:
        parser.error(f"no benchmark config for {unknown}; have {', '.join(CONFIGS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"torch threads {torch.get_num_threads()}, device cpu")
    header = (f"{'method':8s} {'model':10s} {'Time (s)':>9s} {'Memory (GB)':>12s} {'Storage (GB)':>13s} "
              f"{'storage B':>11s} {'touched B':>11s} {'file B':>10s} {'steps':>5s}  memory kind")  # fmt: skip
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            try:
                load(model)
            except Exception as err:  # the toy is absent until its build finishes: say so, go on
                print(f"{'-':8s} {model:10s} skipped: {type(err).__name__}: {err}")
                continue
            for method in methods:
                r = bench_one(method, model, Path(tmp))
                print(f"{r['method']:8s} {r['model']:10s} {r['time_s']:9.3f} {r['memory_gb']:12.3f} "
                      f"{r['storage_gb']:13.6f} {r['storage_bytes']:11d} {r['touched_bytes']:11d} "
                      f"{r['file_bytes']:10d} {r['steps']:5d}  {r['memory_kind']}")  # fmt: skip
    if args.uce_sd_scale:
        print("UCE at SD v1 scale (32 K/V matrices, 768-d, 77 tokens, through_eos), random text encoder:")
        for n_concepts, layers in ((1, 12), (10, 12), (300, 2)):
            r = uce_sd_scale(n_concepts, layers)
            print(
                f"  {r['concepts']:4d} concepts, {r['text_layers']:2d} text layers, {r['tokens']:6d} erased tokens: "
                f"encode {r['encode_s']:.2f} s, solve+edit {r['solve_edit_s']:.3f} s, total {r['total_s']:.2f} s"
            )


if __name__ == "__main__":
    main()
