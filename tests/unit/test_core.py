"""The erasure core on a tiny random pipeline: parameter sets, frozen predictions, attention capture, training."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import erase
from erase.attention import capture_cross_attention
from erase.frozen import FrozenOriginal
from erase.methods.esd import esd_target
from erase.params import ALIASES, select
from erase.text import PromptEncoder, token_positions
from erase.train import NonFiniteLossError, TrainSettings, train
from tests.unit.helpers import fresh_pipe, small_esd, unet_state


def test_named_parameter_sets_partition_the_unet():
    unet = fresh_pipe().unet
    kv, xattn, noxattn, everything = (set(select(unet, s)) for s in ("kv", "xattn", "noxattn", "all"))
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    assert kv < xattn and xattn | noxattn == everything and not xattn & noxattn
    assert set(select(unet, "*attn2.to_k.*,*attn2.to_v.*")) == kv
    # ESD-u as the paper-era code trains it: outside attn2, without the time embedding and LDM's `out.*`
    # (out.0 the GroupNorm conv_norm_out, out.2 conv_out)
    esd_u = set(select(unet, "esd-u"))
    left_out = ("time_embedding.", "conv_norm_out.", "conv_out.")
    assert esd_u == {n for n in noxattn if not n.startswith(left_out)}
    assert all(any(n.startswith(prefix) for n in noxattn) for prefix in left_out)


@pytest.mark.parametrize("spec", ["", "attn3", ["*nothing*"]])
def test_parameter_set_matching_nothing_is_an_error(spec):
    with pytest.raises(ValueError, match="parameter set|empty"):
        select(fresh_pipe().unet, spec)


def test_frozen_prediction_equals_untouched_copy():
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    params = select(pipe.unet, "xattn")
    frozen = FrozenOriginal(pipe.unet, list(params))
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = original(x, t, encoder_hidden_states=emb).sample
        changed = pipe.unet(x, t, encoder_hidden_states=emb).sample
    got = frozen(pipe.unet, x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(changed, expected)


def test_attention_capture_probabilities_gradients_and_restore():
    unet = fresh_pipe().unet
    before = dict(unet.attn_processors)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.randn(1, 16, 32)
    with capture_cross_attention(unet) as store:
        unet(x, t, encoder_hidden_states=emb)
        maps = store.take()
    assert len(maps) == 4 and not store.maps
    for probs in maps.values():
        assert probs.shape[0] == 1 and probs.shape[-1] == 16
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    sum(m[..., 3].pow(2).sum() for m in maps.values()).backward()
    to_k = select(unet, "*attn2.to_k.*")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in to_k.values())
    assert dict(unet.attn_processors) == before
    with pytest.raises(RuntimeError, match="boom"), capture_cross_attention(unet):
        raise RuntimeError("boom")
    assert dict(unet.attn_processors) == before


def test_captured_forward_equals_default_attention():
    unet = fresh_pipe().unet
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.randn(1, 16, 32)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=emb).sample
        with capture_cross_attention(unet):
            captured = unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-6)


def test_token_positions():
    tok = fresh_pipe().tokenizer
    assert token_positions(tok, "a photo of van gogh", "van gogh") == [4, 5]
    with pytest.raises(ValueError, match="not among the tokens"):
        token_positions(tok, "a photo of a cat", "van gogh")


@pytest.mark.parametrize("variant", ["esd-x", "esd-u", "esd-x-strict", "esd-all"])
def test_esd_variant_changes_exactly_its_parameters(variant):
    pipe = fresh_pipe()
    before = unet_state(pipe)
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    result = erase.run(pipe, small_esd(params=variant, steps=2), progress=False)
    declared = {f"unet.{n}" for n in select(fresh_pipe().unet, ALIASES.get(variant, variant))}
    after = pipe.unet.state_dict()
    changed = {f"unet.{k}" for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(result.delta.tensors) == declared
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in text_before.items())


def test_esd_loss_equals_formula_from_three_unet_calls():
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    params = select(pipe.unet, "xattn")
    frozen = FrozenOriginal(pipe.unet, list(params))
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.1)
    encode = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    c, u = encode("van gogh"), encode("")
    x, t, eta = torch.randn(1, 4, 8, 8), torch.tensor([321]), 1.7

    def frozen_noise(x_, t_, e_):
        return frozen(pipe.unet, x_, t_, encoder_hidden_states=e_).sample

    ours = F.mse_loss(pipe.unet(x, t, encoder_hidden_states=c).sample, esd_target(frozen_noise, x, t, c, u, eta))
    with torch.no_grad():
        e0_u = original(x, t, encoder_hidden_states=u).sample
        e0_c = original(x, t, encoder_hidden_states=c).sample
        e_c = pipe.unet(x, t, encoder_hidden_states=c).sample
    expected = ((e_c - (e0_u - eta * (e0_c - e0_u))) ** 2).mean()
    # Batched and separate float32 passes differ in the last bits only.
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=0)


def test_run_is_deterministic_under_a_seed_and_depends_on_it():
    a = erase.run(fresh_pipe(), small_esd(seed=3), progress=False).delta
    b = erase.run(fresh_pipe(), small_esd(seed=3), progress=False).delta
    c = erase.run(fresh_pipe(), small_esd(seed=4), progress=False).delta
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_record_has_the_efficiency_figures():
    record = erase.run(fresh_pipe(), small_esd(), progress=False).record
    assert record["wall_time_s"] > 0 and record["peak_memory_bytes"] > 0
    assert len(record["losses"]) == 3 and record["storage_bytes"] > 0
    assert record["method"] == "esd" and record["base_fingerprint"] and record["versions"]["erasekit"]


def test_resume_after_a_kill_gives_the_same_delta(tmp_path, monkeypatch):
    full = erase.run(fresh_pipe(), small_esd(steps=4), progress=False)
    uninterrupted, uninterrupted_losses = full.delta, full.record["losses"]
    import erase.train as train_module

    real_seed = train_module.sample_seed

    def dies_at_step_3(seed, step, index):
        if step == 3:
            raise KeyboardInterrupt
        return real_seed(seed, step, index)

    monkeypatch.setattr(train_module, "sample_seed", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        erase.run(fresh_pipe(), small_esd(steps=4, checkpoint_every=2), checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(train_module, "sample_seed", real_seed)
    resumed = erase.run(fresh_pipe(), small_esd(steps=4, checkpoint_every=2), checkpoint_dir=tmp_path, progress=False)
    assert resumed.record["losses"] == uninterrupted_losses
    assert set(resumed.delta.tensors) == set(uninterrupted.tensors)
    for name, value in uninterrupted.tensors.items():
        torch.testing.assert_close(resumed.delta.tensors[name], value, rtol=0, atol=0)


def test_non_finite_loss_stops_with_last_good_state(tmp_path):
    model = torch.nn.Linear(2, 1)
    params = dict(model.named_parameters())
    calls = []

    def loss_fn(m, generators):
        calls.append(1)
        out = m(torch.ones(1, 2)).sum()
        return out * float("nan") if len(calls) == 3 else out

    snapshots = []
    with pytest.raises(NonFiniteLossError, match="step 2"):
        settings = TrainSettings(steps=5, lr=0.1, checkpoint_every=1)
        train(model, params, lambda m, g: (snapshots.append(m.weight.detach().clone()), loss_fn(m, g))[1], settings,
              checkpoint_dir=tmp_path / "ckpt", progress=False)  # fmt: skip
    torch.testing.assert_close(model.weight.detach(), snapshots[-1])
    assert (tmp_path / "ckpt" / "state.json").is_file()


@pytest.mark.parametrize(
    "field,value,message",
    [("steps", -1, "steps"), ("lr", float("nan"), "lr"), ("params", "esd-z", "esd-z"),
     ("concepts", [""], "concepts"), ("sample_with", "teacher", "sample_with")],
)  # fmt: skip
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        small_esd(**{field: value})


def test_presets_and_unknown_fields():
    cfg = erase.make_config("esd", preset="diffusers-code", concepts=["x"])
    assert (cfg.steps, cfg.lr, cfg.negative_guidance, cfg.preset) == (200, 5e-5, 2.0, "diffusers-code")
    with pytest.raises(ValueError, match="unknown preset"):
        erase.make_config("esd", preset="nope", concepts=["x"])
    with pytest.raises(ValueError, match="unknown config field"):
        erase.make_config("esd", concepts=["x"], stepz=3)
    with pytest.raises(ValueError, match="unknown method"):
        erase.make_config("esdd")


def test_gradient_checkpointing_gives_the_same_delta():
    plain = erase.run(fresh_pipe(), small_esd(steps=2), progress=False).delta
    checkpointed_pipe = fresh_pipe()
    checkpointed = erase.run(checkpointed_pipe, small_esd(steps=2, gradient_checkpointing=True), progress=False).delta
    assert not checkpointed_pipe.unet.is_gradient_checkpointing, "the loop must switch it off again"
    for name, value in plain.tensors.items():
        torch.testing.assert_close(checkpointed.tensors[name], value, rtol=1e-5, atol=1e-7)


def test_bf16_mixed_precision_and_half_precision_models():
    mixed = erase.run(fresh_pipe(), small_esd(steps=2, mixed_precision="bf16"), progress=False)
    assert mixed.delta.tensors and all(torch.isfinite(torch.tensor(mixed.record["losses"])))
    pipe = fresh_pipe()
    pipe.unet.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    half = erase.run(pipe, small_esd(steps=2, mixed_precision="bf16"), progress=False)
    assert all(t.dtype == torch.bfloat16 for t in half.delta.tensors.values())
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())


@pytest.mark.parametrize("accum", [1, 2])
def test_local_training_matches_accelerate(accum):
    via_accelerate = erase.run(fresh_pipe(), small_esd(batch_size=2, grad_accum=accum), progress=False)
    local = erase.run(fresh_pipe(), small_esd(batch_size=2, grad_accum=accum), progress=False, local=True)
    assert local.record["losses"] == pytest.approx(via_accelerate.record["losses"], rel=1e-5)
    for name, value in via_accelerate.delta.tensors.items():
        torch.testing.assert_close(local.delta.tensors[name], value, rtol=1e-5, atol=1e-7)


def test_grad_accumulation_equals_a_larger_batch():
    accumulated = erase.run(fresh_pipe(), small_esd(batch_size=2, grad_accum=2), progress=False).delta
    batched = erase.run(fresh_pipe(), small_esd(batch_size=2), progress=False).delta
    for name, value in batched.tensors.items():
        torch.testing.assert_close(accumulated.tensors[name], value, rtol=1e-4, atol=1e-6)


def test_a_concept_longer_than_the_tokenizer_limit_is_an_error_not_a_cut():
    limit = fresh_pipe().tokenizer.model_max_length
    with pytest.raises(ValueError, match=f"more than the tokenizer's {limit}"):
        erase.run(fresh_pipe(), small_esd(concepts=["van gogh " * limit], steps=1), progress=False)


@pytest.mark.parametrize(
    "field,value", [("steps", True), ("lr", True), ("seed", "abc"), ("negative_guidance", float("nan")), ("seed", 1.5)]
)
def test_config_values_are_checked_by_type(field, value):
    with pytest.raises(ValueError, match=f"{field} must be .*, got {re.escape(repr(value))}"):
        small_esd(**{field: value})


def test_one_text_is_one_concept():
    assert small_esd(concepts="Cats").concepts == ["Cats"]


@pytest.mark.parametrize("field", ["concepts"])
def test_a_number_where_texts_belong_is_a_clear_error(field):
    with pytest.raises(ValueError, match=f"{field} must be one or more non-empty texts, got 5"):
        small_esd(**{field: 5})
