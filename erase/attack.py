"""Prefix-embedding attacks on a text-to-image model used as a diffusion classifier.

k soft vectors in the text encoder's word-embedding space are spliced in after BOS (`[BOS, p_1..p_k, prompt, EOS,
pad...]`, cut back to the context length) and optimised so that the model's denoising loss, conditioned on the
encoded sequence, goes down: the prompt that makes an erased model denoise the concept's images again. On SDXL a
prefix vector spans both encoders' word embeddings side by side (`WordEncoder`: their tokenizers share the
vocabulary, so one token is one row of each table), and the sequence encodes to the packed SDXL condition. AdvUnlearn's
inner attack is this one (its `prefix_k` word-embedding attack); `project` keeps the prefix on real tokens
(straight-through nearest tokens). UnlearnDiffAtk's released attack reaches real tokens another way, through a
distribution over the vocabulary (erase.unlearndiffatk). The objective is the caller's: it gets the encoded
condition and the attack step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .conditioning import encode_ids, is_sdxl, second_ids

INITS = ("random", "latest")

# objective(condition (1, L, D): what the UNet is given for the attacked prompt, attack step) -> loss to lower
Objective = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class PrefixAttack:
    """The attack's settings: `tokens` prefix vectors (k), `steps` Adam steps of `lr` on them (`sign`: on the
    gradient's sign, AdvUnlearn's fast_at), starting from random vocabulary tokens or from a given prefix (`latest`,
    when one is given); `project`: every forward uses each vector's nearest real token (straight-through), and the
    result is those tokens."""

    tokens: int = 1
    steps: int = 30
    lr: float = 1e-3
    init: str = "random"
    sign: bool = False
    project: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 1:
            raise ValueError(f"the attack's prefix tokens (k) must be an integer >= 1, got {self.tokens!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"the attack's steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.lr, int | float) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"the attack's lr must be a positive number, got {self.lr!r}")
        if self.init not in INITS:
            raise ValueError(f"the attack's init {self.init!r} is not one of {', '.join(INITS)}")


@dataclass
class AttackResult:
    """An attacked prompt, as every prompt attack returns it: what the text encoder's embedding lookup gives for it
    (`embeds`, with the `ids` that place its pooled output), so any model's text encoder, erased or not, can encode it
    (`condition`)."""

    prefix: torch.Tensor  # (1, k, d) the prefix vectors found (detached)
    ids: torch.Tensor  # (1, L) token ids of the spliced sequence (prefix positions hold BOS as a placeholder)
    embeds: torch.Tensor  # (1, L, d) the spliced word embeddings (detached)
    losses: list[float] = field(default_factory=list)  # the objective at each step, before that step's update
    tokens: torch.Tensor | None = None  # (1, k) the prefix's nearest real tokens, with `project`
    text: str = ""  # the attacked prompt as a person reads it (real tokens decoded; learned vectors as <v1>, ...)

    @torch.no_grad()
    def condition(self, encoder: nn.Module | WordEncoder) -> torch.Tensor:
        """What the UNet is conditioned on for this attacked prompt: a text encoder's last hidden state (1, L, D), or
        a `WordEncoder`'s condition (SDXL's packed one)."""
        words = as_word_encoder(encoder)
        return words(self.ids.to(words.device), self.embeds.to(words.device))


def word_embedding(encoder: nn.Module) -> nn.Embedding:
    """The encoder's token-embedding table (CLIPTextModel keeps it under `text_model.` or at its top level,
    depending on the transformers version)."""
    return encoder.get_input_embeddings()


def prompt_ids(tokenizer, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, L) padded token ids of `prompt`, cut to the context as a pipeline cuts it."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)  # fmt: skip


def content_tokens(tokenizer, text: str) -> list[int]:
    """The token ids of `text` that carry content: not BOS, EOS, padding or the unknown token."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    return [i for i in tokenizer(text, add_special_tokens=False).input_ids if i not in special]


