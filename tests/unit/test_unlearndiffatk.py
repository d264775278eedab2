"""UnlearnDiffAtk on the tiny pipeline: its objective is the diffusion-classifier loss computed another way, the
attack lowers it, its tokens are real vocabulary rows, the models are left as they were, and bad inputs are one-line
errors."""

from __future__ import annotations

import copy

import pytest
import torch

from erase.attack import prompt_ids, word_embedding
from erase.unlearndiffatk import (
    PRESETS,
    UnlearnDiffAtk,
    attack_timesteps,
    denoising_loss,
    image_latents,
    random_prefixes,
    simplex_projection,
    unlearndiffatk,
)
from tests.unit.helpers import fresh_pipe, listening_pipe

PROMPT = "a photo of a cat"


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand((count, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def test_the_objective_is_the_noise_prediction_error_on_noised_latents():
    pipe = fresh_pipe()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((3, 4, 8, 8), generator=g)
    noise = torch.randn((3, 4, 8, 8), generator=g)
    condition = torch.randn((3, 16, 32), generator=g)
    t = torch.tensor([10, 500, 990])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1).float()
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        expected = ((pipe.unet(x_t, t, encoder_hidden_states=condition).sample - noise) ** 2).mean()
        got = denoising_loss(pipe.unet, pipe.scheduler, latents, condition, t, noise)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_image_latents_are_the_scaled_posterior_means():
    pipe = fresh_pipe()
    batch = images()
    with torch.no_grad():
        expected = pipe.vae.encode(batch * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(image_latents(pipe, batch), expected)
    assert torch.equal(image_latents(pipe, batch), image_latents(pipe, batch))


def fixed_objective(pipe, condition: torch.Tensor, latents: torch.Tensor, draws: int = 4) -> float:
    """The objective at the attack's one timestep, averaged over fixed noise draws (common to every prompt)."""
    g = torch.Generator().manual_seed(123)
    n = latents.shape[0]
    t = torch.full((n,), attack_timesteps(1000, 1)[0])
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            total += float(denoising_loss(pipe.unet, pipe.scheduler, latents, condition.expand(n, -1, -1), t, noise))
    return total / draws


def test_the_attack_lowers_the_objective_and_returns_real_tokens():
    pipe = listening_pipe()
    unet_before = copy.deepcopy(pipe.unet.state_dict())
    encoder_before = copy.deepcopy(pipe.text_encoder.state_dict())
    target = images()
    settings = UnlearnDiffAtk(tokens=2, iterations=40, lr=0.05, timesteps=1)
    result = unlearndiffatk(pipe, PROMPT, target, settings, torch.Generator().manual_seed(0), progress=False)
    table = word_embedding(pipe.text_encoder).weight
    assert result.tokens is not None and result.tokens.shape == (1, 2)
    assert torch.equal(result.prefix[0], table[result.tokens[0]].detach())  # exactly vocabulary rows
    assert torch.equal(result.embeds[0, 1:3], table[result.tokens[0]].detach())
    ids = prompt_ids(pipe.tokenizer, PROMPT)
    assert torch.equal(result.embeds[0, 3:], table[ids[0, 1:-2]].detach())  # the prompt follows, cut to the context
    assert result.text.endswith(PROMPT) and result.text.startswith(pipe.tokenizer.decode(result.tokens[0]).strip())
    assert len(result.losses) == 40
    # the found prefix against every other choice of its first token (second token kept), under the same noise:
    # fewer than a tenth of 40 random tokens do better (a uniform random pick: half)
    latents = image_latents(pipe, target)
    found = fixed_objective(pipe, result.condition(pipe.text_encoder), latents)
    others = []
    for token in torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(1))[:40].tolist():
        other = copy.copy(result)
        other.embeds = result.embeds.clone()
        other.embeds[0, 1] = table[token].detach()
        others.append(fixed_objective(pipe, other.condition(pipe.text_encoder), latents))
    assert sum(o < found for o in others) < len(others) / 10
    # the models are untouched, hold no gradients, and keep their requires_grad flags
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(encoder_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    assert all(p.grad is None and p.requires_grad for p in params)


def test_simplex_projection_matches_a_bisection():
    points = torch.randn((4, 30), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected = simplex_projection(points)
    for row, point in zip(projected, points, strict=True):
        low, high = float(point.min()) - 1, float(point.max())
        for _ in range(200):  # the threshold mu with sum(max(point - mu, 0)) = 1
            mu = (low + high) / 2
            low, high = (mu, high) if (point - mu).clamp(min=0).sum() > 1 else (low, mu)
        assert torch.allclose(row, (point - mu).clamp(min=0), atol=1e-9)
    assert torch.allclose(projected.sum(-1), torch.ones(4, dtype=torch.float64)) and (projected >= 0).all()
    on_simplex = torch.softmax(points, -1)
    assert torch.allclose(simplex_projection(on_simplex), on_simplex, atol=1e-12)


def test_stop_ends_the_attack_after_a_timestep_and_the_draws_are_seeded():
    pipe = fresh_pipe()
    settings = UnlearnDiffAtk(tokens=1, iterations=3, timesteps=4)
    seen = []
    result = unlearndiffatk(pipe, PROMPT, images(1), settings, torch.Generator().manual_seed(0),
                            stop=lambda r: seen.append(r) or True, progress=False)  # fmt: skip
    assert len(seen) == 1 and len(result.losses) == 3
    again = unlearndiffatk(pipe, PROMPT, images(1), settings, torch.Generator().manual_seed(0),
                           stop=lambda r: True, progress=False)  # fmt: skip
    assert again.losses == result.losses and torch.equal(again.tokens, result.tokens)
    assert attack_timesteps(1000, 50) == list(range(10, 1000, 20))  # the released sampled_t


def test_the_paper_preset_is_the_released_recipe():
    paper = PRESETS["paper"]
    assert (paper.tokens, paper.iterations, paper.lr, paper.weight_decay, paper.timesteps) == (5, 40, 0.01, 0.1, 50)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("tokens", 0, "tokens must be an integer >= 1, got 0"), ("iterations", 0, "iterations must be an integer >= 1"),
     ("lr", 0.0, "lr must be a positive number, got 0.0"), ("timesteps", -1, "timesteps must be an integer >= 1")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        UnlearnDiffAtk(**{field: value})
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    pipe = fresh_pipe()
    settings = UnlearnDiffAtk(tokens=2, iterations=1, timesteps=1)
    with pytest.raises(ValueError, match=r"non-empty \(N, 3, H, W\) batch.*\(0, 3, 16, 16\)"):
        unlearndiffatk(pipe, PROMPT, images(0), settings, progress=False)
    with pytest.raises(ValueError, match="exceeds the tokenizer's 16"):
        unlearndiffatk(pipe, "a photo of a cat in van gogh style painting image", images(1),
                       UnlearnDiffAtk(tokens=5, iterations=1, timesteps=1), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        unlearndiffatk(pipe, "", images(1), settings, progress=False)


def test_the_random_prefix_control_tries_as_many_prefixes_as_the_attack_judges_and_stops_at_a_success():
    pipe, settings = fresh_pipe(), UnlearnDiffAtk(tokens=3, iterations=1, lr=0.1, timesteps=4)
    seen = []

    def never(result):
        seen.append(result.tokens.clone())
        return False

    last = random_prefixes(pipe, PROMPT, settings, torch.Generator().manual_seed(0), stop=never)
    vocab = word_embedding(pipe.text_encoder).weight.shape[0]
    assert len(seen) == 4 and all(t.shape == (1, 3) and 0 <= int(t.min()) and int(t.max()) < vocab for t in seen)
    assert len({tuple(t.flatten().tolist()) for t in seen}) == 4  # fresh draws, not one prefix judged four times
    assert torch.equal(last.tokens, seen[-1]) and last.text.endswith(PROMPT)
    table = word_embedding(pipe.text_encoder).weight
    assert torch.equal(last.prefix, table[last.tokens[0]].float()[None])
    calls = []
    random_prefixes(pipe, PROMPT, settings, torch.Generator().manual_seed(0), stop=lambda r: calls.append(r) or True)
    assert len(calls) == 1 and torch.equal(calls[0].tokens, seen[0])  # seeded: the same first draw, then it stops
