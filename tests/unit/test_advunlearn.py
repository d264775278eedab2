"""AdvUnlearn on the tiny pipeline: the prefix attack lowers the denoising loss it attacks (checked by another way of
encoding the adversarial prompt), the outer step moves only the declared tensors, the erased text encoder plugs
into another pipeline, and bad inputs are one-line errors; on a tiny SDXL pipeline, the attack through both text
encoders is checked the same way and both encoders train."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import erase
from erase.attack import (
    PrefixAttack,
    WordEncoder,
    encode_embeds,
    nearest_tokens,
    prefix_attack,
    prompt_ids,
    splice_prefix,
    word_embedding,
)
from erase.conditioning import encode_ids, pack
from erase.delta import Delta
from erase.params import delta_name, select_in
from erase.sampling import ddim_partial, ddim_partial_each, ddim_scheduler
from tests.unit.helpers import fresh_pipe, generate

SMALL = {"concepts": ["van gogh"], "retain_prompts": ["a cat", "a dog", "a photo"], "steps": 3, "lr": 1e-2,
         "ddim_steps": 3, "warmup_iter": 1, "attack_step": 2, "attack_lr": 1e-2, "retain_batch": 2}  # fmt: skip


def small(**overrides):
    return erase.make_config("advunlearn", **{**SMALL, **overrides})


def with_new_tokens(encoder, tokenizer, prompt: str, prefix: torch.Tensor):
    """The adversarial prompt another way: a copy of the encoder with the prefix vectors (1, k, d) as k new
    vocabulary rows, and the prompt's ids with those k ids spliced after BOS."""
    k, vocab = prefix.shape[1], word_embedding(encoder).weight.shape[0]
    other = copy.deepcopy(encoder)
    other.resize_token_embeddings(vocab + k)
    with torch.no_grad():
        word_embedding(other).weight[vocab:] = prefix[0]
    ids = prompt_ids(tokenizer, prompt)
    return other, torch.cat([ids[:, :1], torch.arange(vocab, vocab + k)[None], ids[:, 1:]], dim=1)[:, : ids.shape[1]]


def encode_with_new_tokens(encoder, tokenizer, prompt: str, prefix: torch.Tensor) -> torch.Tensor:
    """The adversarial prompt encoded through the new rows by the copy's ordinary forward."""
    other, spliced = with_new_tokens(encoder, tokenizer, prompt, prefix)
    with torch.no_grad():
        return other(spliced)[0]


def test_soft_embeddings_encode_as_the_ids_do():
    pipe = fresh_pipe()
    ids = prompt_ids(pipe.tokenizer, "a van gogh painting")
    with torch.no_grad():
        embeds = word_embedding(pipe.text_encoder).weight[ids]
        assert torch.allclose(encode_embeds(pipe.text_encoder, ids, embeds), pipe.text_encoder(ids)[0], atol=1e-6)
        assert torch.equal(pipe.text_encoder(ids)[0], pipe.text_encoder(ids)[0])  # the hook is gone after


def test_splice_puts_the_prefix_after_bos_and_cuts_to_the_context():
    ids = torch.arange(6)[None]
    embeds = torch.arange(6.0)[None, :, None]
    prefix = torch.tensor([[[10.0], [11.0]]])
    spliced_ids, spliced = splice_prefix(ids, embeds, prefix, bos_id=0)
    assert spliced_ids.tolist() == [[0, 0, 0, 1, 2, 3]]
    assert spliced[0, :, 0].tolist() == [0.0, 10.0, 11.0, 1.0, 2.0, 3.0]


def test_the_attack_lowers_the_erased_models_denoising_loss_on_the_target():
    erased = fresh_pipe()
    erase.run(erased, small(params="text-encoder", steps=5, attack_step=1, warmup_iter=5), progress=False)
    original = fresh_pipe()
    unet, encoder, tokenizer = erased.unet, erased.text_encoder, erased.tokenizer
    g = torch.Generator().manual_seed(0)
    scheduler = ddim_scheduler(erased.scheduler.config, 4)
    with torch.no_grad():
        concept = original.text_encoder(prompt_ids(tokenizer, "van gogh"))[0]
        empty = original.text_encoder(prompt_ids(tokenizer, ""))[0]
        noise = torch.randn((1, 4, 8, 8), generator=g)
        x_t, level = ddim_partial(lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample, scheduler, noise,
                                  concept, empty, 3.0, 2)  # fmt: skip
        t = torch.tensor([level])
        target = original.unet(x_t, t, encoder_hidden_states=concept).sample  # e0(x_t, c), unet unchanged

    def denoising_loss(cond: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample, target)

    settings = PrefixAttack(tokens=2, steps=15, lr=0.05, init="random")
    result = prefix_attack(lambda cond, step: denoising_loss(cond), encoder, prompt_ids(tokenizer, "van gogh"),
                           settings, torch.Generator().manual_seed(1))  # fmt: skip
    start = PrefixAttack(tokens=2, steps=0, init="random")
    before = prefix_attack(lambda c, s: 0, encoder, prompt_ids(tokenizer, "van gogh"), start,
                           torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        loss_before = float(denoising_loss(encode_with_new_tokens(encoder, tokenizer, "van gogh", before.prefix)))
        loss_after = float(denoising_loss(encode_with_new_tokens(encoder, tokenizer, "van gogh", result.prefix)))
    assert loss_before == pytest.approx(result.losses[0], rel=1e-4)  # the attack measured what we measure
    assert loss_after < loss_before
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())  # only the prefix had grads


