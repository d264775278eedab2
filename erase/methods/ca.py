"""CA, Concept Ablation (Kumari et al., ICCV 2023).

Make the model answer target prompts (containing the concept c*) as it answers the anchor prompts (concept c), on
images the model itself generated for the anchor prompts:
    model-based:  ‖e(x_t, c*) − sg(e(x_t, c))‖²   (the target from the model being trained, under no_grad)
    noise-based:  ‖e(x_t, c*) − ε‖²
plus, optionally, prior preservation `λ·‖e(x_t', c) − ε'‖²` on a separately drawn anchor image (the public code
batches its class images next to the instance images; so do we).

Target prompts (the public code's two forms); the concept is spelled by `concept_form` (e.g. "{concept} Style"):
- `prompt_mode="replace"` (the code's object form): the anchor prompt with every occurrence of the anchor
  (case-insensitive) replaced by the concept. With concept "Van Gogh painting" and anchor "painting",
  "a painting of a cat" -> "a Van Gogh painting of a cat"; with "grumpy cat" -> "cat", "a cat" -> "a grumpy cat".
- `prompt_mode="style"` (the code's style form): one of `style_forms` drawn per sample, uniformly (a form listed
  twice is drawn twice as often): the official "{prompt}, in the style of {concept}" (1/3) and
  "in {concept}'s style, {prompt}" (2/3), or UnlearnCanvas's six (`UNLEARNCANVAS_STYLE_FORMS`).
Anchor prompts: `anchor_prompts`, else the captions of `anchor_prompts_file` (one per line; `{concept}` in the path
is each concept: UnlearnCanvas's per-object files), else `anchor_form` over the catalog `anchor_catalog` (a style
anchor such as "Photo" with every object, an object anchor in every theme), else the anchors themselves; files and
catalogs are read when the config is built, into `anchor_prompts`.
Anchor images: `num_anchor_images`, image i from anchor prompt i mod len(anchor_prompts) with seed i, generated
once per (model, prompt, seed, sampler) with the pipeline's scheduler and cached as PNG in `cache_dir`
(erase.images.generate_images), trained at `resolution` (None: the pipeline's size), flipped at random with
`hflip`. The public code's other augmentation (random rescale with "far away"/"zoomed in" prompt words, masks) is
not reproduced.
Learning rate: every official command passes `--scale_lr`, lr = base lr × batch per GPU × GPUs × accumulation
(× 2 with prior preservation in the diffusers code); `batch_size` here is that whole batch, so `scaled_lr` gives
the presets' lr and a preset's batch is what the official command trains with, whatever the GPU count here.
Parameter groups as in the code: K/V (`params="kv"`, the paper's cross-attn default), all of attn2 ("xattn", alias
"attention"), full ("all", alias "full"); aliases in erase.params.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import catalog as catalogs
from ..config import TrainingConfig, concept_texts, texts
from ..context import RunContext
from ..frozen import unwrap
from ..images import denoising_target, encode_latents, generate_images, image_size, noised, to_tensor
from ..paths import cache_dir
from ..train import LossFn
from .skd_cag import read_captions

LOSSES = ("model", "noise")
PROMPT_MODES = ("replace", "style")
# diffusers/utils.py (__getprompt__): r in {0, 1, 2}, r = 0 the first form, 1 and 2 the second.
PAPER_STYLE_FORMS = ("{prompt}, in the style of {concept}", "in {concept}'s style, {prompt}",
                     "in {concept}'s style, {prompt}")  # fmt: skip
# UnlearnCanvas (mu_concept_ablation_ca/src/finetune_data.py, get_styled_prompt): three forms, each with the concept
# once or twice, all six equally likely.
UNLEARNCANVAS_STYLE_FORMS = (
    "{prompt}, in the style of {concept} {concept}", "{prompt}, in the style of {concept}",
    "{concept} {concept} inspired painting, {prompt}", "{concept} inspired painting, {prompt}",
    "in {concept} {concept}'s style, {prompt}", "in {concept}'s style, {prompt}",
)  # fmt: skip
# The default form of catalog anchor captions: not the benchmark prompt ("A {object} image in {style} style."). The
# toy presets use short captions of the anchor alone (see PRESETS["toy"]).
TOY_ANCHOR_FORM = "{object} in {style} style"
# Presets whose anchor captions are the authors' files, which we do not ship (UnlearnCanvas has no licence file; the
# captions are web alt-texts): the file to give as anchor_prompts_file.
CAPTION_FILES = {
    "unlearncanvas-style": "UnlearnCanvas's machine_unlearning/mu_concept_ablation_ca/anchor_prompts/"
                           "finetune_prompts/painting.txt (200 captions)",
    "unlearncanvas-object": "UnlearnCanvas's machine_unlearning/mu_concept_ablation_ca/anchor_prompts/"
                            "finetune_prompts/sd_prompt_{concept}.txt (80 captions per object)",
}  # fmt: skip


def scaled_lr(base_lr: float, batch_size: int, prior_preservation: bool = False) -> float:
    """The official `--scale_lr`: base lr × the whole batch (per GPU × GPUs × accumulation), × 2 with prior
    preservation (diffusers train.py; UnlearnCanvas's compvis code has no prior term and no × 2)."""
    return base_lr * batch_size * (2.0 if prior_preservation else 1.0)


@dataclass
class CAConfig(TrainingConfig):
    DEFAULT_PARAMS: ClassVar[str] = "kv"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The released recipe (diffusers README, style and object commands), as run on the 2 GPUs it recommends:
        # batch 4 per GPU = 8, 100 steps, lr 2e-6 scaled to 1.6e-5; 1000 anchor images (DPM-Solver 25 steps,
        # guidance 6 there; the pipeline's scheduler here), AdamW wd 1e-2, K/V, model-based, hflip. On one GPU the
        # README's alternative is batch 4, 200 steps, lr 8e-6. prompt_mode: "style" for a style (--concept_type).
        "paper": {"steps": 100, "batch_size": 8, "lr": scaled_lr(2e-6, 8), "optimizer": "adamw",
                  "weight_decay": 1e-2, "loss": "model", "num_anchor_images": 1000, "sample_steps": 25,
                  "sample_guidance": 6.0, "hflip": True},
        # UnlearnCanvas (mu_concept_ablation_ca: style_script.py, configs/finetune_style.yaml, train.py), styles: one
        # GPU, batch 4, lr 2e-6 scaled to 8e-6, 1000 steps, 256 px, K/V, no prior preservation, AdamW (torch's
        # default wd 1e-2), target "..., in the style of {Style} Style" and its other forms. concepts=["Van Gogh"]
        # (their README's "Van Gogh Style"; style_script.py passes the name, "Van_Gogh Style");
        # anchor_prompts_file: their painting.txt (not shipped, see CAPTION_FILES), one image per caption.
        # Their anchor images: DDIM 200 steps, eta 1, guidance 6 (here the pipeline's DDIM, eta 0).
        "unlearncanvas-style": {"steps": 1000, "batch_size": 4, "lr": scaled_lr(2e-6, 4), "optimizer": "adamw",
                                "weight_decay": 1e-2, "loss": "model", "prompt_mode": "style",
                                "style_forms": list(UNLEARNCANVAS_STYLE_FORMS), "concept_form": "{concept} Style",
                                "num_anchor_images": 200, "sample_steps": 200, "sample_guidance": 6.0,
                                "resolution": 256, "hflip": True},
        # UnlearnCanvas, objects (class_script.py, configs/finetune_object.yaml): as styles but 2000 steps at 512 px,
        # target "An image of {Object}" in the same style forms (their object config keeps the dataset's default
        # style=True), 80 anchor images from their sd_prompt_<Object>.txt (anchor_prompts_file with {concept}).
        "unlearncanvas-object": {"steps": 2000, "batch_size": 4, "lr": scaled_lr(2e-6, 4), "optimizer": "adamw",
                                 "weight_decay": 1e-2, "loss": "model", "prompt_mode": "style",
                                 "style_forms": list(UNLEARNCANVAS_STYLE_FORMS),
                                 "concept_form": "An image of {concept}", "num_anchor_images": 80,
                                 "sample_steps": 200, "sample_guidance": 6.0, "hflip": True},
        # Ours (1.5 M-parameter UNet, paper learning rates move it too little), chosen by scripts/tune_toy.py on the
        # tuning targets only (docs/results/tuning/ca-*.md). Anchor captions are not the benchmark prompts the
        # answer set uses (training on those gave UA 100 on every toy style) but short captions of the anchor:
        # styles "An image in Photo style.", objects "A {anchor} image." (the next object). Tuning means (not
        # results): styles UA 100 / IRA 99 / CRA 100 (200 steps and lr 2e-3 no better), objects at 200 steps UA 98 /
        # IRA 91 / CRA 100 (100 steps: UA 95.5).
        # Results, held-out toy targets (docs/results/toy.md, mean UA / IRA / CRA): styles 100 / 96.7 / 99.9,
        # objects 94.8 / 86.6 / 100.
        "toy": {
            "steps": 100, "lr": 1e-3, "batch_size": 4, "loss": "model", "anchors": ["Photo"], "prompt_mode": "replace",
            "anchor_catalog": "toy", "anchor_form": "An image in {style} style.", "params": "xattn",
            "num_anchor_images": 64, "sample_steps": 25, "sample_guidance": 3.0, "prior_preservation": True,
        },
        "toy-object": {
            "steps": 200, "lr": 1e-3, "batch_size": 4, "loss": "model", "prompt_mode": "replace",
            "anchor_catalog": "toy", "anchor_form": "A {object} image.", "params": "xattn",
            "num_anchor_images": 64, "sample_steps": 25, "sample_guidance": 3.0, "prior_preservation": True,
        },
    }  # fmt: skip

    steps: int = 400
    lr: float = 2e-6
    batch_size: int = 4
    concepts: list[str] = field(default_factory=list)  # targets c*
    anchors: list[str] = field(default_factory=list)  # one per concept, or one for all
    anchor_prompts: list[str] | None = None  # None: from the file, the catalog, else the anchors themselves
    anchor_prompts_file: str | None = None  # one caption per line; `{concept}` in the path is each concept
    anchor_catalog: str | None = None  # spell anchor prompts from this catalog with anchor_form
    anchor_form: str = TOY_ANCHOR_FORM  # {object}, {style}
    prompt_mode: str = "replace"
    style_forms: list[str] = field(default_factory=lambda: list(PAPER_STYLE_FORMS))  # {prompt}, {concept}
    concept_form: str = "{concept}"  # how the concept is spelled inside target prompts
    loss: str = "model"
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_anchor_images: int = 200
    sample_steps: int = 50
    sample_guidance: float = 6.0
    generation_batch_size: int = 8
    resolution: int | None = None  # training pixels; None: the pipeline's image size
    hflip: bool = False  # flip anchor images at random (p = 0.5), as the official --hflip
    cache_dir: str | None = None  # None: erase.paths.cache_dir("ca")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = concept_texts(self.concepts)
        self.anchors = texts("anchors", self.anchors)
        if len(self.anchors) not in (1, len(self.concepts)):
            raise ValueError(f"anchors must be one for all concepts or one per concept ({len(self.concepts)}), "
                             f"got {len(self.anchors)}: {self.anchors!r}")  # fmt: skip
        self.style_forms = texts("style_forms", self.style_forms)
        for form in self.style_forms:
            _check_template("style_forms", form, {"prompt", "concept"}, {"prompt", "concept"})
        _check_template("concept_form", self.concept_form, {"concept"}, {"concept"})
        _check_template("anchor_form", self.anchor_form, {"object", "style"})
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8 or None, got {self.resolution!r}")
        if self.anchor_prompts is None:
            self.anchor_prompts = self._read_anchor_prompts()
        else:
            self.anchor_prompts = texts("anchor_prompts", self.anchor_prompts)
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is not one of {', '.join(PROMPT_MODES)}")
        if not isinstance(self.prior_weight, int | float) or not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be a non-negative number, got {self.prior_weight!r}")
        for name in ("num_anchor_images", "sample_steps", "generation_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.pairs()  # every anchor prompt must belong to a concept

    def _read_anchor_prompts(self) -> list[str] | None:
        """Anchor prompts from `anchor_prompts_file`, else from `anchor_catalog`; None when neither is given."""
        if self.preset in CAPTION_FILES and self.anchor_prompts_file is None:
            raise ValueError(f"preset {self.preset!r} trains on the authors' anchor captions, which are not shipped: "
                             f"give anchor_prompts_file, {CAPTION_FILES[self.preset]}")  # fmt: skip
        if self.anchor_prompts_file is not None:
            paths = dict.fromkeys(self.anchor_prompts_file.replace("{concept}", c) for c in self.concepts)
            missing = [path for path in paths if not Path(path).is_file()]
            if missing:
                raise FileNotFoundError(f"anchor_prompts_file {missing[0]!r} does not exist (one caption per line)")
            return [caption for path in paths for caption in read_captions(path)]
        if self.anchor_catalog is not None:
            cat = catalogs.get(self.anchor_catalog)
            prompts = [catalog_anchor_prompts(cat, anchor, self.anchor_form) for anchor in self.anchors]
            return list(dict.fromkeys(p for group in prompts for p in group))
        return None

    def anchor_of(self, i: int) -> str:
        return self.anchors[i] if len(self.anchors) > 1 else self.anchors[0]

    def prompts(self) -> list[str]:
        return list(self.anchor_prompts) if self.anchor_prompts is not None else list(dict.fromkeys(self.anchors))

    def pairs(self) -> list[list[int]]:
        """For each anchor prompt, the indices of the concepts it serves: those whose anchor it contains (in
        "style" mode, a prompt containing no anchor serves every concept)."""
        out = []
        for prompt in self.prompts():
            serves = [i for i in range(len(self.concepts)) if self.anchor_of(i).lower() in prompt.lower()]
            if not serves and self.prompt_mode == "style":
                serves = list(range(len(self.concepts)))
            if not serves:
                raise ValueError(f"anchor prompt {prompt!r} contains none of the anchors {self.anchors!r}; "
                                 "prompt_mode 'replace' needs the anchor inside the prompt")  # fmt: skip
            out.append(serves)
        return out

    def target_prompt(self, anchor_prompt: str, concept_index: int, form: int = 0) -> str:
        """The prompt c* for an anchor prompt (see the module docstring); `form` picks the style form."""
        concept = self.concept_form.format(concept=self.concepts[concept_index])
        if self.prompt_mode == "style":
            return self.style_forms[form % len(self.style_forms)].format(prompt=anchor_prompt.strip(), concept=concept)
        anchor = self.anchor_of(concept_index)
        return re.sub(re.escape(anchor), lambda _: concept, anchor_prompt, flags=re.IGNORECASE)


def catalog_anchor_prompts(cat: catalogs.Catalog, anchor: str, form: str) -> list[str]:
    """`form` for an anchor of the catalog: a theme ("Photo", by name or prompt words) with every object, or an
    object in every theme. ValueError for an anchor that is neither."""
    for theme in cat.themes:
        words = catalogs.style_words(theme, cat.photo)
        if anchor.lower() in (theme.lower(), words.lower()):
            return [form.format(object=o, style=words) for o in cat.objects]
    for obj in cat.objects:
        if anchor.lower() == obj.lower():
            return [form.format(object=obj, style=catalogs.style_words(t, cat.photo)) for t in cat.themes]
    raise ValueError(f"anchor {anchor!r} is not a theme or object of catalog {cat.name!r}; accepted: "
                     f"{', '.join(cat.themes + cat.objects)}")  # fmt: skip


def _check_template(name: str, template: str, allowed: set[str], required: set[str] = frozenset()) -> None:
    """ValueError unless `template` formats with the `allowed` fields only and holds every `required` one."""
    spelled = ", ".join("{" + k + "}" for k in sorted(allowed))
    try:
        template.format(**{k: "x" for k in allowed})
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{name} {template!r} may only use the fields {spelled}") from None
    missing = [k for k in sorted(required) if "{" + k + "}" not in template]
    if missing:
        raise ValueError(f"{name} {template!r} must contain {', '.join('{' + k + '}' for k in missing)}")


def anchor_latents(ctx) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Latents of the model's own images for the anchor prompts (cached on disk), of the same images flipped
    (`hflip`; None otherwise), and the prompt of each."""
    cfg: CAConfig = ctx.config
    prompts = cfg.prompts()
    image_prompts = [prompts[i % len(prompts)] for i in range(cfg.num_anchor_images)]
    images = generate_images(
        ctx.pipe,
        image_prompts,
        list(range(cfg.num_anchor_images)),
        steps=cfg.sample_steps,
        guidance=cfg.sample_guidance,
        cache_dir=cache_dir("ca", cfg.cache_dir),
        batch_size=cfg.generation_batch_size,
    )
    pixels = to_tensor(images, cfg.resolution or image_size(ctx.pipe))  # (N, 3, H, W)
    latents = encode_latents(ctx.pipe.vae, pixels).to(ctx.pipe.unet.device)
    flipped = encode_latents(ctx.pipe.vae, pixels.flip(-1)).to(ctx.pipe.unet.device) if cfg.hflip else None
    return latents, flipped, image_prompts


def make_loss(ctx: RunContext) -> LossFn:
    """The CA loss for the training loop, on the model's own anchor images (generated once, cached)."""
    cfg: CAConfig = ctx.config
    scheduler = ctx.pipe.scheduler
    latents, flipped, image_prompts = anchor_latents(ctx)
    prompts = cfg.prompts()
    serves = dict(zip(prompts, cfg.pairs()))

    def draw(g: torch.Generator):
        """One anchor image, noised: (x_t, t, clean latents, noise, its anchor prompt)."""
        j = int(torch.randint(len(latents), (1,), generator=g))
        flip = flipped is not None and int(torch.randint(2, (1,), generator=g)) == 1
        x0 = (flipped if flip else latents)[j : j + 1]
        x_t, t, noise = noised(scheduler, x0, g)
        return x_t, t, x0, noise, image_prompts[j]

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        xs, ts, targets_noise, target_embs, anchor_embs = [], [], [], [], []
        prior_xs, prior_ts, prior_noise, prior_embs = [], [], [], []
        for g in generators:
            x_t, t, x0, noise, anchor_prompt = draw(g)
            choices = serves[anchor_prompt]
            concept = choices[int(torch.randint(len(choices), (1,), generator=g))]
            form = int(torch.randint(len(cfg.style_forms), (1,), generator=g))
            xs.append(x_t)
            ts.append(t)
            targets_noise.append(denoising_target(scheduler, x0, noise, t))
            target_embs.append(ctx.encode(cfg.target_prompt(anchor_prompt, concept, form)))
            anchor_embs.append(ctx.encode(anchor_prompt))
            if cfg.prior_preservation:
                px_t, pt, px0, pnoise, p_prompt = draw(g)
                prior_xs.append(px_t)
                prior_ts.append(pt)
                prior_noise.append(denoising_target(scheduler, px0, pnoise, pt))
                prior_embs.append(ctx.encode(p_prompt))
        x_t, t, target_emb = torch.cat(xs), torch.cat(ts), torch.cat(target_embs)
        if cfg.loss == "model":
            with torch.no_grad():  # the model being trained, as in the paper's code
                target = unwrap(model)(x_t, t, encoder_hidden_states=torch.cat(anchor_embs)).sample
        else:
            target = torch.cat(targets_noise)
        n = len(xs)
        if cfg.prior_preservation:  # one forward pass for both terms
            x_t, t = torch.cat([x_t, *prior_xs]), torch.cat([t, *prior_ts])
            target_emb = torch.cat([target_emb, *prior_embs])
        prediction = model(x_t, t, encoder_hidden_states=target_emb).sample.float()
        loss = F.mse_loss(prediction[:n], target.float())
        if cfg.prior_preservation:
            loss = loss + cfg.prior_weight * F.mse_loss(prediction[n:], torch.cat(prior_noise).float())
        return loss

    return loss_fn
