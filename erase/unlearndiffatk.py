"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the erased model, used as a diffusion classifier, finds its own attack.

k prefix tokens are chosen so that the erased model denoises images of the erased concept (made by the base model
for the prompt) well when conditioned on `[BOS, p_1..p_k, prompt]`:
    min_p  E_ε ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t | [p, prompt])‖²,
with the released code's relaxation (src/attackers/text_grad_.py): each prefix slot is a distribution over the
vocabulary (a point of the simplex, uniform at the start, :68-76); every step draws one token per slot from it
(one-hot, straight-through with the gradient clipped to [-1, 1], :240-255), takes an Adam step (weight decay 0.1,
:79) and projects each slot back onto the simplex (:219-220, :20-66); the attack's tokens are the distribution's
argmax (:164-171, :222). Timesteps are visited in order, `iterations` steps at each (:207-210), a fresh noise draw
per step (src/tasks/classifier_.py:80); after each timestep the released code generates with the argmax prompt and
stops at the first success (:222-233): `stop` here. On SDXL a token's vector is both encoders' word embeddings side
by side (erase.attack.WordEncoder), so the relaxation is over the same shared vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attack import AttackResult, WordEncoder, content_tokens, prompt_ids, splice_prefix
from .images import denoising_target, encode_latents, noise_latents
from .sampling import randn


@dataclass(frozen=True)
class UnlearnDiffAtk:
    """`tokens` prefix slots (k); `iterations` Adam steps of `lr` (`weight_decay`) at each of `timesteps` evenly
    spaced noise levels; `seed` seeds the draws when no generator is given."""

    tokens: int = 5
    iterations: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    timesteps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "iterations", "timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UnlearnDiffAtk {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.lr, int | float) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"UnlearnDiffAtk lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.weight_decay, int | float) or not self.weight_decay >= 0:
            raise ValueError(f"UnlearnDiffAtk weight_decay must be a number >= 0, got {self.weight_decay!r}")


PRESETS = {
    # The released nudity/object configs (configs/nudity/text_grad_esd_nudity_classifier.json:18-29: prefix_k, k 5,
    # iteration 40, sequential, lr 0.01, weight_decay 0.1; the Van Gogh one uses k 3) and ClassifierTask's default
    # n_samples 50 (src/tasks/classifier_.py:30,67-70: t = 10, 30, ..., 990). Without a `stop` that is all 50 x 40
    # = 2000 steps; the released loop stops at the first timestep whose argmax prompt succeeds.
    "paper": UnlearnDiffAtk(tokens=5, iterations=40, lr=0.01, weight_decay=0.1, timesteps=50),
    # Ours for the toy (its 226-token vocabulary moves the relaxed prefix little at lr 0.01 within a CPU budget):
    # scripts/tune_attacks.py against the toy presets of ESD, FMN and MACE on the 4 tuning targets, 4 prompts each
    # (docs/results/tuning/attack-unlearndiffatk-toy.txt). This trial (lr 0.5, 10 timesteps x 20 iterations) was run
    # on every target: mean ASR 39.6, e.g. Towers 0 -> 50 on ESD and MACE, Cats 25 -> 100 on FMN, Pop_Art 0 -> 0 /
    # 25 / 0. The other two (lr 0.05 with 5 x 20, lr 0.1 with 10 x 40) were stopped after Pop_Art, where none moved
    # (ASR 0 on ESD, 25 on FMN, 0 on MACE) at up to twice the cost. Tuning figures, not results.
    "toy": UnlearnDiffAtk(tokens=5, iterations=20, lr=0.5, weight_decay=0.1, timesteps=10),
}