def sdxl_with_new_tokens(pipe, prompt: str, prefix: torch.Tensor) -> torch.Tensor:
    """SDXL's packed condition of the adversarial prompt, encoded another way: each encoder's part of the prefix as
    k new vocabulary rows of a copy of it, spliced after BOS into each tokenizer's own ids (their padding differs)."""
    width = pipe.text_encoder.config.hidden_size
    outputs = []
    for encoder, tokenizer, part in ((pipe.text_encoder, pipe.tokenizer, prefix[..., :width]),
                                     (pipe.text_encoder_2, pipe.tokenizer_2, prefix[..., width:])):  # fmt: skip
        other, spliced = with_new_tokens(encoder, tokenizer, prompt, part)
        with torch.no_grad():
            outputs.append(other(spliced, output_hidden_states=True))
    tokens = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    return pack(tokens, outputs[1].text_embeds)


def test_on_sdxl_word_vectors_encode_as_the_ids_do_and_the_attack_lowers_its_loss():
    from tests.unit.test_sdxl import sdxl_pipe

    pipe, original = sdxl_pipe(), sdxl_pipe(seed=1)  # the "erased" UNet and another, whose output is the target
    words = WordEncoder.of(pipe)
    ids = prompt_ids(pipe.tokenizer, "van gogh")
    with torch.no_grad():
        assert torch.allclose(words(ids, words.words(ids)), encode_ids(pipe, ids), atol=1e-6)
        x_t, t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        target = original.unet(x_t, t, encoder_hidden_states=encode_ids(original, ids)).sample

    def denoising_loss(cond: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pipe.unet(x_t, t, encoder_hidden_states=cond).sample, target)

    settings = PrefixAttack(tokens=2, steps=15, lr=0.05, init="random")
    result = prefix_attack(lambda cond, step: denoising_loss(cond), words, ids, settings,
                           torch.Generator().manual_seed(1))  # fmt: skip
    before = prefix_attack(lambda c, s: 0, words, ids, PrefixAttack(tokens=2, steps=0),
                           torch.Generator().manual_seed(1))  # fmt: skip
    assert result.prefix.shape == (1, 2, 16 + 32)  # one vector spans both encoders' word embeddings
    with torch.no_grad():
        loss_before = float(denoising_loss(sdxl_with_new_tokens(pipe, "van gogh", before.prefix)))
        loss_after = float(denoising_loss(sdxl_with_new_tokens(pipe, "van gogh", result.prefix)))
        assert torch.allclose(result.condition(words), sdxl_with_new_tokens(pipe, "van gogh", result.prefix),
                              atol=1e-5)  # fmt: skip
    assert loss_before == pytest.approx(result.losses[0], rel=1e-4)
    assert loss_after < loss_before


def test_on_sdxl_both_text_encoders_train_by_default():
    from tests.unit.test_sdxl import sdxl_pipe

    result = erase.run(sdxl_pipe(), small(), progress=False)
    assert {n.split(".")[0] for n in result.delta.tensors} == {"text_encoder", "text_encoder_2"}
    # SDXL reads the first encoder's penultimate states: its last layer and final norm get no gradient and stay put
    last = sdxl_pipe().text_encoder.config.num_hidden_layers - 1
    unread = {n for n in select_in(sdxl_pipe(), "text-encoder-layers") if n.startswith("text_encoder.") and (
        f".layers.{last}." in n or "final_layer_norm" in n)}  # fmt: skip
    assert unread and set(result.delta.tensors) == set(select_in(sdxl_pipe(), "text-encoder-layers")) - unread


def test_a_projected_attack_returns_real_tokens():
    pipe = fresh_pipe()
    ids = prompt_ids(pipe.tokenizer, "van gogh")
    table = word_embedding(pipe.text_encoder).weight
    result = prefix_attack(
        lambda cond, step: cond.pow(2).mean(),
        pipe.text_encoder,
        ids,
        PrefixAttack(tokens=2, steps=3, lr=0.05, project=True),
        torch.Generator().manual_seed(0),
    )
    assert result.tokens is not None and torch.equal(result.prefix, table[result.tokens].detach())
    assert torch.equal(nearest_tokens(table[None, :5].detach(), table), torch.arange(5)[None])


