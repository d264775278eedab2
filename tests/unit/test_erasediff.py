"""EraseDiff: the outer objective L_retain + α(f − f̄) and its gradient match an independent computation, the inner
steps really run (on a copy) and f̄ is the forget loss after them, bad inputs fail clearly before anything is
written, and the presets are the released recipes."""

import copy
import math

import pytest
import torch

import erase
from erase.cli import main
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.methods import erasediff
from erase.params import select
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe


def small(image_sets, **overrides):
    forget, retain = image_sets
    values = {
        "forget_images": str(forget), "retain_images": str(retain), "forget_prompts": "a {object} in {style} style",
        "pseudo_prompts": "a photo of a {object}", "retain_prompts": "a {object} in {style} style", "steps": 2,
        "lr": 1e-3, "batch_size": 1,
    }  # fmt: skip
    values.update(overrides)
    return erase.make_config("erasediff", **values)


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0].detach()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean()


def hand_forget_after_steps(unet, names, x_t, t, c_f, c_p, steps: int, lr: float, optimizer: str) -> torch.Tensor:
    """f(θ^K) on a deep copy of the UNet: K steps on mean((e(x_t, c_f) − e(x_t, c'))²), the target recomputed by
    the copy under no_grad each step, with Adam on the copy's tensors or plain θ − lr·g written out."""
    twin = copy.deepcopy(unet)
    weights = [p for n, p in twin.named_parameters() if n in names]
    twin.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    adam = torch.optim.Adam(weights, lr=lr) if optimizer == "adam" else None
    for _ in range(steps):
        with torch.no_grad():
            target = twin(x_t, t, encoder_hidden_states=c_p).sample
        loss = mse(twin(x_t, t, encoder_hidden_states=c_f).sample, target)
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            if adam is None:
                for w, g in zip(weights, grads):
                    w -= lr * g
            else:
                for w, g in zip(weights, grads):
                    w.grad = g
                adam.step()
    with torch.no_grad():
        return mse(twin(x_t, t, encoder_hidden_states=c_f).sample, twin(x_t, t, encoder_hidden_states=c_p).sample)


def context(pipe, config) -> RunContext:
    params = select(pipe.unet, config.parameter_set())
    pipe.unet.requires_grad_(False)  # as the loop leaves it: only the trained set takes gradients
    for p in params.values():
        p.requires_grad_(True)
    return RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                      PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip


def test_outer_objective_and_gradient_equal_an_independent_computation(image_sets, monkeypatch):
    pipe = fresh_pipe()
    alpha = 10.0  # large, so that the forget term weighs in the gradient as much as the retain term here
    config = small(image_sets, alpha=alpha, inner_steps=2, inner_lr=3e-3)
    ctx = context(pipe, config)
    loss_fn = erasediff.make_loss(ctx)
    g = torch.Generator().manual_seed(9)
    draws = [(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([t]), torch.randn(1, 4, 8, 8, generator=g))
             for t in (300, 700)]  # fmt: skip
    calls = iter(draws)  # the forget draw, then the retain draw
    monkeypatch.setattr(erasediff, "noised", lambda scheduler, latents, generator: next(calls))
    before = {n: p.detach().clone() for n, p in ctx.params.items()}
    value = loss_fn(pipe.unet, [torch.Generator().manual_seed(0)])
    assert all(torch.equal(p, before[n]) for n, p in ctx.params.items()), "the inner steps moved the live weights"

    (x_t, t, _), (r_x, r_t, r_noise) = draws
    c_f, c_p = embed(pipe, "a Cats in Van Gogh style"), embed(pipe, "a photo of a Cats")
    c_r = embed(pipe, "a Dogs in Monet style")
    f_bar = hand_forget_after_steps(pipe.unet, set(ctx.params), x_t, t, c_f, c_p, 2, 3e-3, "adam")
    with torch.no_grad():
        target = pipe.unet(x_t, t, encoder_hidden_states=c_p).sample
    prediction = pipe.unet(x_t, t, encoder_hidden_states=c_f).sample
    forget = mse(prediction, target)
    retain = mse(pipe.unet(r_x, r_t, encoder_hidden_states=c_r).sample, r_noise)
    expected = retain + alpha * (forget - f_bar)
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    # The comparison can fail: without f̄ (no inner steps) the value would be off by far more than the tolerance.
    assert alpha * (forget - f_bar).item() > 100 * (1e-5 * expected.item() + 1e-7)

    names = [n for n in ctx.params if ".attn2.to_k." in n][:1] + [n for n in ctx.params if ".attn2.to_out." in n][:1]
    tensors = [ctx.params[n] for n in names]
    ours = torch.autograd.grad(value, tensors)
    hand = torch.autograd.grad(expected, tensors, retain_graph=True)
    # A target that is not stop-gradient would give another gradient (so the check below can tell).
    live_target = pipe.unet(x_t, t, encoder_hidden_states=c_p).sample
    no_sg = torch.autograd.grad(retain + alpha * (mse(prediction, live_target) - f_bar), tensors)
    for a, b, c, name in zip(ours, hand, no_sg, names):
        scale = float(b.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)
        assert float((c - b).abs().max()) > 100 * 1e-4 * scale, name


