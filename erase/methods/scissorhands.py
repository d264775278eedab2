"""Scissorhands (Wu & Harandi, ECCV 2024; arXiv 2401.06187): trim the weights that carry the forget data, then
repair the trimmed model. (Not Selective Amnesia, which UnlearnCanvas calls SA.) What the public code does, which
we follow (JingWu321/Scissorhands SD/shs_nsfw.py and shs_cls.py; UnlearnCanvas mu_scissorhands_shs/train-erase.py):

1. Connection sensitivity (SNIP): `s = |Σ_b |∇ℓ_f(b)| ⊙ w|`, the per-batch gradient magnitudes summed over
   `mask_batches` batches of `mask_batch_size` forget images (train-erase.py:61-92). ℓ_f (`mask_loss`): the plain
   diffusion loss with the forget prompts, "diffusion" (train-erase.py:72, shs_nsfw.py:73), or shs_cls.py:82-90's
   "guided" `MSE(ε, (1+g)·e(x_t,c_f) − g·e(x_t,∅))`, g 7.5. Ranked globally over the whole UNet (`mask_scope`
   "unet", all three scripts) or over the parameter set ("params").
2. Trim: the top `sparsity` fraction of the ranked weights, exactly round(sparsity·n) (ties by position), is
   re-initialised where it lies in `reinit_params` (None: the parameter set; always within it): biases to zero,
   other tensors by `reinit`: "trunc_normal" (std `reinit_std` 0.02, cut at ±`reinit_bound` 2, an absolute bound as
   in timm's trunc_normal_, so with std 0.02 a plain normal; train-erase.py:104, shs_cls.py:126),
   "kaiming_uniform" (U(±√(6/fan_in)), kaiming_uniform_(a=0, relu) of shs_nsfw.py:106) or "zeros". Once, before
   training, from the seed. NOTE: the codes' `--sparsity s` is the fraction KEPT: they re-initialise the scores
   above the int(s·n)-th smallest (train-erase.py:92-96), so their 0.99 is our 0.01 (the paper's "top-k%").
   They also re-initialise only inside a hard-coded set while ranking and training the whole UNet: attn2
   (train-erase.py:101) or attn1 of LDM output_blocks.4 and .7 (shs_nsfw.py:102, shs_cls.py:121).
3. Repair, for `steps` (or `epochs` · ceil(forget images / batch_size)): `forget_loss` "relabel":
   `α·‖e(x_t,c_f) − sg(e(x_t,c'))‖² + ‖e(x_r,t,c_r) − ε‖²` (train-erase.py:231-246, shs_nsfw.py:222-230), c' the
   pseudo prompt, the target the trained model detached, α `alpha`; or "ascent": `‖e(x_r,t,c_r) − ε‖² −
   α·‖e(x_t,c_f) − ε‖²`, gradient ascent on the forget set (shs_cls.py:230-239). Every weight of the set trains.
4. Projection (`project`; no released command turns it on): the memories are gradients, on the trimmed model, of
   −ℓ_diffusion on `memory_batches` forget batches ("forget", train-erase.py:164-190: the update then does not
   lower the forget loss to first order) or of +ℓ_diffusion on retain batches ("remain", the cone of remain
   gradients: it does not raise the remain loss). Every `project_every` steps (train-erase.py:250), a gradient with
   a negative product with some memory is replaced by GEM's projection (erase.projection, margin `project_margin`
   0.5 as the code's). Ours is exact; the code adds 1e-3 to the Gram diagonal for quadprog, which can leave a
   negative product. It runs as the loop's `grad_transform` (erase.train), after accumulation, before clipping.
Not copied: the codes take next(iter(loader)) at every use, so with their unshuffled forget loaders the SNIP
passes, the memories and every training step see the first forget batch only (and UnlearnCanvas's memories
accumulate without zero_grad); ours take successive batches, cyclically, with fresh t and noise each, and draw
independent samples per step as every method here. shs_nsfw.py and train-erase.py re-encode the forget images for
the pseudo prediction (another VAE posterior sample); we use one x_t for both, as SalUn. UnlearnCanvas keeps
memories and projects only over attn2 (train-erase.py:163); we cover the trained set.
Prompts and image sets: as SalUn's (erase.images.image_prompts: one template with {object}/{style}, or a list).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ForgetRetainConfig, steps_of_epochs
from ..context import RunContext
from ..images import diffusion_loss, image_prompts, named_image_files
from ..params import check_spec, select
from ..projection import ConeProjection
from ..relabel import ForgetRetain, load_forget_retain, relabel_terms
from ..saliency import guided_mask_loss, summed_gradients, top_fraction
from ..sampling import sample_seed
from ..train import LossFn

REINIT_MODES = ("trunc_normal", "kaiming_uniform", "zeros")
MASK_LOSSES = ("diffusion", "guided")
MASK_SCOPES = ("unet", "params")
FORGET_LOSSES = ("relabel", "ascent")
MEMORIES = ("forget", "remain")
# attn1 of LDM output_blocks.4 and .7 (shs_nsfw.py:102) in diffusers names, for SD 1.x/2.x UNets (erase.convert).
OFFICIAL_REINIT = "up_blocks.1.attentions.1.*.attn1.*,up_blocks.2.attentions.1.*.attn1.*"


@dataclass
class ScissorhandsConfig(ForgetRetainConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper's NSFW recipe (JingWu321/Scissorhands SD/train_shs.sh:1: shs_nsfw.py --train_method full
        # --sparsity 0.995 --lam 0.1 --memory_num 1 --prune_num 10 --lr 1e-5 --epochs 5 --batch_size 16; SD/README.md
        # shows --epochs 3), Adam (shs_nsfw.py:186); SNIP on the plain diffusion loss, 10 passes (:71-73); kaiming
        # re-init of attn1 in output_blocks.4/.7 only (:102-110); pseudo prompt "a photo of a person wearing
        # clothes" (:195, :213). Needs its data: generated NSFW forget images with their prompts, and not-NSFW ones.
        "paper": {
            "epochs": 5, "lr": 1e-5, "batch_size": 16, "alpha": 0.1, "forget_loss": "relabel", "sparsity": 0.005,
            "mask_batches": 10, "mask_batch_size": 16, "mask_loss": "diffusion", "mask_scope": "unet",
            "reinit": "kaiming_uniform", "reinit_params": OFFICIAL_REINIT, "params": "all", "memory_batches": 1,
            "pseudo_prompts": "a photo of a person wearing clothes",
        },
        # The paper's Imagenette class recipe (train_shs.sh:3: shs_cls.py --sparsity 0.999 --lam 0.1 --memory_num 1
        # --prune_num 10 --lr 2e-5 --epochs 3, batch 8 by default): guided SNIP loss (:82-90), trunc-normal re-init
        # of the same attn1 layers (:121-129), gradient ascent (:239), prompts "an image of a {class}".
        "paper-class": {
            "epochs": 3, "lr": 2e-5, "batch_size": 8, "alpha": 0.1, "forget_loss": "ascent", "sparsity": 0.001,
            "mask_batches": 10, "mask_batch_size": 8, "mask_loss": "guided", "mask_guidance": 7.5,
            "mask_scope": "unet", "reinit": "trunc_normal", "reinit_std": 0.02, "reinit_params": OFFICIAL_REINIT,
            "params": "all", "memory_batches": 1,
            "forget_prompts": "an image of a {object}", "retain_prompts": "an image of a {object}",
        },
        # UnlearnCanvas (machine_unlearning/mu_scissorhands_shs/train-erase.py): defaults :293-306 (train_method
        # full, alpha 0.1, epochs 2, sparsity 0.99, no --project, memory_num 1, prune_num 1), :114 batch 4, lr 1e-5,
        # :195 Adam; SNIP (:56-107) on one forget batch with the plain diffusion loss over the whole UNet, attn2
        # re-initialised by trunc_normal_(std=.02), biases zero. Data (generate_dataset.py): forget = the style's
        # images 1-3 of every object (60: 15 batches of 4), "A {object} image in {style} style."; remain =
        # Seed_Images 1-3, "A {object} image in Photo style.", and the pseudo prompts are the remain batch's
        # prompts (:211), i.e. forget image k's is remain prompt k. Their model trains at 512 px (:115).
        "unlearncanvas-style": {
            "epochs": 2, "lr": 1e-5, "batch_size": 4, "alpha": 0.1, "forget_loss": "relabel", "sparsity": 0.01,
            "mask_batches": 1, "mask_batch_size": 4, "mask_loss": "diffusion", "mask_scope": "unet",
            "reinit": "trunc_normal", "reinit_std": 0.02, "reinit_params": "xattn", "params": "all",
            "forget_prompts": "A {object} image in {style} style.",
            "pseudo_prompts": "A {object} image in Photo style.",
            "retain_prompts": "A {object} image in Photo style.",
        },
        # Objects (scripts/run_class_scripts_1.py:14): as styles, but forget = the object's images 1-3 in all 51
        # themes (153; their Seed_Images prompt reads "Seed Images style"), remain = the next object's
        # (--remain_data_dir data/<next>), whose prompts are the pseudo prompts: one per forget image, given as a
        # list (the bench does).
        "unlearncanvas-object": {
            "epochs": 2, "lr": 1e-5, "batch_size": 4, "alpha": 0.1, "forget_loss": "relabel", "sparsity": 0.01,
            "mask_batches": 1, "mask_batch_size": 4, "mask_loss": "diffusion", "mask_scope": "unet",
            "reinit": "trunc_normal", "reinit_std": 0.02, "reinit_params": "xattn", "params": "all",
            "forget_prompts": "A {object} image in {style} style.",
            "retain_prompts": "A {object} image in {style} style.",
        },
    }  # fmt: skip
    # Ours, chosen by scripts/tune_toy.py on the tuning targets only (docs/results/tuning/scissorhands-*.md): each
    # kind's UnlearnCanvas recipe trained for 200 steps at lr 1e-4 with α 1 (its 12 steps at lr 1e-5 leave a toy
    # target untouched, UA 0). Tuning means (not results), UA / IRA / CRA: styles 100 / 99.7 / 100, objects
    # 100 / 100 / 100. Held-out results: docs/results/toy.md.
    PRESETS["toy"] = {**PRESETS["unlearncanvas-style"], "steps": 200, "lr": 1e-4, "alpha": 1.0}
    PRESETS["toy-object"] = {**PRESETS["unlearncanvas-object"], "steps": 200, "lr": 1e-4, "alpha": 1.0}

    lr: float = 1e-5
    batch_size: int = 4
    alpha: float = 0.1  # weight of the forget term
    forget_loss: str = "relabel"  # "relabel" (UnlearnCanvas, shs_nsfw.py) or "ascent" (shs_cls.py)
    sparsity: float = 0.01  # fraction of the ranked weights re-initialised (the code's --sparsity is 1 − this)
    mask_batches: int = 1  # SNIP gradient passes (the code's --prune_num)
    mask_batch_size: int = 4
    mask_loss: str = "diffusion"
    mask_guidance: float = 7.5  # g of the guided mask loss
    mask_scope: str = "unet"  # weights ranked: the whole UNet or the parameter set
    mask_prompts: str | list[str] | None = None  # c_f of the mask loss; None: the forget prompts
    reinit: str = "trunc_normal"
    reinit_std: float = 0.02
    reinit_bound: float = 2.0  # absolute cut of the truncated normal (timm's and torch's default b)
    reinit_params: str | None = None  # parameter set that may be re-initialised (within the trained one)
    project: bool = False
    project_memory: str = "forget"
    memory_batches: int = 1  # memory gradients, each from one batch of batch_size images (the code's --memory_num)
    project_every: int = 10
    project_margin: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), the fraction of weights re-initialised (the authors' "
                             f"--sparsity s is 1 − s here), got {self.sparsity!r}")  # fmt: skip
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        for name, value, accepted in (
            ("reinit", self.reinit, REINIT_MODES), ("forget_loss", self.forget_loss, FORGET_LOSSES),
            ("mask_loss", self.mask_loss, MASK_LOSSES), ("mask_scope", self.mask_scope, MASK_SCOPES),
            ("project_memory", self.project_memory, MEMORIES),
        ):  # fmt: skip
            if value not in accepted:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(accepted)}")
        for name in ("mask_batches", "mask_batch_size", "memory_batches", "project_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("reinit_std", "reinit_bound"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not self.project_margin >= 0:
            raise ValueError(f"project_margin must be a number >= 0, got {self.project_margin!r}")
        if self.reinit_params is not None:
            check_spec(self.reinit_params)
        forget = named_image_files("forget_images", self.forget_images)
        for name in ("forget_prompts", "pseudo_prompts") + (("mask_prompts",) if self.mask_prompts else ()):
            image_prompts(name, getattr(self, name), forget)
        image_prompts("retain_prompts", self.retain_prompts, named_image_files("retain_images", self.retain_images))
        steps_of_epochs(self, len(forget))


def cyclic_batches(count: int, size: int, number: int) -> list[slice]:
    """`number` batches of the `count` items in order, `size` each (the last of a pass may be short), cycling."""
    chunks = [slice(start, min(start + size, count)) for start in range(0, count, size)]
    return [chunks[b % len(chunks)] for b in range(number)]


def connection_sensitivity(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    scheduler,
    latents: torch.Tensor,
    emb: torch.Tensor,
    batches: list[slice],
    seed: int,
    null_emb: torch.Tensor | None = None,
    guidance: float = 7.5,
) -> dict[str, torch.Tensor]:
    """SNIP scores |Σ_b |∇ℓ_f(batch b)| ⊙ w| of `params` (float32), ℓ_f the guided mask loss when `null_emb` (one ∅
    embedding) is given, else the plain diffusion loss; batch b draws t and ε from sample_seed(seed, "shs-mask", b)."""

    def batch_loss(b: int, rows: slice):
        def loss() -> torch.Tensor:
            g = torch.Generator().manual_seed(sample_seed(seed, "shs-mask", b))
            x, e = latents[rows], emb[rows]
            if null_emb is None:
                return diffusion_loss(model, scheduler, x, e, g)
            return guided_mask_loss(model, scheduler, x, e, null_emb.expand_as(e), guidance, g)

        return loss

    grads = summed_gradients(model, params, [batch_loss(b, rows) for b, rows in enumerate(batches)], absolute=True)
    return {name: g.mul_(params[name].detach().float()).abs_() for name, g in grads.items()}  # in place: one copy


def initial_values(name: str, shape: tuple[int, ...], mode: str, std: float, bound: float, generator) -> torch.Tensor:
    """Fresh float32 values for a tensor (drawn on the CPU, so identical on every device): zeros for biases and in
    mode "zeros"; a normal(0, std) cut at ±bound; or U(±√(6/fan_in)), zeros where a tensor has no fan-in (< 2 dims)."""
    if mode == "zeros" or name.endswith("bias") or (mode == "kaiming_uniform" and len(shape) < 2):
        return torch.zeros(shape)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    if mode == "trunc_normal":  # inverse CDF of the normal between its values at ±bound
        low, high = (0.5 * (1 + math.erf(x / (std * math.sqrt(2)))) for x in (-bound, bound))
        values = std * math.sqrt(2) * torch.erfinv(2 * (low + (high - low) * u) - 1)
        return values.clamp(-bound, bound).float()
    fan_in = shape[1] * math.prod(shape[2:])
    return ((2 * u - 1) * math.sqrt(6 / fan_in)).float()


@torch.no_grad()
def reinitialise(params: dict[str, nn.Parameter], chosen: dict[str, torch.Tensor], cfg: ScissorhandsConfig) -> int:
    """Overwrite the chosen entries of each tensor with `initial_values` (seeded per tensor name); the other entries
    stay bit-identical. Returns how many weights were re-initialised."""
    count = 0
    for name, p in params.items():
        mask = chosen[name].to(p.device)
        if not bool(mask.any()):
            continue
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, "shs-reinit", name))
        fresh = initial_values(name, tuple(p.shape), cfg.reinit, cfg.reinit_std, cfg.reinit_bound, g)
        p.copy_(torch.where(mask, fresh.to(device=p.device, dtype=p.dtype), p))
        count += int(mask.sum())
    return count


def trim(ctx: RunContext, data: ForgetRetain) -> dict[str, torch.Tensor]:
    """Rank by connection sensitivity, re-initialise the chosen weights of the re-init set; returns the chosen masks
    of the ranked scope."""
    cfg: ScissorhandsConfig = ctx.config
    unet = ctx.pipe.unet
    files = named_image_files("forget_images", cfg.forget_images)
    prompts = image_prompts("mask_prompts", cfg.mask_prompts or cfg.forget_prompts, files)
    ranked = select(unet, "all") if cfg.mask_scope == "unet" else ctx.params
    null = ctx.encode("") if cfg.mask_loss == "guided" else None
    batches = cyclic_batches(len(data.forget), cfg.mask_batch_size, cfg.mask_batches)
    scores = connection_sensitivity(
        unet, ranked, ctx.pipe.scheduler, data.forget, ctx.encode(prompts), batches, cfg.seed, null, cfg.mask_guidance
    )
    chosen = top_fraction(scores, cfg.sparsity)
    allowed = set(select(unet, cfg.reinit_params)) if cfg.reinit_params else set(ctx.params)
    names = [name for name in ctx.params if name in allowed]
    if not names:
        raise ValueError(f"reinit_params {cfg.reinit_params!r} selects no weight of the parameter set "
                         f"{cfg.parameter_set()!r}; re-initialised weights must be trained ones")  # fmt: skip
    reinitialise({name: ctx.params[name] for name in names}, chosen, cfg)
    return chosen


def memory_gradients(ctx: RunContext, data: ForgetRetain) -> list[dict[str, torch.Tensor]]:
    """The projection's memories on the trimmed model: ∇(−ℓ_diffusion) of forget batches or ∇ℓ_diffusion of retain
    batches, `memory_batches` of `batch_size` images, one memory per batch."""
    cfg: ScissorhandsConfig = ctx.config
    unet, scheduler = ctx.pipe.unet, ctx.pipe.scheduler
    forget = cfg.project_memory == "forget"
    latents = data.forget if forget else data.retain
    emb = ctx.encode(data.forget_prompts if forget else data.retain_prompts)
    sign = -1.0 if forget else 1.0

    def batch_loss(b: int, rows: slice):
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, "shs-memory", b))
        return lambda: sign * diffusion_loss(unet, scheduler, latents[rows], emb[rows], g)

    batches = cyclic_batches(len(latents), cfg.batch_size, cfg.memory_batches)
    return [summed_gradients(unet, ctx.params, [batch_loss(b, rows)]) for b, rows in enumerate(batches)]


def make_loss(ctx: RunContext) -> LossFn:
    """The repair loss for the training loop, after trimming the model in place (once, from the seed); with
    `project`, hands the loop the projection as `ctx.grad_transform`."""
    cfg: ScissorhandsConfig = ctx.config
    data = load_forget_retain(
        ctx.pipe, cfg.forget_images, cfg.forget_prompts, cfg.pseudo_prompts, cfg.retain_images, cfg.retain_prompts
    )
    trim(ctx, data)
    if cfg.project:
        ctx.grad_transform = ConeProjection(memory_gradients(ctx, data), cfg.project_margin, cfg.project_every)
    relabel = cfg.forget_loss == "relabel"

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        target = "pseudo" if relabel else "noise"
        forget, retain = relabel_terms(model, ctx.pipe.scheduler, ctx.encode, data, generators, target)
        return retain + cfg.alpha * forget if relabel else retain - cfg.alpha * forget

    return loss_fn
