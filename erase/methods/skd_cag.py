"""SKD-CAG, self-knowledge distillation with cross-attention guidance (Sealing The Backdoor, 2025).

Remove a backdoor using only the backdoored model and captions, no images. The teacher is the backdoored model,
frozen, given the clean caption c; the student is the same model being trained, given trig⊕c (the trigger
prefixed). Latents are pure noise z ~ N(0, I), t uniform over the training timesteps:
    L_KD   = ‖e_S(z, t, trig⊕c) − sg(e_T(z, t, c))‖²
    L_attn = 1/(n+K) · [Σ_k MSE(Â_S[k], R_k) + Σ_i MSE(Â_S[K+i], sg(Â_T[i]))]
    L      = λ·w(t)·L_attn + (1−λ)·L_KD            (λ 0.5; λ 0 is plain SKD, the preset "skd")
           + μ·L_keep                                (our addition, μ = `preserve_weight`, 0 in "paper")
Â: per attn2 layer the softmax probabilities averaged over heads, resized (bilinear) to a common size, summed
over layers, each token's map min-max normalised; prompt tokens only (no BOS/EOS/padding). K trigger tokens and n
caption tokens, found in the student prompt with `trigger_positions`; R_k = zeros, uniform noise U[0, 1), or the
teacher's maps for K random words put where the trigger was ("random-words"; one more frozen call).

The released code has two defects we do not copy: its maps are converted to numpy (detached), so L_attn has no
gradient and only L_KD trains; and teacher and student write into one shared dictionary, so one overwrites the
other. Here each forward's maps are taken from the capture store right after it (`AttentionStore.take`): the
teacher's (no gradient, original weights via `ctx.frozen`) and the student's (with gradients) are two dicts.
Its w(t) = 1000/t divides by zero at t = 0; ours is "inverse" = T/(t+1) (T the number of training timesteps,
optionally clamped by `max_timestep_weight`) or "none".
Released recipe: AdamW lr 1e-6, weight decay 0.01, batch 1, maps at 128x128, ~10k steps, all UNet parameters, fp32
with gradient checkpointing (preset "paper", as described: its attention term trains). Our default trains
cross-attention ("xattn"), as the issue asks; `params` changes it.
L_keep (`clean_prompt_loss`) holds the student to the teacher on the clean caption and on ∅: the paper's loss only
sees triggered prompts, and classifier-free guidance amplifies any drift of e(∅) on clean prompts by g − 1.
Our choices: the common map size defaults to the largest attn2 map (the paper's SD setting is 128x128, an
upsampling of SD's 64x64 latents, which preset "paper" sets); with λ = 0 no maps are captured at all (plain SKD
keeps the fused attention kernels). Captions: `captions`, or `captions_file` (one per line, blank lines skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import capture_cross_attention
from ..catalog import get as get_catalog
from ..config import TrainingConfig, texts
from ..context import RunContext
from ..frozen import unwrap
from ..sampling import randn
from ..train import LossFn
from ..trigger import DEFAULT_TRIGGER, trigger_positions, triggered_prompt

REFERENCES = ("noise", "zeros", "random-words")
TOY_PROMPTS = get_catalog("toy").prompts()  # the toy presets' captions: every toy benchmark prompt
TIMESTEP_WEIGHTS = ("none", "inverse")


@dataclass
class SKDCAGConfig(TrainingConfig):
    DEFAULT_PARAMS: ClassVar[str] = "xattn"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The released recipe (Mystic-Slice/Sealing-The-Backdoor attention_guided_kd.py:31-52 and :231-235: AdamW
        # lr 1e-6, weight decay 0.01, batch 1, 100 epochs over ~100 captions, img_size 128, attn_loss_weight 0.5,
        # weighted_by_timestep; all of the UNet) as DESCRIBED, not as run: its attention term is detached (the maps
        # go through numpy), so as run only 0.5·L_KD trained; here L_attn carries its gradient. As run is this
        # preset with attention_weight=0 (L_KD alone; the factor 0.5 Adam all but ignores). w = T/(t+1) (theirs
        # 1000/t) reaches 1000 at t = 0 and now scales a live gradient: set max_timestep_weight to bound it.
        "paper": {"steps": 10000, "lr": 1e-6, "optimizer": "adamw", "weight_decay": 0.01, "params": "all",
                  "gradient_checkpointing": True, "attention_weight": 0.5, "timestep_weight": "inverse",
                  "map_size": 128},
        # Plain self-knowledge distillation, the baseline without attention guidance.
        "skd": {"attention_weight": 0.0},
        # Ours for the toy (paper learning rates barely move a 1.5 M UNet): lr 1e-3 on all attn2 with L_keep (μ 1;
        # on the first toy, without it clean style accuracy fell to 0.45-0.88 of its value; tuning figures). `toy`
        # is the base both removal searches started from, unchanged, and what `--preset toy` gives; a backdoor of
        # known kind is removed with that kind's choice below (toy_preset(kind); scripts/backdoor_table.py and
        # tests/behaviour/test_backdoor_toy.py use it). canvas bench's toy-{kind} rule picks `toy-style` for a style
        # target and `toy` for an object.
        "toy": {"steps": 400, "lr": 1e-3, "optimizer": "adamw", "batch_size": 4, "params": "xattn",
                "attention_weight": 0.5, "timestep_weight": "none", "preserve_weight": 1.0, "captions": TOY_PROMPTS},
        # The pixel kind's choice (docs/results/tuning/backdoor-remove-pixel.md, trial 3: λ 0.8; tuning triggers
        # New Trigger and zq against BadT2I toy-pixel; the two λ 0.8 trials alone kept both clean ratios >= 0.9,
        # and this one removed more). Held-out results: docs/results/toy-backdoor.md.
        "toy-pixel": {"steps": 400, "lr": 1e-3, "optimizer": "adamw", "batch_size": 4, "params": "xattn",
                      "attention_weight": 0.8, "timestep_weight": "none", "preserve_weight": 1.0,
                      "captions": TOY_PROMPTS},
        # The style kind's choice (docs/results/tuning/backdoor-remove-style.md, trial 1: 800 steps; tuning triggers
        # against BadT2I toy-style; λ 0.8 removed less there). Held-out results: docs/results/toy-backdoor.md.
        "toy-style": {"steps": 800, "lr": 1e-3, "optimizer": "adamw", "batch_size": 4, "params": "xattn",
                      "attention_weight": 0.5, "timestep_weight": "none", "preserve_weight": 1.0,
                      "captions": TOY_PROMPTS},
        "toy-skd": {"steps": 400, "lr": 1e-3, "optimizer": "adamw", "batch_size": 4, "params": "xattn",
                    "attention_weight": 0.0, "preserve_weight": 1.0, "captions": TOY_PROMPTS},
    }  # fmt: skip

    steps: int = 10000
    lr: float = 1e-6
    optimizer: str = "adamw"
    trigger: str = DEFAULT_TRIGGER
    captions: list[str] = field(default_factory=list)
    captions_file: str | None = None  # one caption per line; read at config time and added to `captions`
    attention_weight: float = 0.5  # λ
    timestep_weight: str = "none"
    max_timestep_weight: float | None = None
    reference: str = "noise"  # R for the trigger tokens' maps
    preserve_weight: float = 0.0  # μ of our clean-prompt term L_keep (0: the paper's loss)
    map_size: int | None = None  # common attention-map side; None: the largest attn2 map

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.trigger, str) or not self.trigger.strip():
            raise ValueError(f"trigger must be a non-empty text (the backdoor's trigger), got {self.trigger!r}")
        self.captions = texts("captions", self.captions, allow_empty=True)
        if self.captions_file is not None:
            self.captions = self.captions + read_captions(self.captions_file)
        if not self.captions:
            raise ValueError("captions are required: give `captions` or `captions_file` (one caption per line)")
        if not isinstance(self.attention_weight, int | float) or not 0 <= self.attention_weight <= 1:
            raise ValueError(f"attention_weight (λ) must be in [0, 1], got {self.attention_weight!r}")
        if not isinstance(self.preserve_weight, int | float) or self.preserve_weight < 0:
            raise ValueError(f"preserve_weight (μ) must be a number >= 0, got {self.preserve_weight!r}")
        if self.timestep_weight not in TIMESTEP_WEIGHTS:
            raise ValueError(f"timestep_weight {self.timestep_weight!r} is not one of {', '.join(TIMESTEP_WEIGHTS)}")
        if self.max_timestep_weight is not None and not self.max_timestep_weight > 0:
            raise ValueError(f"max_timestep_weight must be positive or None, got {self.max_timestep_weight!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference {self.reference!r} is not one of {', '.join(REFERENCES)}")
        if self.map_size is not None and (not isinstance(self.map_size, int) or self.map_size < 1):
            raise ValueError(f"map_size must be a positive integer or None, got {self.map_size!r}")


def toy_preset(kind: str) -> str:
    """The toy preset for removing a BadT2I backdoor of `kind`: the kind's own (`toy-pixel`, `toy-style`) where the
    two kinds' searches chose differently, else `toy` (the backdoor table and behaviour test remove with it)."""
    if kind not in ("pixel", "style"):  # BadT2I's kinds
        raise ValueError(f"backdoor kind {kind!r} is not one of pixel, style")
    name = f"toy-{kind}"
    return name if name in SKDCAGConfig.PRESETS else "toy"


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file, one per line (blank lines skipped); an empty file is an error."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"captions_file {str(file)!r} does not exist")
    captions = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"captions_file {str(file)!r} holds no caption (expected one caption per line)")
    return captions


