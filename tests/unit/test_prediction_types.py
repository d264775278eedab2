"""SD 2.x v-prediction models: every method runs on one, noise targets are velocities, the ε/x0/v conversions
invert, ESD's combined target means the same in v as in ε, sampling follows the scheduler's prediction type, and
an unknown prediction type is refused when a run (or an answer set) starts. Velocities are written out here from
v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, never taken from the helpers under test."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import erase
from canvas import answers
from canvas import catalog as catalogs
from erase import sampling
from erase.images import PREDICTION_TYPES, denoising_target, noise_latents, noised, split_prediction
from erase.methods import ca
from erase.methods.esd import esd_target
from erase.relabel import ForgetRetain, relabel_terms
from erase.testing import SD2_DDIM, tiny_sd2_pipeline
from erase.text import PromptEncoder
from tests.unit.helpers import generate
from tests.unit.test_ca import ANCHOR, TARGET, captured_loss, embed, small_ca
from tests.unit.test_registry import example, run_changes_only_declared


def sd2_pipe(seed: int = 0):
    pipe = tiny_sd2_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def levels(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)) as (B, 1, 1, 1), read straight off the scheduler's ᾱ table."""
    alpha_bar = scheduler.alphas_cumprod[t.reshape(-1).long()].double().view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def velocity(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = levels(scheduler, t)
    return (a * noise.double() - s * x0.double()).float()


def test_the_tiny_sd2_pipeline_has_sd2s_structure():
    pipe = sd2_pipe()
    unet, scheduler = pipe.unet.config, pipe.scheduler.config
    assert unet.use_linear_projection and unet.upcast_attention and list(unet.attention_head_dim) == [2, 4, 4]
    assert scheduler.prediction_type == "v_prediction" and isinstance(pipe.scheduler, DDIMScheduler)
    assert not scheduler.clip_sample and not scheduler.set_alpha_to_one and scheduler.steps_offset == 1
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_token == "!"
    assert pipe.text_encoder.config.hidden_size == unet.cross_attention_dim
    assert not torch.equal(generate(pipe), generate(sd2_pipe(1)))  # deterministic for a seed, and seeded


@pytest.mark.parametrize("name", erase.available_methods())
def test_every_method_changes_exactly_its_declared_tensors_on_a_v_prediction_model(name, tmp_path):
    _, result = run_changes_only_declared(sd2_pipe, name, tmp_path)
    assert all(np.isfinite(result.record["losses"]))


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_the_target_and_its_inverse_agree_with_the_formulas(kind):
    scheduler = DDIMScheduler(**{**SD2_DDIM, "prediction_type": kind})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    a, s = levels(scheduler, t)
    x_t = (a * x0.double() + s * noise.double()).float()
    torch.testing.assert_close(noise_latents(scheduler, x0, noise, t), x_t)
    written_out = {"epsilon": noise, "v_prediction": velocity(scheduler, x0, noise, t), "sample": x0}[kind]
    output = denoising_target(scheduler, x0, noise, t)
    torch.testing.assert_close(output, written_out)
    eps, clean = split_prediction(scheduler, output, x_t, t)  # the model's exact answer gives back ε and x0
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(clean, x0, rtol=1e-4, atol=2e-4)
    # diffusers' own DDIM step reads the same output as the same x0 (one step at each sample's timestep)
    scheduler.set_timesteps(1000)
    for b in range(3):
        step = scheduler.step(output[b : b + 1], int(t[b]), x_t[b : b + 1])
        torch.testing.assert_close(step.pred_original_sample, clean[b : b + 1], rtol=1e-4, atol=1e-4)


def test_the_velocity_is_built_from_alphas_even_where_the_scheduler_noises_otherwise():
    """An Euler scheduler noises as x0 + σ·ε and has no integer-timestep get_velocity; the UNet is still trained on
    the variance-preserving x_t, so the helpers use ᾱ and nothing else of the scheduler's."""
    scheduler = EulerDiscreteScheduler.from_config(SD2_DDIM)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    x_t, t, noise = noised(scheduler, latents, torch.Generator().manual_seed(2))
    a, s = levels(scheduler, t)
    torch.testing.assert_close(x_t, (a * latents.double() + s * noise.double()).float())
    torch.testing.assert_close(denoising_target(scheduler, latents, noise, t), velocity(scheduler, latents, noise, t))


def recording(module, monkeypatch) -> list:
    """Wrap `module.noised` so every draw is kept: (clean latents, x_t, t, ε)."""
    real, kept = module.noised, []

    def noised_and_kept(scheduler, latents, generator, *args):
        x_t, t, noise = real(scheduler, latents, generator, *args)
        kept.append((latents.clone(), x_t, t, noise))
        return x_t, t, noise

    monkeypatch.setattr(module, "noised", noised_and_kept)
    return kept


def test_ca_with_prior_preservation_trains_on_velocities(tmp_path, monkeypatch):
    pipe = sd2_pipe()
    config = small_ca(tmp_path, loss="noise", prior_preservation=True, prior_weight=0.7, hflip=False)
    loss_fn = captured_loss(pipe, config)
    draws = recording(ca, monkeypatch)
    unet = pipe.unet
    unet.requires_grad_(False)
    key = next(p for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    key.requires_grad_(True)
    value = loss_fn(unet, [torch.Generator().manual_seed(0)])
    (grad,) = torch.autograd.grad(value, [key])

    (x0, x_t, t, noise), (px0, px_t, pt, pnoise) = draws
    predicted = unet(x_t, t, encoder_hidden_states=embed(pipe, TARGET)).sample
    prior = unet(px_t, pt, encoder_hidden_states=embed(pipe, ANCHOR)).sample
    expected = ((predicted - velocity(pipe.scheduler, x0, noise, t)) ** 2).mean()
    expected = expected + 0.7 * ((prior - velocity(pipe.scheduler, px0, pnoise, pt)) ** 2).mean()
    (expected_grad,) = torch.autograd.grad(expected, [key])
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8)
    as_if_epsilon = ((predicted - noise) ** 2).mean() + 0.7 * ((prior - pnoise) ** 2).mean()
    assert not torch.allclose(value, as_if_epsilon)  # the velocity target is not ε in disguise here


def test_the_relabel_losses_diffusion_terms_are_velocities(monkeypatch):
    import erase.relabel as relabel

    pipe = sd2_pipe()
    g = torch.Generator().manual_seed(3)
    data = ForgetRetain(torch.randn(2, 4, 8, 8, generator=g), ["a cat", "a dog"], ["a photo", "a photo"],
                        torch.randn(2, 4, 8, 8, generator=g), ["a photo of a cat", "a painting"])  # fmt: skip
    encode = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    draws = recording(relabel, monkeypatch)
    with torch.no_grad():
        forget, retain = relabel_terms(pipe.unet, pipe.scheduler, encode, data, [torch.Generator().manual_seed(4)],
                                       target="noise")  # fmt: skip
        (x0, x_t, t, noise), (rx0, rx_t, rt, r_noise) = draws
        f_prompt = data.forget_prompts[next(i for i in range(2) if torch.equal(data.forget[i : i + 1], x0))]
        r_prompt = data.retain_prompts[next(i for i in range(2) if torch.equal(data.retain[i : i + 1], rx0))]
        f_out = pipe.unet(x_t, t, encoder_hidden_states=encode(f_prompt)).sample
        r_out = pipe.unet(rx_t, rt, encoder_hidden_states=encode(r_prompt)).sample
    torch.testing.assert_close(forget, ((f_out - velocity(pipe.scheduler, x0, noise, t)) ** 2).mean())
    torch.testing.assert_close(retain, ((r_out - velocity(pipe.scheduler, rx0, r_noise, rt)) ** 2).mean())


def test_esds_target_is_the_same_combination_in_epsilon_space():
    pipe = sd2_pipe()
    unet, scheduler = pipe.unet, pipe.scheduler
    encode = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    concept, empty, anchor = encode("van gogh"), encode(""), encode("a painting")
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t, eta = torch.tensor([321]), 1.5

    def frozen_noise(x, t, emb):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb).sample

    a, s = levels(scheduler, t)

    def to_eps(v):  # ε = √ᾱ·v + √(1−ᾱ)·x_t, from v = √ᾱ·ε − √(1−ᾱ)·x0 and x_t = √ᾱ·x0 + √(1−ᾱ)·ε
        return a * v.double() + s * x_t.double()

    for first in (None, anchor):
        target = esd_target(frozen_noise, x_t, t, concept, empty, eta, first)
        e_empty, e_concept = to_eps(frozen_noise(x_t, t, empty)), to_eps(frozen_noise(x_t, t, concept))
        e_first = e_empty if first is None else to_eps(frozen_noise(x_t, t, first))
        in_eps = e_first - eta * (e_concept - e_empty)
        torch.testing.assert_close(to_eps(target), in_eps, rtol=1e-5, atol=1e-5)


