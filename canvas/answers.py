"""Answer sets: every theme x object x seed of a (possibly erased) model, generated one way for every method.

Images are named `{theme}_{object}_seed{seed}.jpg` as in UnlearnCanvas. Each image draws its initial noise from its
own CPU generator seeded with `image_seed(theme, object, seed)` (the first 8 bytes, big-endian, of the SHA-256 of
the JSON list `[theme, object, seed]`, shifted right by one bit to 63 bits), so the prompts of one seed start from
different noise, as UnlearnCanvas's samplers draw fresh noise per image, and an image's noise does not depend on
its batch, its shard or the process. Batches are fixed slices of the global item order, so any sharding or
resumption reproduces identical pixels (batch mates change an image only by float rounding, which the fixed slices
remove): shards take whole batches, and a batch with any missing or unreadable image is regenerated as a whole.
Folders record `ANSWER_VERSION` (2: per-image noise; 1, unrecorded: every prompt of a seed from the seed's noise);
one of another version is refused, never completed or scored as if identical. `sample` is the protocol (DDIM, eta
0, the preset's steps, guidance and size) on top of `erase.sampling.generate`; answer sets and the backdoor judge
(which seeds its generators with the seed alone) both draw through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from canvas.catalog import Catalog
from erase import sampling
from erase.atomic import save_image, write_json
from erase.delta import fingerprint
from erase.images import prediction_type
from erase.paths import toy_path
from erase.processes import process_state
from erase.text import PromptEncoder

SEEDS = (188, 288, 588, 688, 888)
MANIFEST = "manifest.json"
ANSWER_VERSION = 2  # 2: each image's noise from image_seed(theme, object, seed); 1: from the seed alone


@dataclass(frozen=True)
class SamplerPreset:
    """The generation protocol: DDIM with eta 0, `steps` steps, classifier-free guidance `guidance`."""

    name: str
    steps: int
    guidance: float
    size: int | None = None  # pixels; None: the model's default


PRESETS = {
    "unlearncanvas": SamplerPreset("unlearncanvas", steps=100, guidance=9.0, size=512),
}


def toy_preset() -> SamplerPreset:
    """The toy model's sampler, as its build measured it (assets/toy/card.json)."""
    card = toy_path() / "card.json"
    sampler = json.loads(card.read_text())["sampler"] if card.is_file() else {"steps": 25, "guidance": 3.0}
    return SamplerPreset("toy", steps=int(sampler["steps"]), guidance=float(sampler["guidance"]))


def preset(name: str) -> SamplerPreset:
    if name == "toy":
        return toy_preset()
    if name not in PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; accepted: toy, {', '.join(PRESETS)}")
    return PRESETS[name]


def sample(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerPreset,
    *,
    batch_size: int,
    output_type: sampling.OutputType = "pt",
    encoder: PromptEncoder | None = None,
):
    """Images of (prompt, seed) pairs with the benchmark's protocol: DDIM on the pipeline's own noise schedule, eta 0,
    the preset's steps, guidance and size, one generator per image. `encoder` (default: a new caching one) can be
    shared across calls so each prompt is encoded once. See `erase.sampling.generate` for the output types."""
    return sampling.generate(
        pipe,
        prompts,
        seeds,
        steps=sampler.steps,
        guidance=sampler.guidance,
        eta=0.0,
        size=sampler.size,
        scheduler=sampling.ddim_scheduler(pipe.scheduler.config),
        encoder=encoder if encoder is not None else PromptEncoder.of(pipe),
        batch_size=batch_size,
        output_type=output_type,
    )


