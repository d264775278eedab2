"""AdvUnlearn (Zhang et al., NeurIPS 2024): defensive unlearning with adversarial training.

A bilevel loop over ESD. Inner (erase.attack): for the iteration's concept c, k soft prefix vectors in the text
encoder's word-embedding space, after `attack_step` Adam steps on
    min_p ‖e_θ(x_t, E_θ([BOS, p, c])) − e0(x_t, c)‖²,   x_t from a partial DDIM run on c (fresh each step),
i.e. the prompt that makes the model being erased denoise c's images as the original did. Outer (one optimizer step
of the loop): the ESD loss on that adversarial prompt plus a utility term on `retain_batch` retain prompts r,
    ‖e_θ(x_t, E_θ([BOS, p*, c])) − sg(e0(x_t,∅) − η·(e0(x_t,c) − e0(x_t,∅)))‖²  +  w·‖e_θ(x_r, E_θ(r)) − e0(x_r, r)‖²
(the authors' `retain_train 'reg'`), with x_r from a partial DDIM run on r to the same step. θ is the text encoder
by default (their text_encoder_full: the transformer layers and final layer norm, `text-encoder-layers`), or UNet
tensors through `params`. The first `warmup_iter` iterations train on the plain prompt c; a new concept (and a new
attack) every `adv_prompt_update_step` iterations, drawn from `concepts`. Prompt embeddings of the original encoder
(c, ∅, r as targets) are encoded once; the trained encoder's come from a live forward with gradients.

SDXL (ours: the authors released SD 1.x code only): θ is both text encoders' layers by default (the first's last
layer and final norm, which SDXL's penultimate-state conditioning never reads, get no gradient and do not move), a
prefix vector spans both encoders' word embeddings of one token (erase.attack.WordEncoder), and x_t is guided
against the pipeline's zeroed negative, as ESD's SDXL script does (erase.methods.esd, `paper-sdxl`).

Where we differ from the released code, and why (train-scripts/AdvUnlearn.py, utils/attack_util.py):
- the attack zeroes its gradient each step; the released loop never calls `attack_opt.zero_grad()`
  (attack_util.py:175-207), so Adam there sees the running sum of all earlier gradients;
- the prompt's tokens are counted by the tokenizer; the released split counts words (`len(word.split())`,
  attack_util.py:144,224-226), which drops prompt tokens after the first n when a word has several tokens;
- `attack_init='latest'` starts from the last prefix found for the same concept (the released code keeps one, of
  whatever concept came last: AdvUnlearn.py:95-104) and, after a resume, from random;
- retain prompts are drawn at random without repeats within a step (the released PromptDataset draws without
  repeats across steps until the set is used up, prompt_dataset.py:9-28);
- `retain_train 'iter'` (a second optimizer step on the retain loss, AdvUnlearn.py:165-195) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attack import AttackResult, PrefixAttack, WordEncoder, content_tokens, prefix_attack, prompt_ids
from ..conditioning import sampling_unconditional
from ..config import TrainingConfig, concept_texts, texts
from ..context import RunContext
from ..frozen import unwrap
from ..sampling import ddim_partial, ddim_partial_each, ddim_scheduler, randn
from ..train import LossFn
from .esd import draw_steps, esd_target, frozen_noise_fn, latent_shape

RETAIN_TRAIN = ("reg", "none")
ATTACK_METHODS = ("pgd", "fast_at")


@dataclass
class AdvUnlearnConfig(TrainingConfig):
    """Field names follow the authors' flags. `params`: "text-encoder-layers" (default, their text_encoder_full),
    "text-encoder", `text_encoder.<glob>`, or UNet sets (their UNet train methods, e.g. "esd-u", "xattn")."""

    DEFAULT_PARAMS: ClassVar[str] = "text-encoder-layers"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The README's command (README.md:99: --attack_init random --attack_step 30 --retain_train reg
        # --dataset_retain coco_object --prompt nudity --train_method text_encoder_full --retain_loss_w 0.3), the rest
        # argparse defaults (train-scripts/AdvUnlearn.py): start_guidance 3 (:226), negative_guidance 1 (:227), DDIM
        # 50 (:234), retain_batch 5 (:240), iterations 1000 (:249), lr 1e-5 (:251), adv_prompt_num 1 (:254), prefix_k
        # word-embedding attack (:255-256), attack_step 30 (:258), adv_prompt_update_step 1 (:259), attack_lr 1e-3
        # (:260), warmup_iter 200 (:261), pgd (:247), component all (:248: the final layer norm trains too, util.py:44
        # -45); Adam (:62), batch 1, fp32, x_t by the model being trained and the paper-era timestep pairing
        # (get_loss.py:304-320). The retain prompts (their coco_object CSV) are not shipped: give `retain_prompts`.
        "paper": {"steps": 1000, "lr": 1e-5, "start_guidance": 3.0, "negative_guidance": 1.0, "ddim_steps": 50,
                  "retain_train": "reg", "retain_batch": 5, "retain_loss_w": 0.3, "adv_prompt_num": 1,
                  "attack_init": "random", "attack_step": 30, "attack_lr": 1e-3, "adv_prompt_update_step": 1,
                  "warmup_iter": 200, "attack_method": "pgd", "legacy_timestep_mapping": True},
        # Ours for the toy (2-layer text encoder; CPU-sized: 5-step attacks every 5 iterations after 50 of warm-up,
        # DDIM 10), chosen by scripts/tune_toy.py on the tuning targets only (docs/results/tuning/advunlearn-*.md).
        # Tuning means (not results) UA / IRA / CRA: styles 100 / 99.7 / 100, objects 81.8 / 97.7 / 86.6; lr 3e-3
        # lost IRA (styles 73.6, objects 29.5). Held-out means (docs/results/toy.md): styles 95.9 / 94.1 / 98.9,
        # objects 90.6 / 95.5 / 96.8.
        "toy": {"steps": 200, "lr": 1e-3, "start_guidance": 3.0, "negative_guidance": 3.0, "ddim_steps": 10,
                "retain_train": "reg", "retain_batch": 5, "retain_loss_w": 0.3, "adv_prompt_num": 1,
                "attack_init": "random", "attack_step": 5, "attack_lr": 1e-2, "adv_prompt_update_step": 5,
                "warmup_iter": 50, "attack_method": "pgd", "legacy_timestep_mapping": False},
    }  # fmt: skip

    concepts: list[str] = field(default_factory=list)
    retain_prompts: list[str] = field(default_factory=list)
    retain_train: str = "reg"
    retain_batch: int = 5
    retain_loss_w: float = 1.0
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    legacy_timestep_mapping: bool = True  # the paper-era pairing of erase.methods.esd (their code's)
    adv_prompt_num: int = 1  # k, the prefix vectors
    attack_step: int = 30
    attack_lr: float = 1e-3
    attack_init: str = "latest"
    attack_method: str = "pgd"  # fast_at: Adam on the gradient's sign
    attack_project: bool = False  # ours (off in `paper`): the prefix as its nearest real tokens (UnlearnDiffAtk)
    warmup_iter: int = 200
    adv_prompt_update_step: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = concept_texts(self.concepts)
        self.retain_prompts = texts("retain_prompts", self.retain_prompts, allow_empty=True)
        if self.retain_train not in RETAIN_TRAIN:
            raise ValueError(f"retain_train {self.retain_train!r} is not one of {', '.join(RETAIN_TRAIN)} "
                             "('iter', a second optimizer step per iteration, is not implemented)")  # fmt: skip
        if self.retain_train == "reg" and not self.retain_prompts:
            raise ValueError("retain_train 'reg' needs retain_prompts (prompts whose images to keep, e.g. "
                             "--set retain_prompts='a photo of a dog,a cat'), or retain_train='none'")  # fmt: skip
        if self.attack_method not in ATTACK_METHODS:
            raise ValueError(f"attack_method {self.attack_method!r} is not one of {', '.join(ATTACK_METHODS)}")
        for name, minimum in (("adv_prompt_num", 1), ("attack_step", 0), ("retain_batch", 1), ("ddim_steps", 1),
                              ("warmup_iter", 0), ("adv_prompt_update_step", 1)):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.retain_loss_w < 0:
            raise ValueError(f"retain_loss_w must be >= 0, got {self.retain_loss_w}")
        if not self.attack_lr > 0:
            raise ValueError(f"attack_lr must be a positive number, got {self.attack_lr}")
        if self.attack_init not in ("random", "latest"):
            raise ValueError(f"attack_init {self.attack_init!r} is not one of random, latest")

    def attack(self) -> PrefixAttack:
        """The inner attack's settings (erase.attack)."""
        return PrefixAttack(tokens=self.adv_prompt_num, steps=self.attack_step, lr=self.attack_lr,
                            init=self.attack_init, sign=self.attack_method == "fast_at",
                            project=self.attack_project)  # fmt: skip


