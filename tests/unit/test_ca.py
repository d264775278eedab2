"""CA: both losses equal their formulas computed by hand on fixed inputs; prompts, anchor-image cache, options."""

import pytest
import torch

import erase
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.methods import ca
from erase.params import select
from erase.paths import cache_dir
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe

ANCHOR, TARGET = "a painting of a cat", "a van gogh painting of a cat"


def small_ca(tmp_path, **overrides):
    values = {
        "concepts": ["van gogh painting"], "anchors": ["painting"], "anchor_prompts": [ANCHOR], "steps": 2,
        "lr": 1e-3, "num_anchor_images": 1, "sample_steps": 2, "cache_dir": str(tmp_path / "cache"), "batch_size": 1,
    }  # fmt: skip
    values.update(overrides)
    return erase.make_config("ca", **values)


def captured_loss(pipe, config):
    """The loss function CA hands to the training loop, captured instead of trained."""
    params = select(pipe.unet, config.parameter_set())
    ctx = RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                     PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip
    return ca.make_loss(ctx)


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def fixed_draws(monkeypatch, count: int):
    """Make CA's noising return fixed (x_t, t, ε) triples, in order; returns them."""
    g = torch.Generator().manual_seed(123)
    draws = [(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([100 + 300 * i]), torch.randn(1, 4, 8, 8, generator=g))
             for i in range(count)]  # fmt: skip
    calls = iter(draws)
    monkeypatch.setattr(ca, "noised", lambda scheduler, latents, generator: next(calls))
    return draws


@pytest.mark.parametrize("loss", ["model", "noise"])
@pytest.mark.parametrize("prior", [False, True])
def test_loss_equals_formula_by_hand(tmp_path, monkeypatch, loss, prior):
    pipe = fresh_pipe()
    config = small_ca(tmp_path, loss=loss, prior_preservation=prior, prior_weight=0.7)
    loss_fn = captured_loss(pipe, config)
    draws = fixed_draws(monkeypatch, 2 if prior else 1)
    unet = pipe.unet
    unet.requires_grad_(False)
    key = next(p for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    key.requires_grad_(True)

    value = loss_fn(unet, [torch.Generator().manual_seed(0)])
    (grad,) = torch.autograd.grad(value, [key])

    (x_t, t, noise) = draws[0]
    prediction = unet(x_t, t, encoder_hidden_states=embed(pipe, TARGET)).sample
    if loss == "model":  # the model being trained, without gradient
        target = unet(x_t, t, encoder_hidden_states=embed(pipe, ANCHOR)).sample.detach()
    else:
        target = noise
    expected = ((prediction - target) ** 2).mean()
    if prior:
        px_t, pt, pnoise = draws[1]
        expected = (
            expected + 0.7 * ((unet(px_t, pt, encoder_hidden_states=embed(pipe, ANCHOR)).sample - pnoise) ** 2).mean()
        )
    (expected_grad,) = torch.autograd.grad(expected, [key])
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_target_prompts_and_pairing(tmp_path):
    config = small_ca(tmp_path, concepts=["grumpy cat"], anchors=["cat"], anchor_prompts=["A Cat on a mat", "a cat"])
    assert config.target_prompt("A Cat on a mat", 0) == "A grumpy cat on a mat"
    style = small_ca(tmp_path, concepts=["Van Gogh"], anchors=["painting"], prompt_mode="style",
                     anchor_prompts=["a painting of a cat."])  # fmt: skip
    assert style.target_prompt("a painting of a cat.", 0, 0) == "a painting of a cat, in Van Gogh style"
    assert style.target_prompt("a painting of a cat.", 0, 1) == "In Van Gogh style, a painting of a cat"
    two = small_ca(tmp_path, concepts=["van gogh", "monet"], anchors=["painting", "photo"],
                   anchor_prompts=["a painting", "a photo", "a photo of a painting"])  # fmt: skip
    assert two.pairs() == [[0], [1], [0, 1]]
    assert small_ca(tmp_path, anchor_prompts=None).prompts() == ["painting"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anchor_prompts": ["a photo of a dog"]}, "contains none of the anchors"),
        ({"anchors": ["a", "b"]}, "one per concept"),
        ({"anchors": []}, "anchors must be"),
        ({"concepts": [""]}, "concepts must be"),
        ({"loss": "l1"}, "loss 'l1'"),
        ({"prompt_mode": "append"}, "prompt_mode 'append'"),
        ({"params": "qkv"}, "parameter set 'qkv'"),
        ({"num_anchor_images": 0}, "num_anchor_images"),
        ({"prior_weight": -1.0}, "prior_weight"),
    ],
)
def test_bad_config_values_name_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_ca(tmp_path, **overrides)


def test_parameter_groups():
    base = {"concepts": ["x"], "anchors": ["y"]}
    assert erase.make_config("ca", **base).parameter_set() == "kv"
    pipe = fresh_pipe()
    for group, named in (("attention", "xattn"), ("full", "all"), ("kv", "kv")):  # the code's group names
        config = erase.make_config("ca", params=group, **base)
        assert set(select(pipe.unet, config.parameter_set())) == set(select(pipe.unet, named))


def test_anchor_images_are_generated_once_and_reused(tmp_path, monkeypatch):
    config = small_ca(tmp_path, num_anchor_images=3, anchor_prompts=[ANCHOR, "a painting of a dog"])
    first = erase.run(fresh_pipe(), config, progress=False)
    assert len(list((tmp_path / "cache").glob("*.png"))) == 3
    monkeypatch.setattr(type(fresh_pipe()), "__call__", lambda *a, **k: pytest.fail("anchor images regenerated"))
    again = erase.run(fresh_pipe(), config, progress=False)
    assert all(torch.equal(first.delta.tensors[k], again.delta.tensors[k]) for k in first.delta.tensors)
    assert set(first.delta.tensors) <= {f"unet.{n}" for n in select(fresh_pipe().unet, "kv")}


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path))
    assert cache_dir("ca") == tmp_path / "ca"
    assert cache_dir("ca", str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv("ERASEKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("ca") == tmp_path / "xdg" / "erasekit" / "ca"


@pytest.mark.parametrize("preset", list(ca.CAConfig.PRESETS))
def test_presets_build(preset):
    config = erase.make_config("ca", preset=preset, concepts=["Van Gogh"], anchors=["Photo"])
    assert config.preset == preset and config.lr > 0
