"""SDXL on a tiny random SDXL-shaped pipeline: loading, the packed prompt embedding against diffusers' own encoding
and added conditions, sampling, frozen predictions, every registered method, ESD's loss and UCE's closed form
against independent computations, and Deltas that refuse the other architecture."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import erase
from erase import conditioning
from erase.delta import Delta
from erase.frozen import FrozenOriginal
from erase.methods.esd import esd_target
from erase.params import select
from erase.sampling import generate
from erase.testing import tiny_sdxl_pipeline
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe
from tests.unit.test_registry import run_changes_only_declared


def sdxl_pipe(seed: int = 0):
    pipe = tiny_sdxl_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    conditioning.install(pipe)
    return pipe


@torch.no_grad()
def diffusers_conditions(pipe, prompt: str, size: int):
    """diffusers' own SDXL conditioning of `prompt` (no classifier-free guidance): token states, added kwargs."""
    tokens, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=tokens.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)  # fmt: skip
    return tokens, {"text_embeds": pooled, "time_ids": ids}


def test_a_saved_sdxl_folder_loads_with_its_conditions_installed(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    pipe = erase.load_pipeline(tmp_path / "sdxl")
    assert conditioning.is_sdxl(pipe.unet) and getattr(pipe.unet, conditioning.HOOK_ATTRIBUTE) is not None
    assert conditioning.context_dim(pipe) == 48


def test_a_refiner_like_folder_is_refused(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    index["text_encoder"] = [None, None]  # the refiner has the second encoder only
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refiner"):
        erase.load_pipeline(tmp_path / "refiner")


def test_packed_embedding_is_diffusers_encoding_and_the_unet_reads_it_as_added_conditions():
    pipe = sdxl_pipe()
    packed = PromptEncoder.of(pipe)("a van gogh painting")
    tokens, added = diffusers_conditions(pipe, "a van gogh painting", size=16)
    assert packed.shape == (1, tokens.shape[1] + 1, 48)
    torch.testing.assert_close(packed[:, :-1], tokens, rtol=0, atol=1e-6)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        ours = pipe.unet(x, t, encoder_hidden_states=packed).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        without_pooled = pipe.unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs={
            "text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}).sample  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, without_pooled)  # the pooled row does reach the UNet


def test_sampling_and_answer_sets_with_the_packed_encoder_equal_the_pipelines_own_call():
    from canvas import answers

    pipe = sdxl_pipe()
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, generator=gens, output_type="pt").images
    ours = generate(pipe, prompts, seeds, steps=3, guidance=5.0, encoder=PromptEncoder.of(pipe))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    protocol = answers.SamplerPreset("test", steps=3, guidance=5.0)
    answer_images = answers.sample(pipe, prompts, seeds, protocol, batch_size=2, output_type="pt")
    torch.testing.assert_close(answer_images, theirs, rtol=0, atol=1e-5)


def test_frozen_prediction_equals_an_untouched_copy_with_added_conditions():
    pipe = sdxl_pipe()
    original = copy.deepcopy(pipe.unet)
    params = select(pipe.unet, "xattn")
    frozen = FrozenOriginal(pipe.unet, list(params))
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    packed = PromptEncoder.of(pipe)(["a cat", "a dog"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    tokens, pooled = conditioning.unpack(packed, conditioning.pooled_dim(pipe.unet))
    added = {"text_embeds": pooled, "time_ids": conditioning.time_ids(16, 16, 2, x.device, x.dtype)}
    with torch.no_grad():
        expected = original(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        changed = pipe.unet(x, t, encoder_hidden_states=packed).sample
    got = frozen(pipe.unet, x, t, encoder_hidden_states=packed).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(changed, expected)


def test_attention_capture_on_sdxl_sees_the_token_rows_and_leaves_the_output_as_it_was():
    from erase.attention import capture_cross_attention, cross_attention_layers

    pipe = sdxl_pipe()
    emb = PromptEncoder.of(pipe)("a van gogh painting of a cat")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        plain = pipe.unet(x, t, emb).sample
        with capture_cross_attention(pipe.unet) as store:
            captured = pipe.unet(x, t, emb).sample
    maps = store.take()
    assert set(maps) == set(cross_attention_layers(pipe.unet)) and len(maps) == 2 + 2 * 3  # down 2 layers, up 3 x 2
    for probabilities in maps.values():
        assert probabilities.shape[-1] == emb.shape[1] - 1  # the token rows, not the pooled row
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", erase.available_methods())
def test_every_method_runs_on_sdxl_and_changes_only_declared_tensors(name, tmp_path):
    pipe, result = run_changes_only_declared(sdxl_pipe, name, tmp_path)
    assert result.delta.metadata["architecture"] == "sdxl"
    result.delta.save(tmp_path / "delta")
    base = sdxl_pipe()
    Delta.load(tmp_path / "delta").apply(base)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    prompt = "a van gogh painting of a cat"
    emb = PromptEncoder.of(pipe)(prompt)
    torch.testing.assert_close(PromptEncoder.of(base)(prompt), emb, rtol=0, atol=0)  # the text encoders too
    with torch.no_grad():
        torch.testing.assert_close(base.unet(x, t, emb).sample, pipe.unet(x, t, emb).sample, rtol=0, atol=0)


def test_skd_cag_with_random_word_references_encodes_them_as_the_unet_reads_them():
    pipe = sdxl_pipe()
    encoder = PromptEncoder.of(pipe)
    fresh = encoder(["a cat", "a dog"], cache=False)
    torch.testing.assert_close(fresh, encoder(["a cat", "a dog"]), rtol=0, atol=0)
    config = erase.make_config("skd-cag", trigger="tq", captions=["a photo of a cat", "a dog"], steps=2, lr=1e-3,
                               reference="random-words")  # fmt: skip
    result = erase.run(pipe, config, progress=False)
    assert result.delta.tensors and all(torch.isfinite(torch.tensor(result.record["losses"])))


def test_esd_loss_equals_the_formula_from_independent_unet_calls_with_added_conditions():
    pipe = sdxl_pipe()
    original = copy.deepcopy(pipe.unet)
    params = select(pipe.unet, "xattn")
    frozen = FrozenOriginal(pipe.unet, list(params))
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.1)
    encode = PromptEncoder.of(pipe)
    c, u = encode("van gogh"), encode("")
    x, t, eta = torch.randn(1, 4, 8, 8), torch.tensor([321]), 1.7

    def frozen_noise(x_, t_, e_):
        return frozen(pipe.unet, x_, t_, encoder_hidden_states=e_).sample

    ours = F.mse_loss(pipe.unet(x, t, encoder_hidden_states=c).sample, esd_target(frozen_noise, x, t, c, u, eta))
    (tc, ac), (tu, au) = diffusers_conditions(pipe, "van gogh", 16), diffusers_conditions(pipe, "", 16)
    with torch.no_grad():
        e0_u = original(x, t, encoder_hidden_states=tu, added_cond_kwargs=au).sample
        e0_c = original(x, t, encoder_hidden_states=tc, added_cond_kwargs=ac).sample
        e_c = pipe.unet(x, t, encoder_hidden_states=tc, added_cond_kwargs=ac).sample
    expected = ((e_c - (e0_u - eta * (e0_c - e0_u))) ** 2).mean()
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=0)


def test_uce_on_sdxl_equals_an_independent_least_squares_solve_over_the_2048_wide_context():
    pipe = sdxl_pipe()
    before = {n: p.detach().clone().double() for n, p in select(pipe.unet, "kv").items()}
    concepts, guides, preserve = ["van gogh", "dog"], ["painting", ""], ["cat", "a photo of"]
    lam, eta_e, eta_p = 0.5, 1.3, 0.7
    config = erase.make_config("uce", concepts=concepts, guides=guides, preserve=preserve, lam=lam,
                               erase_scale=eta_e, preserve_scale=eta_p, token_choice="last_word")  # fmt: skip
    erase.run(pipe, config, progress=False)

    def last_word(prompt: str) -> torch.Tensor:  # diffusers' encoding, the last word's row (BOS for "")
        tokens, _ = diffusers_conditions(pipe, prompt, 16)
        return tokens[0, max(len(pipe.tokenizer(prompt).input_ids) - 2, 0)].double()

    c = torch.stack([last_word(p) for p in concepts])
    g = torch.stack([last_word(p) for p in guides])
    k = torch.stack([last_word(p) for p in preserve])
    assert c.shape[1] == 48  # both encoders' widths side by side
    for name, p in select(pipe.unet, "kv").items():
        w = before[name]
        a = torch.cat([lam**0.5 * torch.eye(48, dtype=torch.float64), eta_e**0.5 * c, eta_p**0.5 * k])
        y = torch.cat([lam**0.5 * w.T, eta_e**0.5 * (g @ w.T), eta_p**0.5 * (k @ w.T)])
        expected = torch.linalg.lstsq(a, y, driver="gelsd").solution.T
        change, expected_change = p.detach().double() - w, expected - w
        assert expected_change.norm() > 1e-3 * w.norm()
        assert (change - expected_change).norm() / expected_change.norm() < 1e-4, name


def test_a_delta_of_one_architecture_is_refused_by_the_other(tmp_path):
    sdxl = sdxl_pipe()
    made = erase.run(sdxl, erase.make_config("uce", concepts=["van gogh"], guides=["painting"]), progress=False)
    with pytest.raises(ValueError, match="made on an SDXL model and cannot be applied to an SD 1.x/2.x"):
        made.delta.apply(fresh_pipe(), force=True)
    sd = erase.run(fresh_pipe(), erase.make_config("uce", concepts=["van gogh"], guides=["painting"]), progress=False)
    with pytest.raises(ValueError, match="made on an SD 1.x/2.x model and cannot be applied to an SDXL"):
        sd.delta.apply(sdxl_pipe())


def test_soft_prompt_attacks_on_sdxl_encode_their_prompts_through_both_encoders():
    from erase import ringabell
    from erase.attack import WordEncoder, prompt_ids
    from erase.inversion import Inversion, LearnedConcept, invert, placeholder_prompt
    from erase.unlearndiffatk import UnlearnDiffAtk, random_prefixes, unlearndiffatk

    pipe, prompt = sdxl_pipe(), "a van gogh painting"
    words, g = WordEncoder.of(pipe), torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g)
    settings = UnlearnDiffAtk(tokens=2, iterations=2, lr=0.5, timesteps=2)
    for result in (
        unlearndiffatk(pipe, prompt, images, settings, progress=False),
        random_prefixes(pipe, prompt, settings),
    ):
        # real tokens: the condition is the packed encoding of the plain id sequence [BOS, tokens, prompt, EOS, pad]
        ids = prompt_ids(pipe.tokenizer, prompt)
        real = torch.cat([ids[:, :1], result.tokens, ids[:, 1:]], dim=1)[:, : ids.shape[1]]
        torch.testing.assert_close(result.condition(words), conditioning.encode_ids(pipe, real), rtol=0, atol=1e-6)
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    learned = invert(pipe, ["a <concept> painting"] * 2, images, Inversion(steps=2, batch=1, accumulate=1, init="cat"),
                     progress=False)  # fmt: skip
    assert learned.vector.shape == (16 + 32,) and len(learned.losses) == 2
    as_cat = placeholder_prompt(pipe, "a <concept> painting", LearnedConcept(words.table[cat]))
    expected = conditioning.encode_ids(pipe, prompt_ids(pipe.tokenizer, "a cat painting"))
    torch.testing.assert_close(as_cat.condition(words), expected, rtol=0, atol=1e-6)
    vector = ringabell.concept_vector(pipe.tokenizer, words, ["a van gogh painting"], ["a painting"])
    assert vector.shape == (pipe.tokenizer.model_max_length + 1, 48)  # the token rows and the pooled row
    found = ringabell.ring_a_bell(pipe.tokenizer, words, prompt, vector, ringabell.RingABell(tokens=2, population=4,
                                  generations=3), torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    torch.testing.assert_close(found.condition(words), conditioning.encode_ids(pipe, found.ids), rtol=0, atol=1e-6)


def test_single_file_sdxl_export_reloads_tensor_for_tensor_here_and_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from erase.convert import to_single_file

    pipe = tiny_sdxl_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "config")
    path = to_single_file(pipe, tmp_path / "sdxl.safetensors")
    ours = erase.load_pipeline(path, config=tmp_path / "config")
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                        local_files_only=True)  # fmt: skip
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(pipe, part).state_dict()
        for loaded in (ours, theirs):
            got = getattr(loaded, part).state_dict()
            assert set(got) == set(expected), part
            assert all(torch.equal(got[k], v) for k, v in expected.items()), part


def test_esd_paper_sdxl_preset_is_the_authors_sdxl_script():
    config = erase.make_config("esd", preset="paper-sdxl", concepts=["van gogh"])
    # esd_sdxl.py: --iterations 200, --lr 2e-4 (esd-x), --negative_guidance 1, --guidance_scale 2,
    # --num_inference_steps 50, bf16, x_t by the base UNet, no --erase_from: the concept is its own anchor
    assert (config.steps, config.lr, config.negative_guidance, config.start_guidance, config.ddim_steps) == (
        200, 2e-4, 1.0, 2.0, 50)  # fmt: skip
    assert (config.mixed_precision, config.sample_with, config.anchor, config.parameter_set()) == (
        "bf16", "frozen", "concept", "esd-x")  # fmt: skip


def test_trajectories_are_guided_against_the_pipelines_own_negative():
    empty_sdxl = PromptEncoder.of(sdxl_pipe())("")
    assert torch.equal(conditioning.sampling_unconditional(sdxl_pipe(), empty_sdxl), torch.zeros_like(empty_sdxl))
    kept = sdxl_pipe()
    kept.register_to_config(force_zeros_for_empty_prompt=False)
    assert conditioning.sampling_unconditional(kept, empty_sdxl) is empty_sdxl
    empty_sd = PromptEncoder.of(fresh_pipe())("")
    assert conditioning.sampling_unconditional(fresh_pipe(), empty_sd) is empty_sd


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_an_sdxl_erasure_exported_as_lora_loads_into_diffusers_as_the_delta(layout, tmp_path):
    from erase.lora import export_lora

    erased = sdxl_pipe()
    delta = erase.run(
        erased, erase.make_config("uce", concepts=["van gogh"], guides=["painting"]), progress=False
    ).delta
    export_lora(delta, sdxl_pipe(), rank=48, format=layout).save(tmp_path / "uce.safetensors")
    loaded = sdxl_pipe()
    loaded.load_lora_weights(str(tmp_path / "uce.safetensors"))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    emb = PromptEncoder.of(erased)("a van gogh painting")
    with torch.no_grad():
        want, got, base = (p.unet(x, t, emb).sample for p in (erased, loaded, sdxl_pipe()))
    assert (want - base).abs().max() > 1e-3  # the erasure moves the prediction
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
