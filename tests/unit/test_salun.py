"""SalUn: the saliency mask has exactly the requested fraction of the largest gradients, weights outside it stay
bit-identical through training, the relabelling loss matches its formula, and bad inputs fail clearly."""

import re
import warnings

import pytest
import torch

import erase
from erase import relabel
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.images import diffusion_loss, encode_latents, image_prompts, image_size, load_images
from erase.methods import salun
from erase.params import select
from erase.sampling import sample_seed
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe


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
    monkeypatch.setattr(relabel, "noised", lambda scheduler, latents, generator: next(calls))
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
    assert image_prompts("p", "A {object} image in {style} style.", files) == ["A Cats image in Van Gogh style."] * 3
    assert image_prompts("p", ["x", "y", "z"], files) == ["x", "y", "z"]


def _embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0].detach()


def _hand_guided_loss(unet, scheduler, latents, emb, null, guidance, generator):
    """−mean((ε − ((1+g)·e(x_t, c) − g·e(x_t, ∅)))²), two separate UNet calls on one x_t (generate_mask.py:50-62)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    x_t = scheduler.add_noise(latents, noise, t)
    cond = unet(x_t, t, encoder_hidden_states=emb).sample
    uncond = unet(x_t, t, encoder_hidden_states=null.expand_as(emb)).sample
    return -((noise - ((1 + guidance) * cond - guidance * uncond)) ** 2).mean()


def test_guided_mask_loss_gradient_equals_an_independent_computation(image_sets):
    pipe = fresh_pipe()
    latents = encode_latents(pipe.vae, load_images(image_sets[0], image_size(pipe)))[:2]
    emb, null = torch.cat([_embed(pipe, "a cat")] * 2), _embed(pipe, "")
    weights = list(pipe.unet.parameters())
    ours = salun.guided_mask_loss(pipe.unet, pipe.scheduler, latents, emb, null.expand_as(emb), 7.5,
                                  torch.Generator().manual_seed(4))  # fmt: skip
    hand = _hand_guided_loss(pipe.unet, pipe.scheduler, latents, emb, null, 7.5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, weights, allow_unused=True),
                    torch.autograd.grad(hand, weights, allow_unused=True)):  # fmt: skip
        if a is None or b is None:
            assert a is None and b is None
        else:
            # float32 sums in another order (one batched call vs two), amplified by 1 + g
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    # g = 0 is minus the plain diffusion loss: the guidance is what changes the ranking.
    plain = diffusion_loss(pipe.unet, pipe.scheduler, latents, emb, torch.Generator().manual_seed(4))
    g0 = salun.guided_mask_loss(pipe.unet, pipe.scheduler, latents, emb, null.expand_as(emb), 0.0,
                                torch.Generator().manual_seed(4))  # fmt: skip
    torch.testing.assert_close(g0, -plain, rtol=1e-5, atol=1e-6)


def test_guided_mask_ranks_the_whole_unet_and_keeps_the_trained_sets_share(image_sets):
    """make_loss's mask (guided, mask_scope "unet", params xattn): the top fraction of |Σ ∇| over every UNet weight,
    computed by hand with the mask prompts and ∅, restricted to the trained attn2 weights."""
    pipe = fresh_pipe()
    config = small_salun(image_sets, params="xattn", mask_fraction=0.3, mask_prompts="an {object} thing")
    params = select(pipe.unet, "xattn")
    ctx = RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                     PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip
    salun.make_loss(ctx)
    assert set(ctx.grad_masks) == set(params)

    everything = dict(pipe.unet.named_parameters())
    latents = encode_latents(pipe.vae, load_images(image_sets[0], image_size(pipe)))
    emb, null = torch.cat([_embed(pipe, "an Cats thing")] * 3), _embed(pipe, "")
    sums = {n: torch.zeros_like(p) for n, p in everything.items()}
    for b, start in enumerate((0, 2)):  # mask_batch_size 2 over 3 images
        g = torch.Generator().manual_seed(sample_seed(config.seed, "salun-mask", b))
        loss = _hand_guided_loss(pipe.unet, pipe.scheduler, latents[start : start + 2], emb[start : start + 2],
                                 null, 7.5, g)  # fmt: skip
        for name, grad in zip(everything, torch.autograd.grad(loss, list(everything.values()), allow_unused=True)):
            if grad is not None:
                sums[name] += grad
    magnitude = torch.cat([v.abs().reshape(-1) for v in sums.values()])
    threshold = magnitude.sort(descending=True).values[round(0.3 * magnitude.numel()) - 1]
    for name in params:
        expected = sums[name].abs() >= threshold
        assert torch.equal(ctx.grad_masks[name], expected), name
    share = sum(int(m.sum()) for m in ctx.grad_masks.values()) / sum(p.numel() for p in params.values())
    assert share != pytest.approx(0.3, abs=1e-3)  # the trained set's own share, not the ranked fraction


def test_diffusion_mask_loss_is_the_toy_presets_and_differs_from_the_guided(image_sets):
    pipe = fresh_pipe()
    params = select(pipe.unet, "all")
    latents = encode_latents(pipe.vae, load_images(image_sets[0], image_size(pipe)))
    emb = torch.cat([_embed(pipe, "a cat")] * 3)
    plain = salun.saliency_mask(pipe.unet, params, pipe.scheduler, latents, emb, 0.5, batch_size=2, seed=1)
    guided = salun.saliency_mask(pipe.unet, params, pipe.scheduler, latents, emb, 0.5, batch_size=2, seed=1,
                                 null_emb=_embed(pipe, ""), guidance=7.5)  # fmt: skip
    assert any(not torch.equal(plain[n], guided[n]) for n in params)
    forget, retain = image_sets
    toy = erase.make_config("salun", preset="toy", forget_images=str(forget), retain_images=str(retain))
    assert toy.mask_loss == "diffusion" and erase.make_config("salun", forget_images=str(forget),
                                                             retain_weight=0.0).mask_loss == "guided"  # fmt: skip


def test_epochs_give_the_steps_unless_steps_are_given(image_sets):
    # 3 forget images: ceil(3 / 2) = 2 batches per epoch.
    assert small_salun(image_sets, steps=None, epochs=3).steps == 6
    assert small_salun(image_sets, steps=None, epochs=None).steps == salun.SalUnConfig.DEFAULT_STEPS
    given = small_salun(image_sets, steps=7, epochs=3)  # given steps win, as a bench override over a preset
    assert (given.steps, given.epochs) == (7, None)
    with pytest.raises(ValueError, match="epochs must be a positive integer or None, got 0"):
        small_salun(image_sets, epochs=0)
    with pytest.raises(ValueError, match="mask_loss 'ga' is not one of guided, diffusion"):
        small_salun(image_sets, mask_loss="ga")
    with pytest.raises(ValueError, match="mask_scope 'all' is not one of unet, params"):
        small_salun(image_sets, mask_scope="all")


def _preset(image_sets, name):
    forget, retain = image_sets
    return erase.make_config("salun", preset=name, forget_images=str(forget), retain_images=str(retain))


def test_paper_preset_is_the_released_recipe(image_sets):
    config = _preset(image_sets, "paper")
    # OPTML-Group/Unlearn-Saliency SD/README.md: random_label.py --train_method full --alpha 0.5 --lr 1e-5
    # --epochs 5; random_label.py: Adam, batch 8 (--batch_size default); generate_mask.py: c_guidance 7.5,
    # batch 8, threshold 0.5, the gradient of every UNet weight.
    assert (config.epochs, config.lr, config.batch_size, config.optimizer, config.weight_decay) == (
        5, 1e-5, 8, "adam", 0.0)  # fmt: skip
    assert (config.retain_weight, config.mask_fraction, config.mask_batch_size) == (0.5, 0.5, 8)
    assert (config.mask_loss, config.mask_guidance, config.mask_scope, config.parameter_set()) == (
        "guided", 7.5, "unet", "all")  # fmt: skip
    assert config.steps == 5 * 1  # 3 forget images here: one batch of 8 per epoch


@pytest.mark.parametrize("kind", ["style", "object"])
def test_unlearncanvas_presets_are_the_benchmarks_recipe(image_sets, kind):
    config = _preset(image_sets, f"unlearncanvas-{kind}")
    # UnlearnCanvas machine_unlearning/mu_saliency_unlearn_salun/train-erase.py:144-153 (--train_method xattn,
    # --alpha 1.0, --epochs 2, --threshold 0.4), :13 style_removal(batch_size=4, lr=1e-5), :63 Adam;
    # generate_mask.py:128-136 (c_guidance 7.5, batch 4, threshold 0.4), :143 prompt f"An image in {theme} Style.".
    assert (config.epochs, config.lr, config.batch_size, config.optimizer, config.retain_weight) == (
        2, 1e-5, 4, "adam", 1.0)  # fmt: skip
    assert (config.mask_fraction, config.mask_batch_size, config.mask_loss, config.mask_guidance) == (
        0.4, 4, "guided", 7.5)  # fmt: skip
    assert config.parameter_set() == "xattn" and config.mask_scope == "unet"
    assert config.mask_prompts == ("An image in {style} Style." if kind == "style" else "An image in {object} Style.")
    if kind == "style":  # generate_dataset.py:28: the Seed_Images retain prompts, which are the pseudo prompts
        assert config.retain_prompts == config.pseudo_prompts == "A {object} image in Photo style."


def test_unlearncanvas_inputs_follow_the_benchmarks_data(tmp_path):
    """On the benchmark's catalog: style retain = the photo class's images 1-3 (generate_dataset.py:22-33), object
    retain = the next object's images 1-3 in every theme (scripts/run_class_scripts_1.py), forget image k's pseudo
    prompt = retain prompt k; 15 batches of 4 per style epoch. The toy catalog keeps every other image as retain."""
    from canvas.method_inputs import method_inputs
    from erase.catalog import get

    cat = get("unlearncanvas-50")
    style = method_inputs("salun", cat, "Pop_Art", tmp_path)
    assert len(style["forget_images"]) == 60 == len(style["retain_images"])
    assert all("/Seed_Images/" in f for f in style["retain_images"])
    assert style["pseudo_prompts"] == style["retain_prompts"]
    assert style["retain_prompts"][0] == "A Architectures image in Photo style."
    assert style["mask_prompts"] == "An image in Pop_Art Style."
    obj = method_inputs("salun", cat, "Cats", tmp_path)
    assert len(obj["forget_images"]) == 51 * 3 == len(obj["retain_images"])
    assert all("/Dogs/" in f for f in obj["retain_images"]) and obj["pseudo_prompts"] == obj["retain_prompts"]
    assert [f.replace("/Dogs/", "/Cats/") for f in obj["retain_images"]] == obj["forget_images"]
    toy = method_inputs("salun", get("toy"), "Pop_Art", tmp_path)
    assert "mask_prompts" not in toy and any("/Pop_Art/" not in f for f in toy["retain_images"])
    assert not any("/Seed_Images/" in f for f in toy["forget_images"])


@pytest.mark.parametrize("preset", list(salun.SalUnConfig.PRESETS))
def test_presets_build(image_sets, preset):
    config = _preset(image_sets, preset)
    assert config.preset == preset and config.steps >= 1