def preset(name: str) -> UnlearnDiffAtk:
    if name not in PRESETS:
        raise ValueError(f"unknown UnlearnDiffAtk preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def image_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """(N, 4, h, w) VAE latent means, times the VAE's scaling factor, of images (N, 3, H, W) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch in [0, 1], got shape {tuple(images.shape)}")
    return encode_latents(pipe.vae, images * 2 - 1)


def denoising_loss(unet, scheduler, latents: torch.Tensor, condition: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The diffusion-classifier objective: mean ‖target − ε_θ(x_t, t | condition)‖² with x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    for latents x_0 (N, 4, h, w), condition (N, L, D), integer timesteps (N,) and noise ε (N, 4, h, w); the target is
    the scheduler's prediction type's (ε, the velocity or x_0: `erase.images.denoising_target`)."""
    x_t = noise_latents(scheduler, latents.float(), noise, timesteps)
    prediction = unet(x_t.to(unet.dtype), timesteps.to(latents.device),
                      encoder_hidden_states=condition.to(unet.dtype)).sample  # fmt: skip
    return F.mse_loss(prediction.float(), denoising_target(scheduler, latents, noise, timesteps).float())


def attack_timesteps(train_steps: int, count: int) -> list[int]:
    """`count` evenly spaced levels, the released code's sampled_t (T//n//2, then every T//n)."""
    stride = max(train_steps // count, 1)
    return list(range(stride // 2, train_steps, stride))[:count]


def simplex_projection(points: torch.Tensor) -> torch.Tensor:
    """Each row of `points` (k, V) projected (Euclidean) onto the probability simplex: the root the released code's
    bisection finds (text_grad_.py:20-56), computed exactly by sorting."""
    ordered = points.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, points.shape[-1] + 1, device=points.device, dtype=points.dtype)
    support = (ordered - cumulative / ranks > 0).sum(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support.to(points.dtype)
    return (points - threshold).clamp(min=0)


class _SampledOneHot(torch.autograd.Function):
    """One token per row drawn from the distribution (k, V), as one-hot rows; backward passes the gradient
    straight through, clipped to [-1, 1] (the released STERandSelect)."""

    @staticmethod
    def forward(ctx, distribution: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(distribution.detach().cpu().double(), 1, generator=generator).to(distribution.device)
        return F.one_hot(drawn[:, 0], distribution.shape[-1]).to(distribution.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


class frozen_tensors:  # noqa: N801 (a context manager, named as one)
    """Inside the block the modules' tensors need no gradient (no graph is built for them); flags restored after."""

    def __init__(self, *modules) -> None:
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.params, self.flags, strict=True):
            p.requires_grad_(flag)


def check_prompt(tokenizer, prompt: str, k: int) -> None:
    """The prompt must have content and fit the context with BOS, k prefix tokens and EOS."""
    if not content_tokens(tokenizer, prompt):
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing (only unknown or special tokens)")
    count, limit = len(tokenizer(prompt, add_special_tokens=False).input_ids), tokenizer.model_max_length
    if count + k + 2 > limit:
        raise ValueError(f"prompt {prompt!r} has {count} tokens: with BOS, EOS and {k} prefix tokens it exceeds the "
                         f"tokenizer's {limit}")  # fmt: skip


def token_result(pipe, prompt: str, tokens: torch.Tensor, losses: list[float]) -> AttackResult:
    """The AttackResult of real prefix tokens (1, k) before `prompt`."""
    encoder = WordEncoder.of(pipe)
    ids = prompt_ids(pipe.tokenizer, prompt, encoder.device)
    prefix = encoder.vectors(tokens.to(encoder.device)).float()
    spliced_ids, spliced = splice_prefix(ids, encoder.words(ids), prefix, int(ids[0, 0]))
    text = f"{pipe.tokenizer.decode(tokens[0].tolist()).strip()} {prompt}"
    return AttackResult(prefix, spliced_ids, spliced.detach(), list(losses), tokens.clone(), text)


def unlearndiffatk(
    pipe,
    prompt: str,
    images: torch.Tensor,
    settings: UnlearnDiffAtk = PRESETS["paper"],
    generator: torch.Generator | None = None,
    stop: Callable[[AttackResult], bool] | None = None,
    progress: bool = True,
) -> AttackResult:
    """The attack on `pipe` as it is (e.g. with an erasure Delta applied): k real tokens before `prompt` that make its
    UNet denoise the target `images` (N, 3, H, W) in [0, 1] (the base model's images of the concept for the prompt);
    every step uses all N images, each with its own noise. `stop(result)`, asked after each timestep with the
    argmax tokens so far, ends the attack early (the released code's generate-and-judge check). Only the prefix's
    distribution gets gradients; the text encoder and UNet are used as they are."""
    check_prompt(pipe.tokenizer, prompt, settings.tokens)
    generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
    unet, encoder, scheduler = pipe.unet, WordEncoder.of(pipe), pipe.scheduler
    latents = image_latents(pipe, images).to(unet.device)
    table = encoder.table  # SDXL: both encoders' word embeddings of each token side by side
    ids = prompt_ids(pipe.tokenizer, prompt, table.device)
    words = encoder.words(ids)
    levels = attack_timesteps(scheduler.config.num_train_timesteps, settings.timesteps)
    vocab, n = table.shape[0], latents.shape[0]
    distribution = torch.full((settings.tokens, vocab), 1.0 / vocab, device=table.device, requires_grad=True)
    optimizer = torch.optim.Adam([distribution], lr=settings.lr, weight_decay=settings.weight_decay)
    losses: list[float] = []
    result = None
    bar = tqdm(total=len(levels) * settings.iterations, desc="UnlearnDiffAtk", disable=not progress)
    with frozen_tensors(unet, *encoder.encoders), bar:
        for level in levels:
            t = torch.full((n,), level, dtype=torch.long)
            for _ in range(settings.iterations):
                prefix = (_SampledOneHot.apply(distribution, generator) @ table.float())[None]  # (1, k, d)
                spliced_ids, spliced = splice_prefix(ids, words, prefix, int(ids[0, 0]))
                condition = encoder(spliced_ids, spliced).expand(n, -1, -1)
                noise = randn(tuple(latents.shape), generator, latents.device, torch.float32)
                loss = denoising_loss(unet, scheduler, latents, condition, t, noise)
                (distribution.grad,) = torch.autograd.grad(loss, [distribution])
                optimizer.step()
                with torch.no_grad():
                    distribution.copy_(simplex_projection(distribution))
                losses.append(float(loss.detach()))
                bar.update()
            result = token_result(pipe, prompt, distribution.detach().argmax(dim=-1)[None], losses)
            if stop is not None and stop(result):
                break
    return result


def random_prefixes(
    pipe,
    prompt: str,
    settings: UnlearnDiffAtk = PRESETS["paper"],
    generator: torch.Generator | None = None,
    stop: Callable[[AttackResult], bool] | None = None,
) -> AttackResult:
    """UnlearnDiffAtk's control: as many k-token prefixes as the attack judges (one per timestep), each drawn
    uniformly from the vocabulary the attack optimises over, ending at the first that `stop` accepts. An attack
    that beats it found more than k extra tokens and that many tries explain; one that does not, found nothing."""
    check_prompt(pipe.tokenizer, prompt, settings.tokens)
    generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
    vocab = WordEncoder.of(pipe).vocab_size
    result = None
    for _ in range(settings.timesteps):
        result = token_result(pipe, prompt, torch.randint(vocab, (1, settings.tokens), generator=generator), [])
        if stop is not None and stop(result):
            break
    return result