@contextmanager
def word_embeddings_replaced(encoder: nn.Module, embeds: torch.Tensor) -> Iterator[None]:
    """Inside the block the encoder's token-embedding lookup answers `embeds` (B, L, d) whatever ids it is given:
    a forward on soft word embeddings through the encoder's own code (position embeddings, causal mask, layers,
    final norm), in every transformers version (CLIPTextModel takes no `inputs_embeds` in some)."""
    table = word_embedding(encoder)
    handle = table.register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def encode_embeds(encoder: nn.Module, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state (B, L, d) for word embeddings `embeds` (B, L, d_word); `ids` (B, L) only
    place its pooled output (never used here). Gradients flow to `embeds` and to the encoder's trainable tensors."""
    with word_embeddings_replaced(encoder, embeds):
        return encoder(ids)[0]


@dataclass(frozen=True)
class WordEncoder:
    """Token ids, with their word embeddings replaceable, to the UNet's condition: through one CLIP text encoder
    (SD 1.x/2.x: its last hidden state), or through SDXL's two (`pipe` given; both penultimate states side by side,
    packed with the second's pooled embedding, erase.conditioning). A word vector is the two encoders' word
    embeddings of one token side by side on SDXL. Gradients reach the embeddings and the encoders' trainable tensors."""

    encoders: tuple[nn.Module, ...]
    pipe: Any = None  # SDXL's pipeline (its second encoder and tokenizer), None for one encoder

    @classmethod
    def of(cls, pipe) -> WordEncoder:
        """The pipeline's own text encoder(s), as they are (trained ones included)."""
        if is_sdxl(pipe.unet):
            return cls((pipe.text_encoder, pipe.text_encoder_2), pipe)
        return cls((pipe.text_encoder,))

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(word_embedding(self.encoders[0]).weight.shape[0])

    @property
    def table(self) -> torch.Tensor:
        """(V, d) every token's word vector (detached; on SDXL a new float32 tensor: take it once per attack)."""
        return self.vectors(torch.arange(self.vocab_size, device=self.device)) if self.pipe else (
            word_embedding(self.encoders[0]).weight.detach())  # fmt: skip

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., d) the word vectors of token ids `tokens` (detached), each id as it is."""
        tables = [word_embedding(e).weight.detach() for e in self.encoders]
        return tables[0][tokens] if len(tables) == 1 else torch.cat([t[tokens].float() for t in tables], dim=-1)

    def words(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, d) the word vectors of `ids` (B, L) of the first tokenizer (detached)."""
        if self.pipe is None:
            return word_embedding(self.encoders[0]).weight[ids].detach()
        first, second = (word_embedding(e).weight.detach().float() for e in self.encoders)
        return torch.cat([first[ids], second[second_ids(self.pipe, ids)]], dim=-1)

    def __call__(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The condition of `ids` (B, L) with word vectors `embeds` (B, L, d)."""
        if self.pipe is None:
            return encode_embeds(self.encoders[0], ids, embeds)
        width = word_embedding(self.encoders[0]).weight.shape[1]
        with ExitStack() as stack:
            for encoder, part in zip(self.encoders, (embeds[..., :width], embeds[..., width:]), strict=True):
                stack.enter_context(word_embeddings_replaced(encoder, part))
            return encode_ids(self.pipe, ids, self.encoders[0])

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The condition of plain token ids (with gradients to the encoders' trainable tensors)."""
        return self.encoders[0](ids)[0] if self.pipe is None else encode_ids(self.pipe, ids, self.encoders[0])


def as_word_encoder(encoder: nn.Module | WordEncoder) -> WordEncoder:
    """A `WordEncoder` as it is, a text encoder as the one-encoder `WordEncoder` over it."""
    return encoder if isinstance(encoder, WordEncoder) else WordEncoder((encoder,))


def splice_prefix(ids: torch.Tensor, embeds: torch.Tensor, prefix: torch.Tensor, bos_id: int):
    """`[BOS, prefix, rest]` cut to the context: ids (1, L) and word embeddings (1, L, d) with the k prefix vectors
    (1, k, d) after position 0; the prefix ids are BOS, a placeholder that moves neither EOS lookup of CLIP."""
    k, length = prefix.shape[1], ids.shape[1]
    spliced_ids = torch.cat([ids[:, :1], torch.full_like(ids[:, :k], bos_id), ids[:, 1:]], dim=1)[:, :length]
    spliced = torch.cat([embeds[:, :1], prefix.to(embeds.dtype), embeds[:, 1:]], dim=1)[:, :length]
    return spliced_ids, spliced


def random_prefix(encoder: nn.Module | WordEncoder, k: int, generator: torch.Generator) -> torch.Tensor:
    """(1, k, d) word vectors of k vocabulary tokens drawn at random (AdvUnlearn's random init)."""
    encoder = as_word_encoder(encoder)
    ids = torch.randint(encoder.vocab_size, (1, k), generator=generator).to(encoder.device)
    return encoder.vectors(ids).float()


def nearest_tokens(prefix: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(1, k) ids of the vocabulary embeddings nearest (L2) to each prefix vector."""
    return torch.cdist(prefix.float(), table.float().unsqueeze(0)).argmin(dim=-1)


def prefix_attack(
    objective: Objective,
    encoder: nn.Module | WordEncoder,
    ids: torch.Tensor,
    settings: PrefixAttack,
    generator: torch.Generator,
    start: torch.Tensor | None = None,
) -> AttackResult:
    """Lower `objective` over a k-vector prefix of the prompt with token ids `ids` (1, L), encoded by `encoder` (a
    text encoder, or a `WordEncoder`: SDXL's two) as it is (its tensors get no gradient: only the prefix does).
    `start` (1, k, d) is the first prefix under `init="latest"`; otherwise (or without one) k random vocabulary
    tokens."""
    encoder = as_word_encoder(encoder)
    table = encoder.table
    bos_id = int(ids[0, 0])
    words = encoder.words(ids)
    first = start if settings.init == "latest" and start is not None else random_prefix(encoder, settings.tokens,
                                                                                          generator)  # fmt: skip
    if first.shape[1] != settings.tokens:
        raise ValueError(f"a start prefix of {first.shape[1]} vectors for an attack of {settings.tokens}")
    prefix = first.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prefix], lr=settings.lr)

    def used(p: torch.Tensor) -> torch.Tensor:
        """What the forward sees: the prefix, or (project) its nearest tokens with the prefix's gradient."""
        if not settings.project:
            return p
        return p + (table[nearest_tokens(p, table)].float() - p).detach()

    losses = []
    spliced_ids = splice_prefix(ids, words, prefix.detach(), bos_id)[0]
    for step in range(settings.steps):
        spliced_ids, spliced = splice_prefix(ids, words, used(prefix), bos_id)
        loss = objective(encoder(spliced_ids, spliced), step)
        (grad,) = torch.autograd.grad(loss, [prefix])
        prefix.grad = grad.sign() if settings.sign else grad
        optimizer.step()
        losses.append(float(loss.detach()))
    tokens = nearest_tokens(prefix.detach(), table) if settings.project else None
    final = (table[tokens].float() if tokens is not None else prefix).detach()
    spliced_ids, spliced = splice_prefix(ids, words, final, bos_id)
    return AttackResult(final, spliced_ids, spliced.detach(), losses, tokens)