PROMPTS, SEEDS = ["a cat", "a van gogh painting"], [1, 2]


def diffusers_call(pipe, steps: int = 3, guidance: float = 3.0) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                output_type="np").images  # fmt: skip


def test_generation_and_answer_sets_sample_with_the_schedulers_prediction_type():
    pipe = sd2_pipe()
    assert sampling._direct(pipe), "the SD2 pipeline must take the direct loop, else this compares a path to itself"
    reference = diffusers_call(pipe)
    ours = sampling.generate(pipe, PROMPTS, SEEDS, steps=3, guidance=3.0, output_type="np")
    assert np.abs(ours - reference).max() < 1e-5
    protocol = answers.SamplerPreset("test", steps=3, guidance=3.0)
    answer_images = answers.sample(pipe, PROMPTS, SEEDS, protocol, batch_size=2, output_type="np")
    assert np.abs(answer_images - reference).max() < 1e-5
    # the same model read as an ε-predictor draws other images: the type really is what the sampler used
    pipe.scheduler = DDIMScheduler(**{**SD2_DDIM, "prediction_type": "epsilon"})
    assert np.abs(sampling.generate(pipe, PROMPTS, SEEDS, steps=3, guidance=3.0, output_type="np") - ours).max() > 1e-2


def test_the_benchmarks_ddim_keeps_the_pipelines_settings():
    """The answer sets' DDIM comes from the pipeline's own config: v-prediction, spacing and offset carry over, and a
    config without clip_sample / set_alpha_to_one (Euler's) gets SD's False rather than DDIM's default True."""
    settings = {k: v for k, v in SD2_DDIM.items() if k not in ("clip_sample", "set_alpha_to_one")}
    euler = EulerDiscreteScheduler.from_config({**settings, "timestep_spacing": "trailing"})
    assert "clip_sample" not in euler.config
    ddim = sampling.ddim_scheduler(euler.config, 10)
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.timestep_spacing == "trailing"
    assert not ddim.config.clip_sample and not ddim.config.set_alpha_to_one
    assert int(ddim.timesteps[0]) == 999  # trailing spacing starts at the last training timestep
    assert sampling.ddim_scheduler({**SD2_DDIM, "clip_sample": True}).config.clip_sample  # a stated value is kept


def test_an_unknown_prediction_type_is_refused_when_a_run_starts(tmp_path, monkeypatch):
    import erase.runner as runner

    pipe = sd2_pipe()
    pipe.scheduler = DDIMScheduler.from_config({**SD2_DDIM, "prediction_type": "flow_prediction"})
    monkeypatch.setattr(runner, "select_in", lambda *a: pytest.fail("the run went past its start"))
    message = r"prediction_type 'flow_prediction'; accepted: epsilon, v_prediction, sample"
    with pytest.raises(ValueError, match=message):
        erase.run(pipe, example("esd", tmp_path), progress=False)
    toy = catalogs.get("toy")
    items, out = answers.answer_items(toy, [188])[:1], tmp_path / "answers"
    with pytest.raises(ValueError, match=message):
        answers.generate(pipe, items, toy, out, answers.SamplerPreset("test", steps=2, guidance=3.0), progress=False)
    assert not out.exists()  # refused before the folder was claimed