def test_multi_stop_ddim_matches_separate_runs():
    pipe = fresh_pipe()
    scheduler = ddim_scheduler(pipe.scheduler.config, 4)
    noise_fn = lambda x, t, e: pipe.unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    emb = torch.randn(1, 16, 32)
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    batched, levels = ddim_partial_each(noise_fn, scheduler, noise, emb.expand(3, -1, -1), 0 * emb.expand(3, -1, -1),
                                        3.0, [0, 3, 2])  # fmt: skip
    for b, stop in enumerate([0, 3, 2]):
        single, level = ddim_partial(noise_fn, scheduler, noise[b : b + 1], emb, 0 * emb, 3.0, stop)
        assert torch.allclose(batched[b : b + 1], single, atol=1e-5) and levels[b] == level


def test_the_outer_step_trains_only_the_declared_text_encoder_tensors():
    pipe = fresh_pipe()
    unet_before = copy.deepcopy(pipe.unet.state_dict())
    encoder_before = copy.deepcopy(pipe.text_encoder.state_dict())
    result = erase.run(pipe, small(), progress=False)
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items())
    changed = {f"text_encoder.{k}" for k, v in pipe.text_encoder.state_dict().items()
               if not torch.equal(encoder_before[k], v)}  # fmt: skip
    assert changed and changed == set(result.delta.tensors) == set(select_in(fresh_pipe(), "text-encoder-layers"))
    assert not any("embeddings" in n for n in changed)


def test_params_naming_unet_tensors_train_only_those():
    pipe = fresh_pipe()
    encoder_before = copy.deepcopy(pipe.text_encoder.state_dict())
    result = erase.run(pipe, small(params="kv"), progress=False)
    assert all(torch.equal(encoder_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    declared = {delta_name(n) for n in select_in(fresh_pipe(), "kv")}
    assert result.delta.tensors and set(result.delta.tensors) == declared


def test_the_erased_text_encoder_plugs_into_another_pipeline(tmp_path):
    pipe = fresh_pipe()
    encoder_before = copy.deepcopy(pipe.text_encoder.state_dict())
    erase.run(pipe, small(), progress=False).delta.save(tmp_path / "delta")
    delta = Delta.load(tmp_path / "delta")
    other = fresh_pipe(seed=1)  # another UNet (and VAE); the same text encoder
    other.text_encoder.load_state_dict(encoder_before)
    delta.apply(other)
    ids = prompt_ids(pipe.tokenizer, "van gogh")
    with torch.no_grad():
        assert torch.equal(other.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    with pytest.raises(ValueError, match="apply it to a model with the same text_encoder"):
        delta.apply(fresh_pipe(seed=1))
    same = fresh_pipe()
    delta.apply(same)
    assert torch.equal(generate(same), generate(pipe))


def test_many_concepts_are_erased_in_one_run():
    config = small(concepts=["van gogh", "cat"], steps=4, adv_prompt_update_step=2)
    result = erase.run(fresh_pipe(), config, progress=False)
    assert len(result.record["losses"]) == 4 and result.delta.tensors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"concepts": []}, "concepts must be one or more non-empty texts"),
        ({"concepts": ["van gogh", "van gogh"]}, "concepts must be distinct, got 'van gogh' twice"),
        ({"adv_prompt_num": 0}, "adv_prompt_num must be an integer >= 1, got 0"),
        ({"attack_step": -1}, "attack_step must be an integer >= 0, got -1"),
        ({"attack_init": "zeros"}, "attack_init 'zeros' is not one of random, latest"),
        ({"retain_prompts": []}, "retain_train 'reg' needs retain_prompts"),
        ({"retain_train": "iter"}, "retain_train 'iter' is not one of reg, none"),
        ({"attack_method": "free_at"}, "attack_method 'free_at' is not one of pgd, fast_at"),
        ({"adv_prompt_update_step": 0}, "adv_prompt_update_step must be an integer >= 1, got 0"),
        ({"retain_loss_w": -1.0}, "retain_loss_w must be >= 0"),
        ({"attack_lr": 0.0}, "attack_lr must be a positive number, got 0.0"),
    ],
)
def test_bad_inputs_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        small(**overrides)
    assert "\n" not in str(error.value)


def test_a_concept_without_tokens_or_too_long_is_refused_before_training():
    with pytest.raises(ValueError, match="concept '§§' tokenizes to nothing") as error:
        erase.run(fresh_pipe(), small(concepts=["§§"]), progress=False)
    assert "\n" not in str(error.value)
    long = "a photo of a cat in van gogh painting"  # 8 words; the tiny tokenizer holds 16 tokens
    with pytest.raises(ValueError, match="exceeds the tokenizer's 16"):
        erase.run(fresh_pipe(), small(concepts=[long], adv_prompt_num=8), progress=False)


def test_no_retain_prompts_are_needed_without_the_retain_loss():
    result = erase.run(fresh_pipe(), small(retain_prompts=[], retain_train="none"), progress=False)
    assert result.delta.tensors


def test_the_attack_settings_check_their_own_values():
    with pytest.raises(ValueError, match="prefix tokens \\(k\\) must be an integer >= 1, got 0"):
        PrefixAttack(tokens=0)
    with pytest.raises(ValueError, match="the attack's steps must be an integer >= 0, got -1"):
        PrefixAttack(steps=-1)
