"""Concept inversion on the tiny pipeline: only the new word embedding learns (every model tensor unchanged and
without gradient), the loss it lowers is lowered, the vector sits exactly at the placeholder's positions (checked
against an encoder with a real new vocabulary row), and bad inputs are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from erase.attack import prompt_ids, word_embedding
from erase.inversion import PLACEHOLDER, PRESETS, Inversion, LearnedConcept, invert, placeholder_prompt
from erase.unlearndiffatk import denoising_loss, image_latents
from tests.unit.helpers import fresh_pipe, listening_pipe

PROMPTS = [f"a {PLACEHOLDER} painting", f"a photo in {PLACEHOLDER} style"]


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand((count, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def fixed_loss(pipe, concept: LearnedConcept, target: torch.Tensor, draws: int = 6) -> float:
    """The noise-prediction loss of the placeholder prompts on the targets' latent means, under fixed noise and t."""
    g = torch.Generator().manual_seed(7)
    latents = image_latents(pipe, target)
    condition = torch.cat([placeholder_prompt(pipe, p, concept).condition(pipe.text_encoder) for p in PROMPTS])
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(1000, (latents.shape[0],), generator=g)
            noise = torch.randn(latents.shape, generator=g)
            total += float(denoising_loss(pipe.unet, pipe.scheduler, latents, condition, t, noise))
    return total / draws


def test_only_the_new_embedding_learns_and_its_loss_falls():
    pipe = listening_pipe()
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    target = images()
    settings = Inversion(steps=30, lr=0.05, batch=2, accumulate=2, init="cat", flip=0.5)
    learned = invert(pipe, PROMPTS, target, settings, torch.Generator().manual_seed(0), progress=False)
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(before[k], v) for k, v in after.items())
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]
    assert all(p.grad is None and p.requires_grad for p in params)  # no gradient, flags as they were
    table = word_embedding(pipe.text_encoder).weight
    start = table[prompt_ids(pipe.tokenizer, "cat")[0, 1]].detach()
    assert learned.vector.shape == start.shape and not learned.vector.requires_grad
    assert not torch.equal(learned.vector, start) and len(learned.losses) == 30
    assert fixed_loss(pipe, learned, target) < fixed_loss(pipe, LearnedConcept(start), target)
    again = invert(pipe, PROMPTS, target, settings, torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(again.vector, learned.vector)  # seeded


def test_the_vector_is_spliced_exactly_at_the_placeholders():
    pipe = fresh_pipe()
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    prompt = f"a {PLACEHOLDER} in {PLACEHOLDER} style"
    result = placeholder_prompt(pipe, prompt, LearnedConcept(vector))
    assert result.text == prompt
    # the same prompt with an ordinary word in the placeholder's place: the vector sits where that word's token sits
    plain = prompt_ids(tokenizer, prompt.replace(PLACEHOLDER, "dog"))
    dog = tokenizer("dog", add_special_tokens=False).input_ids[0]
    slots = plain[0] == dog
    assert slots.sum() == 2
    table = word_embedding(encoder).weight.detach()
    assert torch.equal(result.embeds[0, slots], vector.expand(2, -1))
    assert torch.equal(result.embeds[0, ~slots], table[plain[0, ~slots]])
    # encoded another way: the vector as a new vocabulary row of a copy of the encoder
    other = copy.deepcopy(encoder)
    other.resize_token_embeddings(table.shape[0] + 1)
    with torch.no_grad():
        word_embedding(other).weight[-1] = vector
        expected = other(torch.where(slots, table.shape[0], plain[0])[None])[0]
    assert torch.allclose(result.condition(encoder), expected, atol=1e-5)


def test_the_paper_preset_is_the_released_recipe():
    paper = PRESETS["paper"]
    assert (paper.steps, paper.lr, paper.batch, paper.accumulate, paper.init) == (5000, 0.08, 4, 4, "art")


@pytest.mark.parametrize(
    ("values", "message"),
    [({"steps": 0}, "steps must be an integer >= 1, got 0"), ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
     ({"batch": 0}, "batch must be an integer >= 1, got 0"), ({"flip": 2.0}, "flip must be a probability"),
     ({"init": ""}, "init must be a word")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(ValueError, match=message) as info:
        Inversion(**values)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    pipe = fresh_pipe()
    settings = Inversion(steps=1, batch=1, accumulate=1, init="cat")
    cases = [
        (["a cat painting", PROMPTS[1]], images(), "prompt 'a cat painting' has no placeholder '<concept>'"),
        (PROMPTS, images(3), "2 prompts for 3 images"),
        ([], images(0), r"non-empty \(N, 3, H, W\) batch in \[0, 1\], got shape \(0, 3, 16, 16\)"),
        (PROMPTS, images(), None),
    ]
    for prompts, batch, message in cases:
        if message is None:  # a multi-token initializer word
            with pytest.raises(ValueError, match="init 'van gogh' must be a single token"):
                invert(pipe, prompts, batch, Inversion(steps=1, init="van gogh"), progress=False)
            continue
        with pytest.raises(ValueError, match=message) as info:
            invert(pipe, prompts, batch, settings, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="has no placeholder"):
        placeholder_prompt(pipe, "a cat", LearnedConcept(torch.zeros(32)))
    with pytest.raises(ValueError, match="more than the tokenizer's 16"):
        placeholder_prompt(pipe, f"{PLACEHOLDER} a photo of a cat in van gogh style painting image a photo of a dog",
                           LearnedConcept(torch.zeros(32)))  # fmt: skip