def check_concepts(tokenizer, cfg: AdvUnlearnConfig) -> None:
    """Each concept must have content tokens, and fit the context with BOS, the k prefix vectors and EOS."""
    limit = tokenizer.model_max_length
    for concept in cfg.concepts:
        if not content_tokens(tokenizer, concept):
            raise ValueError(f"concept {concept!r} tokenizes to nothing (only unknown or special tokens)")
        count = len(tokenizer(concept, add_special_tokens=False).input_ids)
        if count + cfg.adv_prompt_num + 2 > limit:
            raise ValueError(f"concept {concept!r} has {count} tokens: with BOS, EOS and adv_prompt_num="
                             f"{cfg.adv_prompt_num} prefix vectors it exceeds the tokenizer's {limit}")  # fmt: skip


@dataclass
class Held:
    """A sample slot's concept and adversarial prompt, kept between attack rounds (`adv_prompt_update_step`)."""

    concept: int
    adversarial: AttackResult | None


def make_loss(ctx: RunContext) -> LossFn:
    """The AdvUnlearn loss for the training loop: the attack (after warm-up) then the ESD + retain loss."""
    cfg: AdvUnlearnConfig = ctx.config
    pipe, unet = ctx.pipe, ctx.pipe.unet
    encoder, tokenizer = WordEncoder.of(pipe), pipe.tokenizer
    check_concepts(tokenizer, cfg)
    device, dtype, shape = unet.device, unet.dtype, latent_shape(unet)
    scheduler = ddim_scheduler(pipe.scheduler.config, cfg.ddim_steps)
    train_steps = scheduler.config.num_train_timesteps
    frozen_noise = frozen_noise_fn(ctx)
    # The original encoder's embeddings, encoded now, before any training step changes it.
    empty = ctx.encode("")
    null = sampling_unconditional(pipe, empty)  # x_t's negative (SDXL: zeros); the target's ∅ is `empty`
    originals = [ctx.encode(c) for c in cfg.concepts]
    retain_original = ctx.encode(cfg.retain_prompts) if cfg.retain_prompts else None
    ids = [prompt_ids(tokenizer, c, encoder.device) for c in cfg.concepts]
    retain_ids = torch.cat([prompt_ids(tokenizer, r, encoder.device) for r in cfg.retain_prompts]) if (
        cfg.retain_prompts) else None  # fmt: skip
    attack = cfg.attack()
    held: dict[int, Held] = {}
    latest: dict[int, torch.Tensor] = {}
    drawn = [0]  # samples this process has drawn (the step index follows from it)

    def attack_objective(model, concept: int, g: torch.Generator):
        """The inner objective of concept `concept`: x_t drawn for every attack step at once (they do not depend
        on the prefix), then ‖e_θ(x_t, cond) − e0(x_t, c)‖² at the step's x_t."""
        draws = [draw_steps(cfg, g, train_steps) for _ in range(attack.steps)]
        if not draws:  # attack_step 0: the prefix stays as it starts
            return lambda cond, step: torch.zeros(())
        noise = torch.cat([randn((1, *shape), g, device, dtype) for _ in draws])
        n = len(draws)
        concept_emb = originals[concept].expand(n, -1, -1)
        x_t, levels = ddim_partial_each(sampler(model), scheduler, noise, concept_emb, null.expand(n, -1, -1),
                                        cfg.start_guidance, [s for s, _ in draws])  # fmt: skip
        t = torch.tensor([lv if fed is None else fed for lv, (_, fed) in zip(levels, draws, strict=True)],
                         device=device)  # fmt: skip
        target = frozen_noise(x_t, t, concept_emb)
        live = unwrap(model)
        return lambda cond, step: F.mse_loss(
            live(x_t[step : step + 1], t[step : step + 1], encoder_hidden_states=cond.to(dtype)).sample.float(),
            target[step : step + 1].float(),
        )

    def sampler(model):
        """x_t comes from the model being trained (its UNet tensors, if any, as they are now), as in their code."""
        live = unwrap(model)

        def noise(x, t, emb):
            with torch.no_grad():
                return live(x, t, encoder_hidden_states=emb).sample

        return noise

    def slot_state(model, g: torch.Generator, step: int, slot: int) -> Held:
        """The slot's concept and adversarial prompt: new ones at an update step (or when none is held)."""
        if step % cfg.adv_prompt_update_step == 0 or slot not in held:
            concept = int(torch.randint(len(cfg.concepts), (1,), generator=g))
            adversarial = None
            if step >= cfg.warmup_iter:
                objective = attack_objective(model, concept, g)
                adversarial = prefix_attack(objective, encoder, ids[concept], attack, g, latest.get(concept))
                latest[concept] = adversarial.prefix
            held[slot] = Held(concept, adversarial)
        return held[slot]

    def live_condition(state: Held) -> torch.Tensor:
        """The trained encoder's embedding of the adversarial prompt (or, in warm-up, of the plain concept)."""
        if state.adversarial is None:
            return encoder.encode(ids[state.concept])
        return encoder(state.adversarial.ids, state.adversarial.embeds)

    def sample_loss(model, g: torch.Generator, step: int, slot: int) -> torch.Tensor:
        state = slot_state(model, g, step, slot)
        steps, fed = draw_steps(cfg, g, train_steps)
        picks = []
        if cfg.retain_train == "reg":
            picks = torch.randperm(len(cfg.retain_prompts), generator=g)[: cfg.retain_batch].tolist()
        count = 1 + len(picks)
        noise = randn((count, *shape), g, device, dtype)
        concept = originals[state.concept]
        conds = torch.cat([concept, retain_original[picks]]) if picks else concept
        x, level = ddim_partial(sampler(model), scheduler, noise, conds, null.expand(count, -1, -1),
                                cfg.start_guidance, steps)  # fmt: skip
        t = torch.full((count,), level if fed is None else fed, device=device)
        target = esd_target(frozen_noise, x[:1], t[:1], concept, empty, cfg.negative_guidance)
        live = [live_condition(state)] + ([encoder.encode(retain_ids[picks])] if picks else [])
        prediction = model(x, t, encoder_hidden_states=torch.cat(live).to(dtype)).sample.float()
        loss = F.mse_loss(prediction[:1], target.float())
        if picks:
            retain_target = frozen_noise(x[1:], t[1:], conds[1:]).float()
            loss = loss + cfg.retain_loss_w * F.mse_loss(prediction[1:], retain_target)
        return loss

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        per_step = len(generators) * cfg.grad_accum  # samples this process draws per optimizer step
        losses = []
        for g in generators:
            step, slot = divmod(drawn[0], per_step)
            losses.append(sample_loss(model, g, step, slot))
            drawn[0] += 1
        return torch.stack(losses).mean()

    def resume(samples: int) -> None:
        """A resumed run: count the finished steps' samples (the held prompts are gone: the next step attacks)."""
        drawn[0] = samples

    loss_fn.resume = resume
    return loss_fn