@pytest.mark.parametrize("optimizer, lr", [("adam", 3e-3), ("sgd", 5.0)])
def test_inner_steps_run_on_a_copy_and_forget_bar_is_the_loss_after_them(optimizer, lr):
    pipe = fresh_pipe()
    params = select(pipe.unet, "xattn")
    before = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    c_f = torch.cat([embed(pipe, "a van gogh painting of a cat")] * 2)
    c_p = torch.cat([embed(pipe, "a photo of a cat")] * 2)

    def ours(steps: int) -> torch.Tensor:
        return erasediff.forget_after_inner_steps(pipe.unet, params, x_t, t, c_f, c_p, steps=steps, lr=lr,
                                                  optimizer=optimizer)  # fmt: skip

    f_bar = ours(2)
    assert not f_bar.requires_grad
    hand = hand_forget_after_steps(pipe.unet, set(params), x_t, t, c_f, c_p, 2, lr, optimizer)
    torch.testing.assert_close(f_bar, hand, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        f_0 = erasediff.relabel_loss(pipe.unet, x_t, t, c_f, c_p)
    f_1 = ours(1)
    assert f_bar < f_1 < f_0, (float(f_0), float(f_1), float(f_bar))  # each inner step lowers f: they happen
    assert f_1 < 0.9 * f_0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in params.items()), "live weights touched"


BAD_INPUTS = [  # (field values, error, its whole message; {tmp} is the test's folder)
    ({"inner_steps": 0}, ValueError, "inner_steps (K) must be an integer >= 1, got 0"),
    ({"inner_steps": -2}, ValueError, "inner_steps (K) must be an integer >= 1, got -2"),
    ({"inner_steps": 1.5}, ValueError, "inner_steps must be an integer, got 1.5"),
    ({"inner_steps": True}, ValueError, "inner_steps must be an integer, got True"),
    ({"alpha": -0.1}, ValueError, "alpha must be a number >= 0, got -0.1"),
    ({"alpha": math.nan}, ValueError, "alpha must be a finite number, got nan"),
    ({"inner_lr": 0.0}, ValueError, "inner_lr must be a positive number or None (the training lr), got 0.0"),
    ({"inner_optimizer": "rmsprop"}, ValueError, "inner_optimizer 'rmsprop' is not one of adam, sgd"),
    ({"epochs": 0}, ValueError, "epochs must be a positive integer or None, got 0"),
    ({"forget_images": None}, ValueError, "forget_images must name a folder or image files, got None"),
    ({"forget_images": []}, ValueError, "forget_images must name a folder or image files, got []"),
    (
        {"forget_images": "{tmp}/missing"},
        FileNotFoundError,
        "forget_images: image source '{tmp}/missing' does not exist",
    ),
    ({"retain_images": None}, ValueError, "retain_images must name a folder or image files, got None"),
    (
        {"retain_images": ["{tmp}/nope.png"]},
        FileNotFoundError,
        "retain_images: image source '{tmp}/nope.png' does not exist",
    ),
    (
        {"retain_images": "{tmp}/empty"},
        FileNotFoundError,
        "retain_images: no images (.jpg, .jpeg, .png, .webp, .bmp) in '{tmp}/empty'",
    ),
    (
        {"pseudo_prompts": ["a", "b"]},
        ValueError,
        "pseudo_prompts: give one template or one prompt per image (3 images), got 2 prompts",
    ),
    (
        {"retain_prompts": "a {thing}"},
        ValueError,
        "retain_prompts template 'a {thing}': only {object} and {style} can be filled",
    ),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS, ids=[m[:24] for _, _, m in BAD_INPUTS])
