"""erase.relearn: the fine-tuning that tests whether an erased concept comes back (tiny random pipelines)."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from erase.params import select
from erase.relearn import Relearning, relearn
from tests.unit.helpers import fresh_pipe, unet_state


def images(count: int = 3, size: int = 16) -> list[Image.Image]:
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        out.append(Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()))
    return out


PROMPTS = ["a cat", "a dog", "a van gogh painting"]


def settings(**overrides) -> Relearning:
    return Relearning(**{"schedule": (1, 3), "lr": 1e-3, "batch_size": 2, "params": "all", **overrides})


def test_loss_is_the_noise_prediction_mse():
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    pics = images()
    outcome = relearn(pipe, pics, PROMPTS, settings(schedule=(1,)), torch.Generator().manual_seed(7), progress=False)
    # Independently: the same draws in the documented order (image indices, then t, then ε), the forward process
    # x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε written out, latents and embeddings straight from the VAE and text encoder.
    g = torch.Generator().manual_seed(7)
    pick = torch.randint(3, (2,), generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(im, dtype="float32")) for im in pics])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0  # already 16x16, the tiny pipeline's size
    with torch.no_grad():
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        emb = pipe.text_encoder(ids)[0]
        abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0[pick] + (1 - abar).sqrt() * noise
        pred = original(x_t, t, encoder_hidden_states=emb[pick]).sample
    expected = ((pred - noise) ** 2).mean().item()
    assert outcome.losses[0] == pytest.approx(expected, rel=1e-4)


def test_checkpoints_at_exactly_the_schedule_one_cumulative_run():
    pipe = fresh_pipe()
    seen, states = [], {}

    def on_checkpoint(k: int) -> None:
        seen.append(k)
        states[k] = unet_state(pipe)
        assert not torch.is_grad_enabled() and not pipe.unet.training

    outcome = relearn(pipe, images(), PROMPTS, settings(schedule=(1, 3, 4)), torch.Generator().manual_seed(0),
                      on_checkpoint, progress=False)  # fmt: skip
    assert seen == [1, 3, 4] and len(outcome.losses) == 4
    # k = 3 of one run is a separate 3-step run from the same seed (no restart, no lost optimizer state at k = 1)
    other = fresh_pipe()
    relearn(other, images(), PROMPTS, settings(schedule=(3,)), torch.Generator().manual_seed(0), progress=False)
    assert all(torch.equal(states[3][k], v) for k, v in unet_state(other).items())
    assert any(not torch.equal(states[1][k], states[3][k]) for k in states[1])


def test_only_the_parameter_set_changes_and_restore_undoes_it():
    pipe = fresh_pipe()
    before = unet_state(pipe)
    text = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pipe.unet.requires_grad_(False)
    next(iter(pipe.unet.parameters())).requires_grad_(True)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    outcome = relearn(pipe, images(), PROMPTS, settings(params="kv"), torch.Generator().manual_seed(0),
                      progress=False)  # fmt: skip
    kv = {n for n in select(pipe.unet, "kv")}
    after = unet_state(pipe)
    assert all(not torch.equal(before[n], after[n]) for n in kv)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in kv)
    assert all(torch.equal(text[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(vae[k], v) for k, v in pipe.vae.state_dict().items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags  # as they were before the run
    outcome.restore()
    assert all(torch.equal(before[n], v) for n, v in unet_state(pipe).items())
    with pytest.raises(ValueError, match="restore"):
        outcome.restore()


def test_same_seed_same_weights():
    a, b, c = fresh_pipe(), fresh_pipe(), fresh_pipe()
    for pipe, seed in ((a, 3), (b, 3), (c, 4)):
        relearn(pipe, images(), PROMPTS, settings(), torch.Generator().manual_seed(seed), progress=False)
    sa, sb, sc = unet_state(a), unet_state(b), unet_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_a_failing_checkpoint_leaves_the_model_as_it_was():
    pipe = fresh_pipe()
    before = unet_state(pipe)

    def broken(k: int) -> None:
        raise RuntimeError("judge failed")

    with pytest.raises(RuntimeError, match="judge failed"):
        relearn(pipe, images(), PROMPTS, settings(), torch.Generator().manual_seed(0), broken, progress=False)
    assert all(torch.equal(before[n], v) for n, v in unet_state(pipe).items())


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("schedule", (5, 5), "strictly increasing"),
        ("schedule", (10, 5), "strictly increasing"),
        ("schedule", (0, 5), "0"),
        ("schedule", (-3,), "-3"),
        ("schedule", (2.5,), "2.5"),
        ("schedule", (), "non-empty"),
        ("lr", 0, "lr"),
        ("lr", -1e-3, "-0.001"),
        ("batch_size", 0, "batch_size"),
        ("params", "attn9", "attn9"),
        ("optimizer", "sgd", "sgd"),
    ],
)
def test_bad_settings_are_one_line_errors(field, value, words):
    with pytest.raises(ValueError) as err:
        settings(**{field: value})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_presets_and_mismatched_prompts():
    assert Relearning.from_preset("paper").params == "all"
    assert Relearning.from_preset("toy", lr=5e-4).lr == 5e-4
    with pytest.raises(ValueError, match="'nope'"):
        Relearning.from_preset("nope")
    with pytest.raises(ValueError, match="one per image"):
        relearn(fresh_pipe(), images(), ["a cat"], settings(), torch.Generator(), progress=False)
