"""Prompt encoding with a cache, and where a concept's tokens sit inside a prompt."""

from __future__ import annotations

import torch

from .conditioning import encode_ids, install, is_sdxl


class PromptEncoder:
    """Text-encoder outputs per prompt, computed once: erasure loops re-encode the same few prompts every step.

    `strict` (what methods get): a prompt longer than the tokenizer's limit is an error, not a silent cut. Off, it is
    cut as a diffusers pipeline cuts it (answer sets follow the pipeline)."""

    def __init__(self, tokenizer, text_encoder, device: torch.device | str | None = None, strict: bool = False):
        self.tokenizer = tokenizer
        self.strict = strict
        self.text_encoder = text_encoder
        self.device = device
        self._pipe = None  # set by `of` for SDXL, whose embedding needs both encoders
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, pipe, device: torch.device | str | None = None, strict: bool = False) -> PromptEncoder:
        """The encoder of what `pipe`'s UNet is given: its text encoder's states (SD 1.x/2.x), or SDXL's packed
        embedding of both encoders (erase.conditioning; a hook it installs lets the UNet read it)."""
        encoder = cls(pipe.tokenizer, pipe.text_encoder, device, strict)
        if is_sdxl(pipe.unet):
            install(pipe)
            encoder._pipe = pipe
        return encoder

    def ids(self, prompt: str) -> torch.Tensor:
        """The prompt's padded token ids (ValueError, when strict, if it does not fit)."""
        if self.strict:
            check_fits(self.tokenizer, prompt)
        return self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids[0]  # fmt: skip

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], cache: bool = True) -> torch.Tensor:
        """(len(prompts), tokens, dim) embeddings; a single prompt gives a batch of one. `cache=False`: prompts
        drawn afresh every step (encoded, neither looked up nor kept)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not cache:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self._cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        device = self.device or next(self.text_encoder.parameters()).device
        ids = torch.stack([self.ids(p) for p in prompts]).to(device)
        return self.text_encoder(ids)[0] if self._pipe is None else encode_ids(self._pipe, ids, self.text_encoder)


def check_fits(tokenizer, prompt: str) -> None:
    """ValueError naming the prompt and the limit when its tokens (BOS and EOS included) exceed the tokenizer's."""
    limit = tokenizer.model_max_length
    count = len(tokenizer(prompt, truncation=False).input_ids)
    if count > limit:
        raise ValueError(
            f"prompt {prompt!r} has {count} tokens, more than the tokenizer's {limit}; it would be cut "
            "and lose its end: shorten it"
        )


def token_positions(tokenizer, prompt: str, concept: str) -> list[int]:
    """Positions (in the padded token sequence, BOS at 0) of the tokens of `concept` inside `prompt`.

    Raises ValueError naming both when the concept's tokens do not appear in the prompt's tokens.
    """
    concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
    if not concept_ids:
        raise ValueError(f"concept {concept!r} tokenizes to nothing")
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    n = len(concept_ids)
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] == concept_ids:
            return list(range(start, start + n))
    raise ValueError(f"concept {concept!r} is not among the tokens of prompt {prompt!r}")