def test_bad_inputs_each_give_one_clear_error(image_sets, tmp_path, overrides, error, message):
    (tmp_path / "empty").mkdir()

    def at_tmp(value):
        if isinstance(value, list):
            return [at_tmp(v) for v in value]
        return value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value

    with pytest.raises(error) as raised:
        small(image_sets, **{k: at_tmp(v) for k, v in overrides.items()})
    assert str(raised.value) == at_tmp(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "forget", "retain"]  # nothing written


def test_bad_input_from_the_cli_is_one_line_and_writes_nothing(image_sets, tmp_path, capsys):
    forget, retain = image_sets
    out = tmp_path / "out"
    given = ["--set", f"forget_images={forget}", "--set", f"retain_images={retain}", "--no-progress"]
    for bad, fragment in ((["--set", "inner_steps=0"], "inner_steps (K) must be an integer >= 1"),
                          (["--set", "alpha=-1"], "alpha must be a number >= 0"),
                          (["--set", f"retain_images={tmp_path}/none"], "retain_images: image source")):  # fmt: skip
        code = main(["run", "erasediff", "--model", "toy", "--out", str(out), *given, *bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget", "retain"]


def test_cli_runs_erasediff(image_sets, tmp_path, capsys):
    """`erase run erasediff` goes through the registry like every method (a saved tiny pipeline, 2 steps)."""
    from tests.unit.helpers import save_tiny

    model = save_tiny(tmp_path / "model")
    forget, retain = image_sets
    out = tmp_path / "out"
    argv = ["run", "erasediff", "--model", str(model), "--out", str(out), "--no-progress", "--set", "steps=2",
            "--set", f"forget_images={forget}", "--set", f"retain_images={retain}", "--set", "batch_size=1",
            "--set", "pseudo_prompts=a photo", "--set", "forget_prompts=a van gogh painting",
            "--set", "retain_prompts=a photo of a dog"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"delta.safetensors", "delta.json", "record.json", "README.md"}
    assert "erasediff: 2 steps" in capsys.readouterr().out


def test_epochs_give_the_outer_steps(image_sets):
    assert small(image_sets, steps=None, epochs=3, batch_size=2).steps == 3 * 2  # 3 forget images: 2 batches
    assert small(image_sets, steps=None, epochs=None).steps == erasediff.EraseDiffConfig.DEFAULT_STEPS
    given = small(image_sets, steps=7, epochs=3)  # given steps win, as a bench override over a preset
    assert (given.steps, given.epochs) == (7, None)


def preset(image_sets, name: str):
    forget, retain = image_sets
    return erase.make_config("erasediff", preset=name, forget_images=str(forget), retain_images=str(retain))


def test_paper_preset_is_the_authors_released_recipe(image_sets):
    config = preset(image_sets, "paper")
    # JingWu321/EraseDiff sd/train_scripts/train_nsfw.sh:4 (and sd/README.md:28): erasediff_nsfw.py
    # --train_method 'noxattn' --epochs 5 --K_steps 2 --lambda_bome 1. --lr 1e-5 --batch_size 16;
    # erasediff_nsfw.py:128 torch.optim.Adam, :139 word_wear "a photo of a pokemon"; :89-91 noxattn skips
    # out.*, attn2 and time_embed (our esd-u).
    assert (config.epochs, config.inner_steps, config.alpha, config.lr, config.batch_size) == (5, 2, 1.0, 1e-5, 16)
    assert (config.optimizer, config.inner_optimizer, config.inner_lr, config.weight_decay) == ("adam", "adam", None, 0)
    assert config.parameter_set() == "esd-u" and config.pseudo_prompts == "a photo of a pokemon"
    assert config.mixed_precision == "no" and config.steps == 5 * 1  # 3 forget images: one batch of 16 per epoch
    names = set(select(fresh_pipe().unet, "esd-u"))
    assert names and not any(n.startswith(("time_embedding.", "conv_norm_out.", "conv_out.")) or ".attn2." in n
                             for n in names)  # fmt: skip


@pytest.mark.parametrize("kind", ["style", "object"])
def test_unlearncanvas_presets_are_the_benchmarks_recipe(image_sets, kind):
    config = preset(image_sets, f"unlearncanvas-{kind}")
    # UnlearnCanvas machine_unlearning/mu_erase_diff_ediff/train-erase.py:41-43 style_removal(alpha=0.1,
    # batch_size=4, epochs=5, lr=5e-5), :91 Adam, :215 train_method default xattn, :217-218 alpha 0.1 / epochs 5,
    # :225 K_steps 2; generate_dataset.py:15, :28, :46 the prompts.
    assert (config.epochs, config.inner_steps, config.alpha, config.lr, config.batch_size) == (5, 2, 0.1, 5e-5, 4)
    assert (config.optimizer, config.inner_optimizer, config.inner_lr, config.parameter_set()) == (
        "adam", "adam", None, "xattn")  # fmt: skip
    assert config.forget_prompts == "A {object} image in {style} style."
    if kind == "style":  # retain = Seed_Images, "A {object} image in Photo style.", also the pseudo prompts
        assert config.retain_prompts == config.pseudo_prompts == "A {object} image in Photo style."
    else:
        assert config.retain_prompts == "A {object} image in {style} style."


def test_benchmark_inputs_follow_the_recipes_data(tmp_path):
    """UnlearnCanvas: style forget = the style's images 1-3 (60: 15 batches of 4), retain = the photo class's images
    1-3 in the same order, pseudo prompt k = retain prompt k; object forget = the object's images 1-3 in every theme
    (153), retain = the next object's. The toy: the target's images, relabelled photo / next object, every other
    image retained. No mask prompts (SalUn's)."""
    from canvas.method_inputs import method_inputs
    from erase.catalog import get

    cat = get("unlearncanvas-50")
    style = method_inputs("erasediff", cat, "Pop_Art", tmp_path)
    assert len(style["forget_images"]) == 60 == len(style["retain_images"]) and "mask_prompts" not in style
    assert all("/Pop_Art/" in f for f in style["forget_images"])
    assert [f.replace("/Seed_Images/", "/Pop_Art/") for f in style["retain_images"]] == style["forget_images"]
    assert style["pseudo_prompts"] == style["retain_prompts"]
    assert style["forget_prompts"][0] == "A Architectures image in Pop Art style."
    assert style["pseudo_prompts"][0] == "A Architectures image in Photo style."
    obj = method_inputs("erasediff", cat, "Cats", tmp_path)
    assert len(obj["forget_images"]) == 51 * 3 == len(obj["retain_images"])
    assert [f.replace("/Dogs/", "/Cats/") for f in obj["retain_images"]] == obj["forget_images"]
    assert obj["pseudo_prompts"] == obj["retain_prompts"] and obj["pseudo_prompts"][0] == (
        "A Dogs image in Abstractionism style.")  # fmt: skip
    toy = get("toy")
    style = method_inputs("erasediff", toy, "Pop_Art", tmp_path)
    assert all("/Pop_Art/" in f for f in style["forget_images"])
    assert not any("/Pop_Art/" in f for f in style["retain_images"])
    assert all(p.endswith("in Photo style.") for p in style["pseudo_prompts"])
    obj = method_inputs("erasediff", toy, "Cats", tmp_path)
    assert all("image" in p and "Cats" not in p for p in obj["pseudo_prompts"])


@pytest.mark.parametrize("name", list(erasediff.EraseDiffConfig.PRESETS))
def test_presets_build(image_sets, name):
    config = preset(image_sets, name)
    assert config.preset == name and config.steps >= 1
