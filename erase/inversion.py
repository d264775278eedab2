"""Concept inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods for Text-to-Image Generative
Models"): textual inversion against the erased model.

One new word embedding v* is learned, everything else frozen, with the standard noise-prediction loss
    min_v  E_{x, t, ε} ‖ε − ε_θ(x_t, t | E([.., v, ..]))‖²
on a few images x of the erased concept, each paired with a prompt that holds the placeholder; generating with
prompts that hold v* then shows whether the erased model still knows the concept. The tokenizer is never changed
(it is shared): prompts are tokenized around `PLACEHOLDER` and v* is spliced into the word embeddings at its
positions (erase.attack.word_embeddings_replaced), so any text encoder, erased or not, can encode the result. On
SDXL v* spans both encoders' word embeddings (erase.attack.WordEncoder).
As the released code (NYU-DICE-Lab/circumventing-concept-erasure, uce/concept_inversion.py): v* starts at the
initializer word's embedding (:761-765), AdamW on it alone (:806-812; the decay applies to v* only, since every
other row is restored after each step, :988-995), latents drawn from the VAE posterior (:951-952), t uniform over
the training steps (:959), random horizontal flips (:485,:561), each step the mean over `batch` x `accumulate`
samples (accelerate's gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .attack import AttackResult, WordEncoder, content_tokens
from .sampling import randn
from .unlearndiffatk import denoising_loss, frozen_tensors

PLACEHOLDER = "<concept>"


@dataclass(frozen=True)
class Inversion:
    """`steps` AdamW steps of `lr` (`weight_decay`) on v*, each on `batch` x `accumulate` (image, prompt) samples
    drawn epoch by epoch (each flipped with probability `flip`); v* starts at the embedding of the one-token word
    `init`; `seed` seeds the draws when no generator is given."""

    steps: int = 5000
    lr: float = 0.08
    batch: int = 4
    accumulate: int = 4
    weight_decay: float = 1e-2
    init: str = "art"
    flip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Inversion {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.lr, int | float) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"Inversion lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.weight_decay, int | float) or not self.weight_decay >= 0:
            raise ValueError(f"Inversion weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.flip, int | float) or not 0 <= self.flip <= 1:
            raise ValueError(f"Inversion flip must be a probability in [0, 1], got {self.flip!r}")
        if not isinstance(self.init, str) or not self.init.strip():
            raise ValueError(f"Inversion init must be a word, got {self.init!r}")


PRESETS = {
    # The released style recipe (uce/train.sh and esd/train.sh: --initializer_token art --train_batch_size 4
    # --gradient_accumulation_steps 4 --max_train_steps 5000 --learning_rate 5e-3 --scale_lr (x 4 x 4 on one GPU:
    # 0.08, concept_inversion.py:800-803) --lr_scheduler constant --num_train_images 25, resolution 512, fp16);
    # AdamW betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 (argparse defaults, :284-287); flips p 0.5 (:485).
    # Ours: fp32 v*, and the prompts are the caller's (theirs: a random template of textual inversion's per sample).
    "paper": Inversion(steps=5000, lr=0.08, batch=4, accumulate=4, weight_decay=1e-2, init="art", flip=0.5),
    # Ours for the toy: the better of two trials of scripts/tune_attacks.py against the toy presets of AdvUnlearn,
    # MACE and UCE on the 4 tuning targets, 4 prompts each (docs/results/tuning/attack-inversion-toy.txt): mean ASR
    # 45.8 (200 steps at lr 0.02: 43.8). Tuning figures, not results: Cats 100 / 100 / 25 and Towers 0 / 100 / 0 on
    # AdvUnlearn / MACE / UCE, Watercolor 0 / 0 / 25; Pop_Art 75 / 100 / 25 is flattered by the init word "art".
    "toy": Inversion(steps=300, lr=0.005, batch=4, accumulate=1, weight_decay=1e-2, init="art", flip=0.5),
}


def preset(name: str) -> Inversion:
    if name not in PRESETS:
        raise ValueError(f"unknown Inversion preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class LearnedConcept:
    """The learned word embedding v* (d_word,) and the loss of each step (the mean over its samples)."""

    vector: torch.Tensor
    losses: list[float] = field(default_factory=list)


def placeholder_ids(tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L) padded ids of `prompt` with BOS standing in at each `PLACEHOLDER` (pieces tokenized apart: CLIP splits
    words at spaces and punctuation, so the rest tokenizes as in the whole prompt), and the (1, L) mask of those
    positions. ValueError when the prompt has no placeholder or does not fit the context."""
    if PLACEHOLDER not in prompt:
        raise ValueError(f"prompt {prompt!r} has no placeholder {PLACEHOLDER!r}; write it where the concept goes")
    bos, eos, pad, limit = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                            tokenizer.model_max_length)  # fmt: skip
    ids, slots = [bos], [False]
    for index, piece in enumerate(prompt.split(PLACEHOLDER)):
        if index:
            ids.append(bos)
            slots.append(True)
        if piece.strip():
            piece_ids = tokenizer(piece.strip(), add_special_tokens=False).input_ids
            ids.extend(piece_ids)
            slots.extend([False] * len(piece_ids))
    if len(ids) + 1 > limit:
        raise ValueError(f"prompt {prompt!r} has {len(ids) + 1} tokens with BOS and EOS, more than the tokenizer's "
                         f"{limit}")  # fmt: skip
    padding = limit - len(ids) - 1
    ids = ids + [eos] + [pad if pad is not None else eos] * padding
    slots = slots + [False] * (padding + 1)
    return torch.tensor([ids]), torch.tensor([slots])


