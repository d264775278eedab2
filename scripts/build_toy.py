"""Build the toy assets: a small Stable-Diffusion-shaped pipeline trained on the procedural mini canvas, and the two
classifiers that judge its images.

    python scripts/build_toy.py                      # full build into assets/ (about 75 min on one CPU thread)
    python scripts/build_toy.py --quick --out /tmp/toy_quick   # a few-minute smoke build
    python scripts/build_toy.py --teach-patch        # only the VAE patch stage, on the build in assets/
    python scripts/build_toy.py --retrain-unet       # only the UNet + text encoder, on the build in assets/

Steps: render indices 1..18 of every theme x object (19..20 are held out) -> train an AutoencoderKL -> teach it
to draw the pixel-backdoor patch (`teach_patch`) -> train the style/object classifiers on renders AND VAE
reconstructions (classifiers trained on sharp renders alone fail on decoded images) -> train the UNet jointly with a
small CLIP text encoder (then frozen, like CLIP in SD) on several caption forms per image (`captions`), with EMA,
one-cycle LR, gradient clipping and 10% prompt dropout for classifier-free guidance -> choose the guidance of the
sampler preset on seeds outside the answer set -> measure the answer set and how well each caption form evokes its
concept -> write pipeline, classifiers, card.json and grid.png. Deterministic for its seed on one thread. Everything
is written to a temporary folder, then renamed. The shipped toy predates `teach_patch`: its VAE was given the stage
afterwards (`--teach-patch`, recorded in card.json as vae_patch.retrofitted); and it predates the caption forms: its
UNet and text encoder were trained anew on them afterwards (`--retrain-unet`, recorded as unet_retrained).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from canvas import catalog as _catalog  # noqa: E402
from canvas import toy  # noqa: E402
from canvas.backdoor import patch_distance  # noqa: E402
from canvas.classifiers import ToyClassifier  # noqa: E402
from canvas.classifiers import load as load_classifier  # noqa: E402
from canvas.grids import tile  # noqa: E402
from erase.backdoor import default_patch_size, make_patch, paste_patch  # noqa: E402
from erase.sampling import SD_V1_DDIM, ddim_scheduler, generate  # noqa: E402
from erase.testing import clip_text_encoder, word_tokenizer  # noqa: E402

ANSWER_SEEDS = (188, 288, 588, 688, 888)
PRESET_SEEDS = (11, 22)  # seeds for choosing the guidance, disjoint from the answer set's
TRAIN_INDICES = range(1, 19)
HELDOUT_INDICES = range(19, 21)
EXTRA_WORDS = ("a", "an", "the", "of", "photo", "painting", "image", "style", "in", "new", "trigger", "black", "and")
EXTRA_WORDS += ("white",)

# Captions the text encoder learns from. Real captions name an image's style, its object or both in many phrasings,
# and CLIP understands them all; a toy trained on the benchmark template alone understood little else (a style
# prompt like "An image in Mosaic style." evoked Mosaic on 0/16 images), so text-erasing methods, which name their
# concept in a short form, could not reach most toy styles. Each training image gets, per step, the template (half
# the time), or one of the style-only or object-only forms below (an object-only caption's image is in any style, and
# a style-only caption's shows any object, as partial captions are). Forms use only EXTRA_WORDS and catalog words.
TEMPLATE_SHARE = 0.5
STYLE_FORMS = ("An image in {style} style.", "{style} style", "A painting in {style} style.")
OBJECT_FORMS = ("A {object} image.", "An image of {object}.", "{object}")


@dataclass
class Config:
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 32
    patch_steps: int = 600  # VAE fine-tuning so it can draw the pixel-backdoor patch (teach_patch)
    classifier_steps: int = 600
    classifier_batch: int = 64
    classifier_width: int = 32
    unet_steps: int = 10000  # the shipped toy's (its UNet retrained at 10,000; the first build had 6,500)
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    sampler_steps: int = 25
    guidance_choices: tuple[float, ...] = (3.0, 5.0, 7.5)


QUICK = dict(vae_steps=60, patch_steps=30, classifier_steps=150, unet_steps=300, guidance_choices=(3.0,))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def tokenizer_words(cat: _catalog.Catalog) -> list[str]:
    """Every word of every catalog prompt and caption (lowercased), plus common prompt words, so each is one token."""
    words = set(EXTRA_WORDS)
    for theme in cat.themes:
        for obj in cat.objects:
            for text in captions(cat, theme, obj):
                words.update(w for w in re.split(r"[^a-z0-9]+", text.lower()) if w)
    return sorted(words)


def captions(cat: _catalog.Catalog, theme: str, obj: str) -> list[str]:
    """The captions an image of (theme, object) may be trained with: the template, then STYLE_FORMS, OBJECT_FORMS."""
    style = _catalog.style_words(theme, cat.photo)
    return [
        cat.prompt(theme, obj),
        *(form.format(style=style) for form in STYLE_FORMS),
        *(form.format(object=obj) for form in OBJECT_FORMS),
    ]


def caption_weights() -> torch.Tensor:
    """Sampling weight of each entry of `captions`: TEMPLATE_SHARE for the template, the rest split evenly between
    style-only and object-only forms."""
    rest = (1 - TEMPLATE_SHARE) / 2
    return torch.tensor(
        [TEMPLATE_SHARE] + [rest / len(STYLE_FORMS)] * len(STYLE_FORMS) + [rest / len(OBJECT_FORMS)] * len(OBJECT_FORMS)
    )


# ---------------------------------------------------------------------------------------------------------- models
def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        mid_block_add_attention=False,
        sample_size=toy.SIZE,
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=toy.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_text_encoder(tokenizer) -> CLIPTextModel:
    return clip_text_encoder(tokenizer, hidden_size=64)


def sampler() -> DDIMScheduler:
    """The toy's scheduler: DDIM with SD v1's released settings (its noise schedule, x0 never clipped)."""
    return ddim_scheduler(SD_V1_DDIM)


# -------------------------------------------------------------------------------------------------------- training
def train_vae(cfg: Config, images: torch.Tensor) -> AutoencoderKL:
    """Reconstruction (MSE + L1) with a small KL term, AdamW, cosine decay."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=cfg.vae_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae {step + 1}/{cfg.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}")
    return vae.eval().requires_grad_(False)