def image_seed(theme: str, obj: str, seed: int) -> int:
    """The generator seed of one answer-set image: a stable 63-bit digest of (theme, object, seed), not Python's
    salted hash(), so every process and every run draws the same noise for it."""
    digest = hashlib.sha256(json.dumps([theme, obj, int(seed)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class AnswerItem:
    theme: str
    object: str
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.theme}_{self.object}_seed{self.seed}.jpg"

    @property
    def generator_seed(self) -> int:
        return image_seed(self.theme, self.object, self.seed)


def answer_items(
    catalog: Catalog, seeds: Sequence[int] = SEEDS, themes: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
) -> list[AnswerItem]:  # fmt: skip
    """Items in the global order (theme, object, seed) that fixes batching."""
    themes = list(themes) if themes is not None else list(catalog.themes)
    objects = list(objects) if objects is not None else list(catalog.objects)
    for theme in themes:
        catalog.style_label(theme)
    for obj in objects:
        catalog.object_label(obj)
    return [AnswerItem(t, o, int(s)) for t in themes for o in objects for s in seeds]


def parse_shard(text: str | None) -> tuple[int, int]:
    """`"i/n"` (0-based i) -> (i, n)."""
    if not text:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError):
        return False


@torch.no_grad()
def generate(
    pipe,
    items: Sequence[AnswerItem],
    catalog: Catalog,
    out_dir: str | os.PathLike,
    sampler: SamplerPreset,
    *,
    batch_size: int = 32,
    shard: tuple[int, int] | None = None,
    apply: Callable[[Any], Any] | None = None,
    progress: bool = True,
    manifest_extra: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
) -> Path:
    """Generate the answer set `items` of `pipe` into `out_dir` (resumable, shardable).

    `apply` is a context-manager factory run around generation (e.g. applying a Delta or an inference-time hook).
    Under `accelerate launch` with no explicit `shard`, each process takes its own shard. `identity` (what makes
    the images: model, delta, ...; see `answer_identity`) is written into the folder before any image, and a folder
    holding images of another identity is refused rather than completed or relabelled.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    prediction_type(pipe.scheduler)  # an unknown one is refused before the folder is claimed or an image drawn
    if shard is None:
        state = process_state()
        shard = (state.process_index, state.num_processes)
    index, count = shard
    out = Path(out_dir)
    claim(out, {"catalog": catalog.name, "sampler": asdict(sampler), "answer_version": ANSWER_VERSION,
                **(identity or {})})  # fmt: skip
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    mine = [b for n, b in enumerate(batches) if n % count == index]
    todo = [b for b in mine if not all(_readable(out / it.filename) for it in b)]
    bar = tqdm(total=sum(map(len, mine)), initial=sum(map(len, mine)) - sum(map(len, todo)), desc="answer set",
               disable=not progress)  # fmt: skip
    try:
        with apply(pipe) if apply else nullcontext():
            # created (and so filled) inside the apply context: a runtime patch on the text encoder (SEOT) must see
            # every encoding; an encoder cached before it would hand out unpatched embeddings
            encode = PromptEncoder.of(pipe)
            for batch in todo:
                prompts = [catalog.prompt(it.theme, it.object) for it in batch]
                seeds = [it.generator_seed for it in batch]
                images = sample(pipe, prompts, seeds, sampler, batch_size=len(batch), output_type="np", encoder=encode)
                for it, image in zip(batch, images):
                    path = out / it.filename
                    if not _readable(path):
                        save_image(
                            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)), path, quality=95
                        )
                bar.update(len(batch))
    finally:
        bar.close()
    manifest = {
        "catalog": catalog.name, "sampler": asdict(sampler), "scheduler": "DDIM", "eta": 0.0,
        "answer_version": ANSWER_VERSION, "noise": "per image, generator seed sha256([theme, object, seed])",
        "batch_size": batch_size, "prompt_template": catalog.template, "count": len(items),
        "seeds": sorted({it.seed for it in items}), "items": [asdict(it) for it in items], **(manifest_extra or {}),
    }  # fmt: skip
    write_json(out / MANIFEST, manifest)
    return out


IDENTITY = "identity.json"


def answer_identity(pipe, delta=None) -> dict[str, str]:
    """What makes an answer set's images beyond the protocol: the base model and the exact delta applied."""
    return {"base_fingerprint": fingerprint(pipe), "delta": delta.digest() if delta is not None else "none"}


def claim(out: Path, identity: dict[str, Any]) -> None:
    """Make `out` the folder of `identity`'s images: a new folder gets the identity written first; an existing one
    must hold the same identity (or be empty), else ValueError naming what differs."""
    path = out / IDENTITY
    if path.is_file():
        held = json.loads(path.read_text())
        differs = sorted(k for k in set(held) | set(identity) if held.get(k) != identity.get(k))
        if differs:
            raise ValueError(f"{out} holds images of other inputs ({', '.join(differs)} differ: "
                             f"{', '.join(f'{held.get(k)!r} != {identity.get(k)!r}' for k in differs)}); use a new "
                             "folder, or remove it")  # fmt: skip
        return
    if out.is_dir() and any(out.glob("*.jpg")):
        raise ValueError(f"{out} holds images of unknown origin (no {IDENTITY}); use a new folder, or remove it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, identity)


def load_answer_set(directory: str | os.PathLike) -> tuple[list[AnswerItem], list[Path], dict]:
    """Items, image paths and manifest of a generated answer set; every listed image must exist."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: generate the answer set first")
    manifest = json.loads(manifest_path.read_text())
    version = manifest.get("answer_version", 1)
    if version != ANSWER_VERSION:
        raise ValueError(f"answer set {directory} was made by answer-set version {version}, not {ANSWER_VERSION} "
                         "(per-image noise); regenerate it in a new folder")  # fmt: skip
    items = [AnswerItem(**it) for it in manifest["items"]]
    paths = [directory / it.filename for it in items]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"answer set {directory} lacks {len(missing)} images, e.g. {missing[:3]}; rerun "
                                "generation to complete it")  # fmt: skip
    return items, paths, manifest