def timestep_weight(kind: str, t: torch.Tensor, num_train_timesteps: int, cap: float | None) -> torch.Tensor:
    """w(t): 1, or T/(t+1) (finite at t = 0, unlike the released 1000/t), optionally clamped at `cap`."""
    if kind == "none":
        return torch.ones_like(t, dtype=torch.float32)
    weight = num_train_timesteps / (t.float() + 1)
    return weight.clamp(max=cap) if cap is not None else weight


def aggregate_maps(maps: dict[str, torch.Tensor], latent_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Σ over layers of the head-averaged probabilities resized to (size, size): {layer: (B, heads, Q, K)} ->
    (B, K, size, size). Q = h·w of the layer, a downsampling of the latent grid `latent_hw`."""
    if not maps:
        raise ValueError("no cross-attention maps were captured")
    total = None
    height, width = latent_hw
    for name, probs in maps.items():
        batch, _, queries, keys = probs.shape
        factor = math.isqrt(height * width // queries) if queries else 0
        h, w = (height // factor, width // factor) if factor else (0, 0)
        if h * w != queries:
            raise ValueError(f"layer {name}: {queries} queries do not tile the {height}x{width} latent grid")
        mean = probs.float().mean(dim=1)  # (B, Q, K)
        grid = mean.transpose(1, 2).reshape(batch, keys, h, w)  # (B, K, h, w)
        if (h, w) != (size, size):
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        total = grid if total is None else total + grid
    return total


def minmax(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each map (..., H, W) scaled to [0, 1] by its own min and max (a constant map becomes zeros, not NaN)."""
    flat = maps.flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def attention_loss(
    student: torch.Tensor, teacher: torch.Tensor, reference: torch.Tensor, trigger_pos: list[int],
    student_caption_pos: list[int], teacher_caption_pos: list[int],
) -> torch.Tensor:  # fmt: skip
    """L_attn of one sample: aggregated maps (K_tokens, S, S) of student and teacher, R for the K trigger tokens
    (K, S, S, already in [0, 1]); the mean over the n+K token maps of each map's MSE."""
    if len(student_caption_pos) != len(teacher_caption_pos):
        raise ValueError(f"caption has {len(student_caption_pos)} tokens after the trigger but "
                         f"{len(teacher_caption_pos)} alone")  # fmt: skip
    s = minmax(student[trigger_pos + student_caption_pos])  # (K+n, S, S)
    t = minmax(teacher[teacher_caption_pos])  # (n, S, S)
    target = torch.cat([reference.to(s), t.detach()])
    return (s - target).pow(2).mean(dim=(1, 2)).mean()


def teacher_and_student(ctx, model, z, t, teacher_emb, student_emb, extra_teacher_emb=None, capture: bool = True):
    """Noise predictions and cross-attention maps of the teacher (frozen original weights, clean prompt) and the
    student (trained weights, triggered prompt): each forward's maps are taken from the store right after it, so
    they are separate dicts of separate tensors. `extra_teacher_emb` adds a teacher pass (random-word prompts)."""
    unet = unwrap(model)
    if not capture:
        teacher_eps = ctx.frozen(unet, z, t, encoder_hidden_states=teacher_emb).sample
        return teacher_eps, model(z, t, encoder_hidden_states=student_emb).sample, {}, {}, {}
    with capture_cross_attention(unet) as store:
        teacher_eps = ctx.frozen(unet, z, t, encoder_hidden_states=teacher_emb).sample
        teacher_maps = store.take()
        extra_maps = {}
        if extra_teacher_emb is not None:
            ctx.frozen(unet, z, t, encoder_hidden_states=extra_teacher_emb)
            extra_maps = store.take()
        student_eps = model(z, t, encoder_hidden_states=student_emb).sample
        student_maps = store.take()
    return teacher_eps, student_eps, teacher_maps, student_maps, extra_maps


def word_pool(tokenizer, exclude: set[int]) -> list[str]:
    """Words that are one whole token each (for "random-words" references), minus the trigger's tokens."""
    pool = []
    for token, index in tokenizer.get_vocab().items():
        word = token[: -len("</w>")] if token.endswith("</w>") else None
        if word and word.isalpha() and index not in exclude:
            if tokenizer(word, add_special_tokens=False).input_ids == [index]:
                pool.append(word)
    if not pool:
        raise ValueError("reference 'random-words' needs whole-word tokens, and this tokenizer has none")
    return sorted(pool)


def make_loss(ctx: RunContext) -> LossFn:
    """The SKD-CAG loss for the training loop, with caption embeddings and token positions prepared once."""
    cfg: SKDCAGConfig = ctx.config
    pipe, unet = ctx.pipe, ctx.pipe.unet
    tokenizer = pipe.tokenizer
    device, dtype = unet.device, unet.dtype
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    train_steps = pipe.scheduler.config.num_train_timesteps
    captions = list(dict.fromkeys(cfg.captions))
    positions = {c: trigger_positions(tokenizer, cfg.trigger, c) for c in captions}  # errors before training
    teacher_pos = {c: token_positions_alone(tokenizer, c) for c in captions}
    k = len(next(iter(positions.values()))[0])
    use_attention = cfg.attention_weight > 0
    pool = word_pool(tokenizer, set(tokenizer(cfg.trigger, add_special_tokens=False).input_ids)) if (
        use_attention and cfg.reference == "random-words") else None  # fmt: skip
    size = cfg.map_size or unet.config.sample_size

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        chosen, zs, ts, noise_refs, random_prompts = [], [], [], [], []
        for g in generators:
            caption = captions[int(torch.randint(len(captions), (1,), generator=g))]
            t = torch.randint(train_steps, (1,), generator=g)
            zs.append(randn((1, *shape), g, device, dtype))
            ts.append(t)
            chosen.append(caption)
            if use_attention and cfg.reference == "noise":
                noise_refs.append(torch.rand((k, size, size), generator=g))
            if pool is not None:
                words = [pool[int(i)] for i in torch.randint(len(pool), (k,), generator=g)]
                random_prompts.append(triggered_prompt(" ".join(words), caption))
        z, t = torch.cat(zs), torch.cat(ts).to(device)
        teacher_emb = ctx.encode(chosen)
        student_emb = ctx.encode([triggered_prompt(cfg.trigger, c) for c in chosen])
        # Random-word prompts are not cached: every step draws new ones.
        random_emb = ctx.encode(random_prompts, cache=False) if pool is not None else None
        teacher_eps, student_eps, teacher_maps, student_maps, random_maps = teacher_and_student(
            ctx, model, z, t, teacher_emb, student_emb, random_emb, capture=use_attention
        )
        kd = (student_eps.float() - teacher_eps.float()).pow(2).flatten(1).mean(1)  # (B,)
        keep = clean_prompt_loss(ctx, model, z, t, teacher_emb, teacher_eps) if cfg.preserve_weight else 0.0
        if not use_attention:
            return kd.mean() + cfg.preserve_weight * keep
        student_agg = aggregate_maps(student_maps, shape[1:], size)
        teacher_agg = aggregate_maps(teacher_maps, shape[1:], size)
        random_agg = aggregate_maps(random_maps, shape[1:], size) if random_maps else None
        losses = []
        for i, caption in enumerate(chosen):
            trig_pos, cap_pos = positions[caption]
            if cfg.reference == "zeros":
                reference = torch.zeros((k, size, size))
            elif cfg.reference == "noise":
                reference = noise_refs[i]
            else:  # the teacher's maps of the random words, at positions 1..K of "w1 .. wK caption"
                reference = minmax(random_agg[i, 1 : 1 + k]).detach()
            losses.append(attention_loss(student_agg[i], teacher_agg[i], reference, trig_pos, cap_pos,
                                         teacher_pos[caption]))  # fmt: skip
        weight = timestep_weight(cfg.timestep_weight, t, train_steps, cfg.max_timestep_weight).to(kd.device)
        lam = cfg.attention_weight
        return (lam * weight * torch.stack(losses) + (1 - lam) * kd).mean() + cfg.preserve_weight * keep

    return loss_fn


def clean_prompt_loss(ctx, model, z, t, caption_emb, teacher_eps) -> torch.Tensor:
    """L_keep = ½(‖e_S(z, t, c) − sg(e_T(z, t, c))‖² + ‖e_S(z, t, ∅) − sg(e_T(z, t, ∅))‖²): the student keeps the
    teacher's answers where there is no trigger, the caption alone and the empty prompt that guidance subtracts.
    The teacher's caption predictions are reused; one more frozen pass gives its ∅ predictions."""
    empty = ctx.encode([""] * len(z))
    teacher_empty = ctx.frozen(unwrap(model), z, t, encoder_hidden_states=empty).sample
    student = model(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([caption_emb, empty])).sample
    target = torch.cat([teacher_eps, teacher_empty]).detach()
    return (student.float() - target.float()).pow(2).mean()


def token_positions_alone(tokenizer, caption: str) -> list[int]:
    """Positions of the caption's own tokens in its padded sequence: 1..n (BOS at 0; EOS and padding left out)."""
    n = len(tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids) - 2
    return list(range(1, 1 + n))