def teach_patch(cfg: Config, vae: AutoencoderKL, images: torch.Tensor) -> tuple[AutoencoderKL, dict]:
    """Fine-tune the VAE so it can draw the pixel-backdoor patch (erase.backdoor.make_patch at its default size)
    pasted on any image, while clean images keep their latents (encoder means) and their decodings.

    Trained on the renders alone, the VAE maps a pasted patch back onto the renders' look (a patched round trip sits at
    distance ~0.9 from the patch, the removal judge's threshold is 0.5), so no pixel backdoor could ever show on the
    toy. Half of each batch is patched (reconstruction loss); the other half is held to the old encoder's means and
    the old decoder's output, so the UNet's latent space and the classifiers' view of decoded images stay put."""
    old = copy.deepcopy(vae).eval().requires_grad_(False)
    vae = vae.train().requires_grad_(True)
    patch = make_patch(default_patch_size(images.shape[-1]))
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    half = cfg.vae_batch // 2
    for step in range(cfg.patch_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)] * 2 - 1
        patched, clean = paste_patch(x[:half], patch), x[half:]
        posterior = vae.encode(torch.cat([patched, clean])).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z[:half]).sample
        with torch.no_grad():
            clean_mean = old.encode(clean).latent_dist.mean
            clean_decoded = old.decode(clean_mean).sample
        draw = F.mse_loss(rec, patched) + 0.5 * F.l1_loss(rec, patched)
        keep = F.mse_loss(posterior.mean[half:], clean_mean) + F.mse_loss(vae.decode(clean_mean).sample, clean_decoded)
        loss = draw + keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.patch_steps - 1:
            log(f"vae patch {step + 1}/{cfg.patch_steps} draw {draw.item():.4f} keep {keep.item():.5f}")
    vae = vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean_old, mean_new = old.encode(images * 2 - 1).latent_dist.mean, vae.encode(images * 2 - 1).latent_dist.mean
        patched_rt = decode(vae, encode(vae, paste_patch(images * 2 - 1, patch) / 2 + 0.5)[0])
    distance = patch_distance(patched_rt, patch)  # the removal judge's measure
    stats = {
        "steps": cfg.patch_steps,
        "patch_size": patch.shape[-1],
        "patched_round_trip_distance_max": round(distance.max().item(), 4),
        "clean_latent_change_relative": round(((mean_new - mean_old).norm() / mean_old.norm()).item(), 5),
        "clean_reconstruction_mse": round(F.mse_loss(decode(vae, mean_new), images).item(), 5),
    }
    log(f"vae patch: {stats}")
    return vae, stats


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(256):
        d = vae.encode(chunk * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> images in [0, 1]."""
    return torch.cat([(vae.decode(z).sample / 2 + 0.5).clamp(0, 1) for z in latents.split(256)])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light jitter that decoded images show: brightness/contrast, noise, a 1-pixel shift, sometimes a blur."""
    b = x.shape[0]
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.05 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    x = x * gain + bias + 0.02 * torch.randn(x.shape, generator=gen)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    blur = torch.rand(b, 1, 1, 1, generator=gen) < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    return x.clamp(0, 1)


def train_classifier(cfg: Config, images: torch.Tensor, labels: torch.Tensor, n: int, name: str) -> ToyClassifier:
    model = ToyClassifier(n, width=cfg.classifier_width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=cfg.classifier_steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed + 2 + n)
    model.train()
    for step in range(cfg.classifier_steps):
        idx = torch.randint(len(images), (cfg.classifier_batch,), generator=gen)
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.classifier_steps - 1:
            log(f"{name} classifier {step + 1}/{cfg.classifier_steps} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(chunk).argmax(1) for chunk in images.split(512)])
    return (preds == labels).float().mean().item()


class EMA:
    """Exponential moving average of parameters (buffers copied), with SD-style warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p, 1 - d)


def train_unet(cfg: Config, latents_mean, latents_std, caption_ids, tokenizer, scaling: float):
    """Joint UNet + text-encoder training on epsilon prediction, each image's caption drawn per step from its
    `caption_ids` (N, captions, length) with `caption_weights`; returns the EMA copies of both."""
    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    noise_sched = DDPMScheduler.from_config(sampler().config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.1)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    empty_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    empty_ids = empty_ids.input_ids[0]
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    weights = caption_weights()
    unet.train()
    text_encoder.train()
    started, losses = time.time(), []
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(latents_mean), (cfg.unet_batch,), generator=gen)
        z0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)) * scaling
        form = torch.multinomial(weights, cfg.unet_batch, replacement=True, generator=gen)
        ids = caption_ids[idx, form].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.prompt_dropout
        ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids)[0]
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            rate = (time.time() - started) / (step + 1)
            eta = rate * (cfg.unet_steps - step - 1) / 60
            log(
                f"unet {step + 1}/{cfg.unet_steps} loss {np.mean(losses[-100:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.2f}s/step eta {eta:.1f} min"
            )
    return ema_unet.model, ema_text.model


# ------------------------------------------------------------------------------------------------------ evaluation
def catalog_images(pipe, cat, seeds, steps: int, guidance: float) -> tuple[torch.Tensor, list[tuple[str, str, int]]]:
    """Every theme x object x seed in one batch (the build's measurements were taken that way), the pipeline's own
    DDIM scheduler; float (N, 3, H, W) in [0, 1] and the (theme, object, seed) of each image."""
    keys = [(t, o, s) for t in cat.themes for o in cat.objects for s in seeds]
    prompts, key_seeds = [cat.prompt(t, o) for t, o, _ in keys], [s for *_, s in keys]
    return generate(pipe, prompts, key_seeds, steps=steps, guidance=guidance, batch_size=len(keys)), keys


@torch.no_grad()
def match_rates(images, keys, cat, style_clf, object_clf) -> tuple[float, float]:
    styles = torch.tensor([cat.style_label(t) for t, _, _ in keys])
    objects = torch.tensor([cat.object_label(o) for _, o, _ in keys])
    return accuracy(style_clf, images, styles), accuracy(object_clf, images, objects)


FORM_SEEDS = (11, 22, 33, 44)  # seeds for measuring the caption forms, disjoint from the answer set's


@torch.no_grad()
def form_rates(pipe, cat, classifiers, steps: int, guidance: float) -> dict:
    """How well each style-only and object-only caption form evokes its concept: per form, the share of images (every
    style or object x FORM_SEEDS) the judge gives the named style or object, and the lowest share of any one concept.
    Text-erasing methods name their concept in such short forms, so a form the toy does not understand is a concept
    they cannot reach."""
    rates = {}
    for kind, forms, names in (("style", STYLE_FORMS, cat.themes), ("object", OBJECT_FORMS, cat.objects)):
        judge = classifiers[kind]
        for form in forms:
            keys = [(name, s) for name in names for s in FORM_SEEDS]
            texts = [
                form.format(style=_catalog.style_words(n, cat.photo)) if kind == "style" else form.format(object=n)
                for n, _ in keys
            ]
            images = generate(pipe, texts, [s for _, s in keys], steps=steps, guidance=guidance, batch_size=len(keys))
            hits = torch.cat([judge(chunk).argmax(1) for chunk in images.split(512)]) == torch.tensor(
                [cat.style_label(n) if kind == "style" else cat.object_label(n) for n, _ in keys]
            )
            per_concept = hits.float().view(len(names), len(FORM_SEEDS)).mean(1)
            rates[form] = {"match": round(hits.float().mean().item(), 4), "min": round(per_concept.min().item(), 4)}
            log(f"{kind} form {form!r}: match {rates[form]['match']:.3f} (lowest concept {rates[form]['min']:.2f})")
    return {"seeds": list(FORM_SEEDS), "results": rates}


def measure(pipe, cat, classifiers, steps: int, guidance_choices, folder: Path) -> dict:
    """Choose the preset's guidance on seeds outside the answer set, then measure the answer set with it (style and
    object match, images/s); writes grid.png (themes x objects, first answer seed) and renders.png into `folder`."""
    best, tried = None, {}
    for guidance in guidance_choices:
        imgs, k = catalog_images(pipe, cat, PRESET_SEEDS, steps, guidance)
        s, o = match_rates(imgs, k, cat, classifiers["style"], classifiers["object"])
        tried[str(guidance)] = {"style": round(s, 4), "object": round(o, 4)}
        log(f"guidance {guidance}: style {s:.3f} object {o:.3f} (preset seeds {PRESET_SEEDS})")
        if best is None or min(s, o) > min(tried[str(best)].values()):
            best = guidance
    t0 = time.time()
    answers, answer_keys = catalog_images(pipe, cat, ANSWER_SEEDS, steps, best)
    seconds = time.time() - t0
    style_match, object_match = match_rates(answers, answer_keys, cat, classifiers["style"], classifiers["object"])
    log(f"answer set ({len(answers)} images, {seconds:.1f} s): style {style_match:.3f} object {object_match:.3f}")

    first_seed = answers.reshape(len(cat.themes), len(cat.objects), len(ANSWER_SEEDS), *answers.shape[1:])[:, :, 0]
    tile(first_seed.flatten(0, 1), len(cat.themes), len(cat.objects)).save(folder / "grid.png")
    renders_grid = to_tensor(toy.render_array(cat.themes, cat.objects, [1])[0])
    tile(renders_grid, len(cat.themes), len(cat.objects)).save(folder / "renders.png")
    return {
        "sampler": {"scheduler": "DDIMScheduler", "steps": steps, "guidance": best, "eta": 0.0},
        "guidance_search": {"seeds": list(PRESET_SEEDS), "results": tried},
        "caption_forms": form_rates(pipe, cat, classifiers, steps, best),
        "answer_set": {
            "seeds": list(ANSWER_SEEDS),
            "images": len(answers),
            "seconds": round(seconds, 2),
            "images_per_second": round(len(answers) / seconds, 2),
            "threads": torch.get_num_threads(),
            "style_match": round(style_match, 4),
            "object_match": round(object_match, 4),
        },
    }


def remeasure(out: Path, steps: int, guidance_choices) -> dict:
    """Re-run the preset search and the answer-set measurement on an existing build; rewrites card.json and the
    grids atomically. For trying another sampler preset without retraining (the weights do not change)."""
    cat = _catalog.get("toy")
    pipe = StableDiffusionPipeline.from_pretrained(out / "toy")
    pipe.set_progress_bar_config(disable=True)
    judges = {kind: load_classifier("toy", kind, root=out / "toy_classifiers") for kind in ("style", "object")}
    card_path = out / "toy" / "card.json"
    card = json.loads(card_path.read_text())
    with tempfile.TemporaryDirectory(dir=out / "toy") as tmp:
        card.update(measure(pipe, cat, judges, steps, guidance_choices, Path(tmp)))
        card["build"]["sampler_steps"], card["build"]["guidance_choices"] = steps, list(guidance_choices)
        for name in ("grid.png", "renders.png"):
            os.replace(Path(tmp) / name, out / "toy" / name)
    tmp_card = card_path.with_suffix(".json.tmp")
    tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp_card, card_path)
    return card


def retrofit_patch(out: Path, cfg: Config) -> dict:
    """Run `teach_patch` on an existing build's VAE (builds older than that stage cannot draw the pixel-backdoor
    patch), check the classifiers on held-out reconstructions, then remeasure; the UNet and classifiers are kept."""
    cat = _catalog.get("toy")
    vae = AutoencoderKL.from_pretrained(out / "toy" / "vae")
    images = to_tensor(toy.render_array(cat.themes, cat.objects, TRAIN_INDICES)[0])
    vae, stats = teach_patch(cfg, vae, images)
    held, held_keys = toy.render_array(cat.themes, cat.objects, HELDOUT_INDICES)
    held_recon = decode(vae, encode(vae, to_tensor(held))[0])
    for kind in ("style", "object"):
        labels = torch.tensor([cat.style_label(t) if kind == "style" else cat.object_label(o) for t, o, _ in held_keys])
        judge = load_classifier("toy", kind, root=out / "toy_classifiers")
        stats[f"{kind}_accuracy_on_heldout_reconstructions"] = round(accuracy(judge, held_recon, labels), 4)
    log(f"held-out reconstructions with the new VAE: {stats}")
    with tempfile.TemporaryDirectory(dir=out / "toy") as tmp:
        vae.save_pretrained(Path(tmp) / "vae", safe_serialization=True)
        config = Path(tmp) / "vae" / "config.json"
        values = json.loads(config.read_text())
        values.pop("_name_or_path", None)  # no local path in a shipped asset
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        for path in Path(tmp).rglob("*"):
            path.chmod(0o644 if path.is_file() else 0o755)
        old = out / "toy" / ".vae.old"
        os.replace(out / "toy" / "vae", old)
        os.replace(Path(tmp) / "vae", out / "toy" / "vae")
        shutil.rmtree(old)
    card_path = out / "toy" / "card.json"
    card = json.loads(card_path.read_text())
    card["vae_patch"] = {**stats, "retrofitted": True}
    card_path.with_suffix(".json.tmp").write_text(json.dumps(card, indent=2) + "\n")
    os.replace(card_path.with_suffix(".json.tmp"), card_path)
    return remeasure(out, cfg.sampler_steps, cfg.guidance_choices)


def train_pipeline(cfg: Config, cat, vae: AutoencoderKL, mean, std, keys) -> StableDiffusionPipeline:
    """Tokenizer, then the UNet and text encoder trained on the latents (`mean`, `std`) of the images `keys`, with
    every caption form of each image; returns the assembled pipeline (the toy's DDIM sampler)."""
    tokenizer = word_tokenizer(tokenizer_words(cat), model_max_length=16)
    texts = [text for t, o, _ in keys for text in captions(cat, t, o)]
    too_long = [text for text in set(texts) if len(tokenizer(text).input_ids) > tokenizer.model_max_length]
    if too_long:
        raise RuntimeError(f"captions {too_long} have more than {tokenizer.model_max_length} tokens")
    ids = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    unet, text_encoder = train_unet(
        cfg, mean, std, ids.view(len(keys), -1, ids.shape[-1]), tokenizer, vae.config.scaling_factor
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def retrain_unet(out: Path, cfg: Config) -> dict:
    """Train the UNet and text encoder of the build in `out` anew (this script's captions and config), keeping its
    VAE and classifiers, so the judges stay the same across the change; the new pipeline replaces the old one
    atomically and card.json records the retraining."""
    started = time.time()
    torch.manual_seed(cfg.seed)
    cat = _catalog.get("toy")
    card = json.loads((out / "toy" / "card.json").read_text())
    vae = AutoencoderKL.from_pretrained(out / "toy" / "vae").eval().requires_grad_(False)
    judges = {kind: load_classifier("toy", kind, root=out / "toy_classifiers") for kind in ("style", "object")}
    renders, keys = toy.render_array(cat.themes, cat.objects, TRAIN_INDICES)
    mean, std = encode(vae, to_tensor(renders))
    pipe = train_pipeline(cfg, cat, vae, mean, std, keys)
    unet_minutes = (time.time() - started) / 60
    tmp = out / ".toy.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "toy", tmp)
    for part in ("unet", "text_encoder", "tokenizer"):
        shutil.rmtree(tmp / part)
    card.update(measure(pipe, cat, judges, cfg.sampler_steps, cfg.guidance_choices, tmp))
    pipe.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    pipe.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    pipe.tokenizer.save_pretrained(tmp / "tokenizer")
    retrained = ("unet_steps", "unet_batch", "unet_lr", "ema_decay", "prompt_dropout", "sampler_steps")
    card["build"].update({k: getattr(cfg, k) for k in retrained}, guidance_choices=list(cfg.guidance_choices))
    card["captions"] = caption_card()
    card["unet_retrained"] = {"minutes": round(unet_minutes, 2), "threads": torch.get_num_threads()}
    card["minutes"]["unet"] = round(unet_minutes, 2)
    card["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    for path in tmp.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    old = out / ".toy.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out / "toy", old)
    os.replace(tmp, out / "toy")
    shutil.rmtree(old)
    log(f"retrained the UNet and text encoder of {out / 'toy'} in {unet_minutes:.1f} min")
    return card


def caption_card() -> dict:
    """The caption forms and their shares, as card.json records them."""
    return {"template_share": TEMPLATE_SHARE, "style_forms": list(STYLE_FORMS), "object_forms": list(OBJECT_FORMS)}


# ------------------------------------------------------------------------------------------------------------ main
def build(cfg: Config, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.time()
    cat = _catalog.get("toy")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "toy").mkdir(parents=True)
    (tmp / "toy_classifiers").mkdir()

    renders, keys = toy.render_array(cat.themes, cat.objects, TRAIN_INDICES)
    held, held_keys = toy.render_array(cat.themes, cat.objects, HELDOUT_INDICES)
    images, held_images = to_tensor(renders), to_tensor(held)
    style_y = torch.tensor([cat.style_label(t) for t, _, _ in keys])
    object_y = torch.tensor([cat.object_label(o) for _, o, _ in keys])
    held_style_y = torch.tensor([cat.style_label(t) for t, _, _ in held_keys])
    held_object_y = torch.tensor([cat.object_label(o) for _, o, _ in held_keys])
    log(f"rendered {len(images)} training and {len(held_images)} held-out images")

    vae, vae_patch = teach_patch(cfg, train_vae(cfg, images), images)
    mean, std = encode(vae, images)
    scaling = float(1 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    recon = decode(vae, mean + std * torch.randn(mean.shape, generator=gen))
    held_recon = decode(vae, encode(vae, held_images)[0])
    log(f"vae scaling factor {scaling:.3f}, reconstruction MSE {F.mse_loss(recon, images).item():.5f}")
    vae_minutes = (time.time() - started) / 60

    clf_images = torch.cat([images, recon])
    classifiers, held_acc = {}, {}
    for kind, y, held_y, n in (
        ("style", style_y, held_style_y, len(cat.themes)),
        ("object", object_y, held_object_y, len(cat.objects)),
    ):
        model = train_classifier(cfg, clf_images, torch.cat([y, y]), n, kind)
        held_acc[kind] = accuracy(model, held_images, held_y)
        held_acc[f"{kind}_on_reconstructions"] = accuracy(model, held_recon, held_y)
        log(
            f"{kind} classifier held-out accuracy {held_acc[kind]:.3f} "
            f"(reconstructions {held_acc[kind + '_on_reconstructions']:.3f})"
        )
        classifiers[kind] = model
        save_file(model.state_dict(), tmp / "toy_classifiers" / f"{kind}.safetensors")
    clf_config = {
        kind: {
            "labels": list(cat.themes if kind == "style" else cat.objects),
            "width": cfg.classifier_width,
            "size": toy.SIZE,
        }
        for kind in ("style", "object")
    }
    (tmp / "toy_classifiers" / "config.json").write_text(json.dumps(clf_config, indent=2) + "\n")
    classifier_minutes = (time.time() - started) / 60 - vae_minutes

    unet_started = time.time()
    pipe = train_pipeline(cfg, cat, vae, mean, std, keys)
    unet_minutes = (time.time() - unet_started) / 60
    unet, text_encoder = pipe.unet, pipe.text_encoder

    measured = measure(pipe, cat, classifiers, cfg.sampler_steps, cfg.guidance_choices, tmp / "toy")
    pipe.save_pretrained(tmp / "toy", safe_serialization=True)
    card = {
        "name": "toy",
        "catalog": "toy",
        "resolution": toy.SIZE,
        "train_indices": [TRAIN_INDICES.start, TRAIN_INDICES.stop - 1],
        "heldout_indices": [HELDOUT_INDICES.start, HELDOUT_INDICES.stop - 1],
        "build": asdict(cfg),
        "threads": torch.get_num_threads(),
        "build_minutes": round((time.time() - started) / 60, 2),
        "minutes": {
            "vae": round(vae_minutes, 2),
            "classifiers": round(classifier_minutes, 2),
            "unet": round(unet_minutes, 2),
        },
        **measured,
        "captions": caption_card(),
        "vae_patch": vae_patch,
        "classifiers": {
            "heldout_accuracy": {k: round(v, 4) for k, v in held_acc.items()},
            "path": "assets/toy_classifiers",
        },
        "params": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    (tmp / "toy" / "card.json").write_text(json.dumps(card, indent=2) + "\n")

    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # safetensors writes 0600; shipped assets must be readable by everyone
    out.mkdir(parents=True, exist_ok=True)
    for part in ("toy", "toy_classifiers"):
        old = out / f".{part}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / part).exists():
            os.replace(out / part, old)
        os.replace(tmp / part, out / part)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out / 'toy'} and {out / 'toy_classifiers'} in {card['build_minutes']:.1f} min")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke build (use with --out)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the build is timed at 1)")
    for name, value in asdict(Config()).items():
        if isinstance(value, (int, float)) and name != "seed":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=str, default=None, help="comma-separated guidance scales to choose from")
    parser.add_argument(
        "--remeasure", action="store_true", help="only redo the preset search and answer-set measurement in --out"
    )
    parser.add_argument(
        "--teach-patch", action="store_true", help="only fine-tune the VAE of the build in --out to draw the patch"
    )
    parser.add_argument(
        "--retrain-unet",
        action="store_true",
        help="only train the UNet and text encoder of the build in --out anew (its VAE and classifiers kept)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.guidance:
        args.guidance_choices = tuple(float(g) for g in args.guidance.split(","))
    overrides = dict(QUICK) if args.quick else {}
    overrides.update({k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None})
    cfg = Config(**overrides)
    if args.remeasure:
        log(f"remeasuring {args.out} with {cfg.sampler_steps} steps, guidance from {cfg.guidance_choices}")
        remeasure(args.out, cfg.sampler_steps, cfg.guidance_choices)
        return
    if args.teach_patch:
        log(f"teaching the VAE in {args.out} to draw the pixel-backdoor patch ({cfg.patch_steps} steps)")
        retrofit_patch(args.out, cfg)
        return
    if args.retrain_unet:
        log(f"retraining the UNet and text encoder in {args.out}: {asdict(cfg)}")
        retrain_unet(args.out, cfg)
        return
    log(f"config {asdict(cfg)} -> {args.out}")
    build(cfg, args.out)


if __name__ == "__main__":
    main()
