"""SalUn: the saliency mask has exactly the requested fraction of the largest gradients, weights outside it stay
bit-identical through training, the relabelling loss matches its formula, and bad inputs fail clearly."""

import re
import warnings

import pytest
import torch
from PIL import Image

import erase
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.images import diffusion_loss, encode_latents, image_size, load_images
from erase.methods import salun
from erase.params import select
from erase.sampling import sample_seed
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe


def write_images(folder, count: int = 2, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(
            folder / f"{i}.png"
        )
    return folder


@pytest.fixture
def image_sets(tmp_path):
    write_images(tmp_path / "forget" / "Van_Gogh" / "Cats", 3)
    write_images(tmp_path / "retain" / "Monet" / "Dogs", 2, seed=10)
    return tmp_path / "forget", tmp_path / "retain"


def small_salun(image_sets, **overrides):
    forget, retain = image_sets
    values = {
        "forget_images": str(forget), "retain_images": str(retain), "forget_prompts": "a {object} in {style} style",
        "pseudo_prompts": "a photo of a {object}", "retain_prompts": "a {object} in {style} style", "steps": 3,
        "lr": 1e-3, "batch_size": 2, "mask_batch_size": 2,
    }  # fmt: skip
    values.update(overrides)
    return erase.make_config("salun", **values)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.013, 1.0])
def test_mask_has_the_requested_fraction_of_the_largest_gradients(image_sets, fraction):
    pipe = fresh_pipe()
    params = select(pipe.unet, "all")
    latents = encode_latents(pipe.vae, load_images(image_sets[0], image_size(pipe)))
    emb = pipe.text_encoder(pipe.tokenizer(["a cat"] * 3, padding="max_length", return_tensors="pt").input_ids)[0]
    emb = emb.detach()
    masks = salun.saliency_mask(pipe.unet, params, pipe.scheduler, latents, emb, fraction, batch_size=2, seed=5)
    total = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(fraction * total)
    # Independently: the gradient summed over the same two batches, ranked by magnitude.
    pipe.unet.requires_grad_(True)
    grads = [torch.zeros_like(p) for p in params.values()]
    for b, start in enumerate((0, 2)):
        g = torch.Generator().manual_seed(sample_seed(5, "salun-mask", b))
        loss = diffusion_loss(pipe.unet, pipe.scheduler, latents[start : start + 2], emb[start : start + 2], g)
        for acc, grad in zip(grads, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if grad is not None:
                acc += grad
    magnitude = torch.cat([g.abs().reshape(-1) for g in grads])
    chosen = torch.cat([m.reshape(-1) for m in masks.values()])
    if fraction < 1:
        assert magnitude[chosen].min() >= magnitude[~chosen].max()


@pytest.mark.parametrize("training", [{}, {"optimizer": "adamw", "max_grad_norm": 0.5}, {"retain_weight": 0.0}])
def test_weights_outside_the_mask_are_bit_identical_after_training(image_sets, monkeypatch, training):
    captured = {}
    original_mask = salun.saliency_mask

    def spy(*args, **kwargs):
        captured.update(original_mask(*args, **kwargs))
        return captured

    monkeypatch.setattr(salun, "saliency_mask", spy)
    pipe = fresh_pipe()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SalUn")  # the safety net must not have had to restore anything
        result = erase.run(pipe, small_salun(image_sets, **training), progress=False)
    moved_inside = 0
    for name, p in pipe.unet.named_parameters():
        mask = captured[name]
        assert torch.equal(p[~mask], before[name][~mask]), name
        moved_inside += int((p[mask] != before[name][mask]).sum())
        assert not p._backward_hooks, f"gradient hook left on {name}"
    assert moved_inside > 0 and result.record["changed_tensors"] > 0


def test_relabelling_loss_equals_formula(image_sets, monkeypatch):
    pipe = fresh_pipe()
    config = small_salun(image_sets, retain_weight=0.3)
    params = select(pipe.unet, config.parameter_set())
    ctx = RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                     PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip
    loss_fn = salun.make_loss(ctx)
    g = torch.Generator().manual_seed(9)
    draws = [(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([t]), torch.randn(1, 4, 8, 8, generator=g))
             for t in (50, 700)]  # fmt: skip
    calls = iter(draws)
    monkeypatch.setattr(salun, "noised", lambda scheduler, latents, generator: next(calls))
    value = loss_fn(pipe.unet, [torch.Generator().manual_seed(0)])

    def embed(prompt):
        ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        (x_t, t, _), (r_x, r_t, r_noise) = draws
        forget = pipe.unet(x_t, t, encoder_hidden_states=embed("a Cats in Van Gogh style")).sample
        pseudo = pipe.unet(x_t, t, encoder_hidden_states=embed("a photo of a Cats")).sample
        retain = pipe.unet(r_x, r_t, encoder_hidden_states=embed("a Dogs in Monet style")).sample
        expected = ((forget - pseudo) ** 2).mean() + 0.3 * ((retain - r_noise) ** 2).mean()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, True, "half"])
def test_mask_fraction_outside_range_is_refused(image_sets, fraction):
    with pytest.raises(ValueError, match=f"mask_fraction must be .*, got {re.escape(repr(fraction))}"):
        small_salun(image_sets, mask_fraction=fraction)


def test_bad_image_sets_are_refused(image_sets, tmp_path):
    with pytest.raises(FileNotFoundError, match="forget_images: .*missing' does not exist"):
        small_salun(image_sets, forget_images=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="retain_images: no images"):
        small_salun(image_sets, retain_images=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="retain_images is required when retain_weight > 0"):
        small_salun(image_sets, retain_images=None)
    with pytest.raises(ValueError, match="retain_images is required"):
        small_salun(image_sets, retain_images=[])
    with pytest.raises(ValueError, match="forget_images must name"):
        small_salun(image_sets, forget_images=None)
    assert small_salun(image_sets, retain_images=None, retain_weight=0.0).retain_images is None
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        small_salun(image_sets, weight_decay=0.01)
    with pytest.raises(ValueError, match="one prompt per image \\(3 images\\), got 2"):
        small_salun(image_sets, forget_prompts=["a", "b"])
    with pytest.raises(ValueError, match="only {object} and {style}"):
        small_salun(image_sets, pseudo_prompts="a {thing}")


def test_prompts_per_image_from_folders(image_sets):
    files = sorted((image_sets[0] / "Van_Gogh" / "Cats").glob("*.png"))
    assert salun._prompts("p", "A {object} image in {style} style.", files) == ["A Cats image in Van Gogh style."] * 3
    assert salun._prompts("p", ["x", "y", "z"], files) == ["x", "y", "z"]


@pytest.mark.parametrize("preset", list(salun.SalUnConfig.PRESETS))
def test_presets_build(image_sets, preset):
    forget, retain = image_sets
    config = erase.make_config("salun", preset=preset, forget_images=str(forget), retain_images=str(retain))
    assert config.preset == preset and config.parameter_set() == "all" and config.mask_fraction == 0.5