def spliced_embeds(words: torch.Tensor, slots: torch.Tensor, vector: torch.Tensor):
    """(B, L, d) word vectors `words` with `vector` (d,) at the `slots` (B, L); gradients reach `vector` only."""
    words = words.detach().to(vector.dtype)
    return torch.where(slots[..., None], vector.expand_as(words), words)


def init_vector(pipe, word: str) -> torch.Tensor:
    """v*'s start: the embedding of `word`, which must be one content token (as the released code demands)."""
    tokens = content_tokens(pipe.tokenizer, word)
    if len(tokens) != 1 or len(pipe.tokenizer(word, add_special_tokens=False).input_ids) != 1:
        raise ValueError(f"Inversion init {word!r} must be a single token of the tokenizer, got {len(tokens)}")
    return WordEncoder.of(pipe).vectors(torch.tensor(tokens[0])).float().clone()  # SDXL: both encoders' rows


def _order(count: int, generator: torch.Generator):
    """Indices 0..count-1, shuffled afresh each pass (a shuffled DataLoader over repeated images)."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def invert(
    pipe,
    prompts: list[str],
    images: torch.Tensor,
    settings: Inversion = PRESETS["paper"],
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> LearnedConcept:
    """Learn v* on `pipe` as it is (the erased model) from `images` (N, 3, H, W) in [0, 1], image i paired with
    `prompts[i]` (each holding `PLACEHOLDER`). The UNet, VAE and text encoder get no gradient."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images: give one prompt per image")
    generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
    unet, encoder, scheduler = pipe.unet, WordEncoder.of(pipe), pipe.scheduler
    encoded = [placeholder_ids(pipe.tokenizer, p) for p in prompts]
    ids = torch.cat([i for i, _ in encoded]).to(encoder.device)
    slots = torch.cat([s for _, s in encoded]).to(encoder.device)
    words = encoder.words(ids)
    vector = init_vector(pipe, settings.init).requires_grad_(True)
    with frozen_tensors(unet, *encoder.encoders, pipe.vae):
        # the VAE posterior of each image and of its mirror image, (2, N, 4, h, w) means and standard deviations
        moments = [posterior(pipe.vae, images * 2 - 1), posterior(pipe.vae, images.flip(-1) * 2 - 1)]
        means = torch.stack([m for m, _ in moments]).to(unet.device)
        stds = torch.stack([s for _, s in moments]).to(unet.device)
        optimizer = torch.optim.AdamW([vector], lr=settings.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=settings.weight_decay)  # fmt: skip
        order = _order(len(prompts), generator)
        losses: list[float] = []
        train_steps = scheduler.config.num_train_timesteps
        for _ in tqdm(range(settings.steps), desc="concept inversion", disable=not progress):
            total = 0.0
            for _ in range(settings.accumulate):
                picks = torch.tensor([next(order) for _ in range(settings.batch)])
                flipped = (torch.rand(settings.batch, generator=generator) < settings.flip).long()
                mean, std = means[flipped, picks], stds[flipped, picks]
                latents = mean + std * randn(tuple(mean.shape), generator, mean.device, mean.dtype)
                t = torch.randint(train_steps, (settings.batch,), generator=generator)
                noise = randn(tuple(latents.shape), generator, latents.device, torch.float32)
                condition = encoder(ids[picks], spliced_embeds(words[picks], slots[picks], vector))
                loss = denoising_loss(unet, scheduler, latents, condition, t, noise) / settings.accumulate
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
    return LearnedConcept(vector.detach().clone(), losses)


@torch.no_grad()
def posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and standard deviation of the VAE's latent distribution for images in [-1, 1]."""
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return dist.mean.float() * scale, dist.std.float() * scale


def placeholder_prompt(pipe, prompt: str, concept: LearnedConcept) -> AttackResult:
    """The prompt with v* at each placeholder: ids, word embeddings and readable text (the placeholder shown), so
    `result.condition(any_text_encoder)` encodes it."""
    encoder = WordEncoder.of(pipe)
    ids, slots = placeholder_ids(pipe.tokenizer, prompt)
    ids, slots = ids.to(encoder.device), slots.to(encoder.device)
    vector = concept.vector.to(encoder.device, torch.float32)
    embeds = spliced_embeds(encoder.words(ids), slots, vector)
    return AttackResult(vector[None, None].clone(), ids, embeds.detach(), list(concept.losses), None, prompt)
