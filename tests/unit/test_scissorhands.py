"""Scissorhands: the trimmed weights are exactly the top fraction of connection sensitivity, re-initialised as the
mode says with every other weight bit-identical; the projection leaves no negative product with any memory (and
passes a gradient that has none unchanged); the repair loss matches its formula; bad inputs fail clearly; the
presets are the released recipes."""

import itertools
import math
import re

import pytest
import torch

import erase
from erase import relabel
from erase.cli import main
from erase.context import RunContext
from erase.convert import unet_key
from erase.frozen import FrozenOriginal
from erase.images import encode_latents, image_size, load_images
from erase.methods import scissorhands as shs
from erase.params import select
from erase.projection import ConeProjection, dot, project_to_cone
from erase.sampling import sample_seed
from erase.testing import sd_shaped_pipeline
from erase.text import PromptEncoder
from erase.train import TrainSettings, train
from tests.unit.helpers import fresh_pipe, save_tiny


def small_shs(image_sets, **overrides):
    forget, retain = image_sets
    values = {
        "forget_images": str(forget), "retain_images": str(retain), "forget_prompts": "a {object} in {style} style",
        "pseudo_prompts": "a photo of a {object}", "retain_prompts": "a {object} in {style} style", "steps": 3,
        "lr": 1e-3, "batch_size": 2, "mask_batch_size": 2, "sparsity": 0.1,
    }  # fmt: skip
    values.update(overrides)
    return erase.make_config("scissorhands", **values)


def context(pipe, config) -> RunContext:
    params = select(pipe.unet, config.parameter_set())
    return RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                      PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0].detach()


def test_batches_run_over_the_forget_set_in_order_and_cycle():
    assert shs.cyclic_batches(3, 2, 3) == [slice(0, 2), slice(2, 3), slice(0, 2)]
    assert shs.cyclic_batches(60, 4, 1) == [slice(0, 4)]  # UnlearnCanvas: one batch of 4 (--prune_num 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.1, 0.013, 0.9])
def test_trimmed_weights_are_exactly_the_top_fraction_of_connection_sensitivity(image_sets, sparsity):
    pipe = fresh_pipe()
    params = select(pipe.unet, "all")
    latents = encode_latents(pipe.vae, load_images(image_sets[0], image_size(pipe)))
    emb = torch.cat([embed(pipe, "a cat")] * 3)
    batches = shs.cyclic_batches(3, 2, 3)  # the first batch twice, with fresh noise: |g| sums, not g
    scores = shs.connection_sensitivity(pipe.unet, params, pipe.scheduler, latents, emb, batches, seed=5)
    chosen = shs.top_fraction(scores, sparsity)
    total = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in chosen.values()) == round(sparsity * total)
    # Independently: |Σ_b |∇ diffusion loss of batch b| · w|, t and ε drawn by hand from the same seeds.
    pipe.unet.requires_grad_(True)
    sums = [torch.zeros_like(p) for p in params.values()]
    for b, rows in enumerate(batches):
        g = torch.Generator().manual_seed(sample_seed(5, "shs-mask", b))
        x = latents[rows]
        t = torch.randint(0, 1000, (x.shape[0],), generator=g)
        noise = torch.randn(x.shape, generator=g)
        out = pipe.unet(pipe.scheduler.add_noise(x, noise, t), t, encoder_hidden_states=emb[rows]).sample
        for acc, grad in zip(sums, torch.autograd.grad(((out - noise) ** 2).mean(), list(params.values()),
                                                       allow_unused=True)):  # fmt: skip
            if grad is not None:
                acc += grad.abs()
    hand = torch.cat([(s * p.detach()).abs().reshape(-1) for s, p in zip(sums, params.values())])
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in scores.values()]), hand, rtol=1e-4, atol=1e-9)
    mask = torch.cat([m.reshape(-1) for m in chosen.values()])
    assert hand[mask].min() >= hand[~mask].max()


def trimmed(image_sets, monkeypatch, **overrides):
    """(pipe after make_loss, the original UNet weights, the chosen masks) for a config."""
    captured = {}
    original = shs.top_fraction

    def spy(scores, fraction):
        captured.update(original(scores, fraction))
        return captured

    monkeypatch.setattr(shs, "top_fraction", spy)
    pipe = fresh_pipe()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    shs.make_loss(context(pipe, small_shs(image_sets, **overrides)))
    return pipe, before, captured


@pytest.mark.parametrize("mode", ["zeros", "trunc_normal", "kaiming_uniform"])
def test_reinitialisation_changes_exactly_the_chosen_weights_of_the_reinit_set(image_sets, monkeypatch, mode):
    # Ranked over the whole UNet, trained everywhere, re-initialised in attn2 only: UnlearnCanvas's layout.
    overrides = {"reinit": mode, "reinit_std": 1.0, "reinit_bound": 0.5, "reinit_params": "xattn", "sparsity": 0.3}
    pipe, before, chosen = trimmed(image_sets, monkeypatch, **overrides)
    reinit_set = set(select(pipe.unet, "xattn"))
    assert set(chosen) == set(before)  # mask_scope "unet": every UNet weight was ranked
    reset = 0
    for name, p in pipe.unet.named_parameters():
        mask = chosen[name] if name in reinit_set else torch.zeros_like(chosen[name])
        assert torch.equal(p[~mask], before[name][~mask]), f"{name}: an unchosen weight moved"
        new = p[mask]
        reset += new.numel()
        if not new.numel():
            continue
        if mode == "zeros" or name.endswith("bias"):
            assert torch.equal(new, torch.zeros_like(new)), name
        elif mode == "trunc_normal":
            assert new.abs().max() <= 0.5 and not torch.equal(new, before[name][mask]), name
        else:
            assert new.abs().max() <= math.sqrt(6 / p.shape[1]), name
    assert reset > 0


def test_reinitialisation_is_deterministic_under_the_seed(image_sets, monkeypatch):
    first, _, chosen = trimmed(image_sets, monkeypatch, reinit_params="xattn", sparsity=0.3)
    second, _, _ = trimmed(image_sets, monkeypatch, reinit_params="xattn", sparsity=0.3)
    other, _, _ = trimmed(image_sets, monkeypatch, reinit_params="xattn", sparsity=0.3, seed=1)
    a, b, c = (dict(p.unet.named_parameters()) for p in (first, second, other))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_initial_values_are_the_named_distributions():
    g = torch.Generator().manual_seed(0)
    wide = shs.initial_values("w", (400, 400), "trunc_normal", 0.02, 2.0, g)  # the codes' std .02, cut at ±2
    assert wide.std().item() == pytest.approx(0.02, rel=0.02) and wide.abs().max() <= 2.0
    # Cut at ±1σ: a truncated normal has std √(1 − 2φ(1)/(2Φ(1) − 1)) ≈ 0.5396 (clamping would give ≈ 0.718).
    cut = shs.initial_values("w", (400, 400), "trunc_normal", 1.0, 1.0, g)
    assert cut.abs().max() <= 1.0 and cut.std().item() == pytest.approx(0.5396, rel=0.02)
    kaiming = shs.initial_values("w", (400, 100, 2, 2), "kaiming_uniform", 0.02, 2.0, g)  # fan-in 400
    bound = math.sqrt(6 / 400)
    assert kaiming.abs().max() <= bound and kaiming.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert not shs.initial_values("to_out.0.bias", (8,), "trunc_normal", 0.02, 2.0, g).any()


def random_grads(generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: scale * torch.randn(shape, generator=generator, dtype=torch.float64)
            for n, shape in (("a", (3, 2)), ("b", (4,)))}  # fmt: skip


def flat(grads) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in ("a", "b")])


def euclidean_projection(target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """argmin ‖z − target‖ subject to rows·z ≥ 0, by brute force over the cone's faces: for every subset of the
    constraints held as equalities, project onto that subspace; the nearest feasible one is the answer."""
    best = None
    for chosen in itertools.product([False, True], repeat=len(rows)):
        face = rows[list(chosen)]
        z = target - face.T @ torch.linalg.lstsq(face @ face.T, face @ target).solution if len(face) else target
        if bool((rows @ z >= -1e-9).all()) and (best is None or (z - target).norm() < (best - target).norm()):
            best = z
    return best


@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("count", [1, 3, 6])
def test_projection_leaves_no_negative_product_with_any_memory(margin, count):
    g = torch.Generator().manual_seed(count)
    projected_any = 0
    for _ in range(15):
        memories = [random_grads(g) for _ in range(count)]
        grad = random_grads(g, scale=3.0)
        products = [dot(grad, m) for m in memories]
        out = project_to_cone(grad, memories, margin)
        if min(products) >= 0:
            assert out is None  # nothing to project: the gradient is used unchanged
            continue
        projected_any += 1
        for m in memories:
            assert dot(out, m) >= -1e-10 * math.sqrt(dot(out, out) * dot(m, m))
        if margin == 0:  # the Euclidean projection of g onto {z: Mz ≥ 0}, by a general-purpose solver
            faces = euclidean_projection(flat(grad), torch.stack([flat(m) for m in memories]))
            torch.testing.assert_close(flat(out), faces, rtol=1e-9, atol=1e-9)
    assert projected_any > 3


def test_projection_hook_leaves_a_gradient_without_conflict_untouched():
    g = torch.Generator().manual_seed(0)
    memory = random_grads(g)
    param = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    param.grad = memory["a"].clone() * 2  # aligned with the memory: a positive product
    same = param.grad
    ConeProjection([{"p": memory["a"]}], margin=0.5)({"p": param}, step=0)
    assert param.grad is same and torch.equal(param.grad, memory["a"] * 2)
    param.grad = -memory["a"].clone()
    hook = ConeProjection([{"p": memory["a"]}], margin=0.0, every=2)
    hook({"p": param}, step=1)  # not a projection step
    assert torch.equal(param.grad, -memory["a"])
    hook({"p": param}, step=2)
    assert hook.projected_steps == [2] and dot({"p": param.grad}, {"p": memory["a"]}) >= -1e-12


def test_training_steps_on_the_projected_then_clipped_gradient(image_sets, monkeypatch):
    """With `project`, every optimizer step (project_every 1) receives a gradient with no negative product with any
    memory, clipped after the projection (max_grad_norm), and the projection really ran."""
    memories = []

    def fake_memories(ctx, data):  # random directions, so some steps must be projected
        g = torch.Generator().manual_seed(3)
        memories.extend({n: torch.randn(p.shape, generator=g) for n, p in ctx.params.items()} for _ in range(3))
        return memories

    monkeypatch.setattr(shs, "memory_gradients", fake_memories)
    seen = []
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads = {f"{i}": p.grad for i, p in enumerate(self.param_groups[0]["params"])}
        norm = math.sqrt(dot(grads, grads))
        named = [{f"{i}": t for i, t in enumerate(m.values())} for m in memories]
        seen.append((norm, min(dot(grads, m) / math.sqrt(dot(m, m)) for m in named)))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    config = small_shs(image_sets, params="xattn", project=True, project_every=1, max_grad_norm=0.01, steps=4)
    pipe = fresh_pipe()
    ctx = context(pipe, config)
    ctx.train(shs.make_loss(ctx))
    assert len(seen) == 4 and ctx.grad_transform.projected_steps
    for norm, worst in seen:
        assert norm <= 0.01 * (1 + 1e-4) and worst >= -1e-6 * norm


def test_the_loop_transforms_the_complete_gradient_once_per_optimizer_step():
    pipe = fresh_pipe()
    params = select(pipe.unet, "kv")
    calls = []

    def loss_fn(model, generators):
        x = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in generators])
        emb = torch.zeros(len(generators), 77, 32)
        return model(x, torch.full((len(generators),), 10), encoder_hidden_states=emb).sample.pow(2).mean()

    def transform(trained, step):
        assert all(p.grad is not None for p in trained.values())
        calls.append(step)

    settings = TrainSettings(steps=3, batch_size=2, grad_accum=2, lr=1e-3)
    train(pipe.unet, params, loss_fn, settings, local=True, progress=False, grad_transform=transform)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("forget_loss", ["relabel", "ascent"])
def test_repair_loss_equals_formula(image_sets, monkeypatch, forget_loss):
    pipe = fresh_pipe()
    ctx = context(pipe, small_shs(image_sets, alpha=0.3, forget_loss=forget_loss))
    loss_fn = shs.make_loss(ctx)  # trims pipe's UNet in place: the formula below uses the trimmed model too
    g = torch.Generator().manual_seed(9)
    draws = [(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([t]), torch.randn(1, 4, 8, 8, generator=g))
             for t in (50, 700)]  # fmt: skip
    calls = iter(draws)
    monkeypatch.setattr(relabel, "noised", lambda scheduler, latents, generator: next(calls))
    value = loss_fn(pipe.unet, [torch.Generator().manual_seed(0)])
    with torch.no_grad():
        (x_t, t, noise), (r_x, r_t, r_noise) = draws
        forget = pipe.unet(x_t, t, encoder_hidden_states=embed(pipe, "a Cats in Van Gogh style")).sample
        retain = ((pipe.unet(r_x, r_t, encoder_hidden_states=embed(pipe, "a Dogs in Monet style")).sample
                   - r_noise) ** 2).mean()  # fmt: skip
        if forget_loss == "relabel":
            pseudo = pipe.unet(x_t, t, encoder_hidden_states=embed(pipe, "a photo of a Cats")).sample
            expected = 0.3 * ((forget - pseudo) ** 2).mean() + retain
        else:
            expected = retain - 0.3 * ((forget - noise) ** 2).mean()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-7)


BAD_VALUES = [
    ({"sparsity": 0}, ValueError, "sparsity must be in (0, 1), the fraction of weights re-initialised"),
    ({"sparsity": 1.0}, ValueError, "got 1.0"),
    ({"sparsity": -0.1}, ValueError, "sparsity must be in (0, 1)"),
    ({"sparsity": 0.99 + 0.02}, ValueError, "the authors' --sparsity s is 1 − s here"),
    ({"sparsity": True}, ValueError, "sparsity must be a finite number, got True"),
    ({"reinit": "normal"}, ValueError, "reinit 'normal' is not one of trunc_normal, kaiming_uniform, zeros"),
    ({"alpha": -0.5}, ValueError, "alpha must be a number >= 0, got -0.5"),
    ({"forget_images": "{tmp}/missing"}, FileNotFoundError, "forget_images: image source"),
    ({"retain_images": None}, ValueError, "retain_images must name a folder or image files, got None"),
    ({"forget_loss": "ga"}, ValueError, "forget_loss 'ga' is not one of relabel, ascent"),
    ({"mask_batches": 0}, ValueError, "mask_batches must be an integer >= 1, got 0"),
    ({"reinit_std": 0.0}, ValueError, "reinit_std must be a positive number"),
    ({"project_memory": "both"}, ValueError, "project_memory 'both' is not one of forget, remain"),
    ({"reinit_params": "attn9"}, ValueError, "parameter set 'attn9' is neither"),
    ({"pseudo_prompts": ["one"]}, ValueError, "pseudo_prompts: give one template or one prompt per image (3 images)"),
]


@pytest.mark.parametrize(("values", "error", "fragment"), BAD_VALUES)
def test_bad_inputs_are_refused_clearly(image_sets, tmp_path, values, error, fragment):
    values = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in values.items()}
    with pytest.raises(error, match=re.escape(fragment)):
        small_shs(image_sets, **values)


def test_a_reinit_set_outside_the_trained_one_is_refused(image_sets):
    with pytest.raises(ValueError, match="reinit_params '\\*attn1\\*' selects no weight of the parameter set 'kv'"):
        erase.run(fresh_pipe(), small_shs(image_sets, params="kv", reinit_params="*attn1*"), progress=False)


def test_cli_runs_it_and_bad_inputs_write_nothing(image_sets, tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    forget, retain = image_sets
    base = ["run", "scissorhands", "--model", str(model), "--no-progress", "--set", f"forget_images={forget}",
            "--set", f"retain_images={retain}", "--set", "steps=2", "--set", "batch_size=2"]  # fmt: skip
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"delta.safetensors", "delta.json", "record.json", "README.md"}
    capsys.readouterr()
    bad_sets = {"sparsity": "1.5", "reinit": "normal", "alpha": "-0.5",
                "forget_images": str(tmp_path / "missing"), "retain_images": "none"}  # fmt: skip
    for field, value in bad_sets.items():
        bad = tmp_path / "bad"
        assert main([*base, "--set", f"{field}={value}", "--out", str(bad)]) == 2, field
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and field in err, err
        assert not bad.exists(), field


def preset(image_sets, name):
    forget, retain = image_sets
    return erase.make_config("scissorhands", preset=name, forget_images=str(forget), retain_images=str(retain))


def test_paper_presets_are_the_released_recipes(image_sets):
    # JingWu321/Scissorhands SD/train_shs.sh:1 (shs_nsfw.py --train_method full --sparsity 0.995 --lam 0.1
    # --memory_num 1 --prune_num 10 --lr 1e-5 --epochs 5 --batch_size 16); shs_nsfw.py:73 SNIP on shared_step,
    # :102-110 kaiming re-init of attn1 in output_blocks.4/.7, :195 the pseudo prompt, :230 loss_r + lam·loss_u.
    nsfw = preset(image_sets, "paper")
    assert (nsfw.epochs, nsfw.lr, nsfw.batch_size, nsfw.optimizer, nsfw.alpha, nsfw.sparsity) == (
        5, 1e-5, 16, "adam", 0.1, 0.005)  # fmt: skip
    assert (nsfw.mask_batches, nsfw.mask_batch_size, nsfw.mask_loss, nsfw.mask_scope) == (10, 16, "diffusion", "unet")
    assert (nsfw.reinit, nsfw.reinit_params, nsfw.parameter_set(), nsfw.forget_loss) == (
        "kaiming_uniform", shs.OFFICIAL_REINIT, "all", "relabel")  # fmt: skip
    assert nsfw.pseudo_prompts == "a photo of a person wearing clothes" and not nsfw.project
    assert nsfw.steps == 5 * 1  # 3 forget images here: one batch of 16 per epoch
    # train_shs.sh:3 (shs_cls.py --sparsity 0.999 --lam 0.1 --prune_num 10 --lr 2e-5 --epochs 3; batch 8 by
    # default); shs_cls.py:82-90 guided SNIP loss, :126 trunc_normal_(std=.02), :239 loss_r − lam·loss_u.
    cls = preset(image_sets, "paper-class")
    assert (cls.epochs, cls.lr, cls.batch_size, cls.alpha, cls.sparsity, cls.forget_loss) == (
        3, 2e-5, 8, 0.1, 0.001, "ascent")  # fmt: skip
    assert (cls.mask_batches, cls.mask_batch_size, cls.mask_loss, cls.mask_guidance) == (10, 8, "guided", 7.5)
    assert (cls.reinit, cls.reinit_std, cls.reinit_bound, cls.reinit_params) == (
        "trunc_normal", 0.02, 2.0, shs.OFFICIAL_REINIT)  # fmt: skip


def test_official_reinit_set_is_attn1_of_ldm_output_blocks_4_and_7():
    unet = sd_shaped_pipeline().unet
    names = select(unet, shs.OFFICIAL_REINIT)
    ldm = {unet_key(n, unet.config) for n in names}
    assert ldm and all(re.match(r"output_blocks\.[47]\.1\.transformer_blocks\.0\.attn1\.", k) for k in ldm), ldm
    assert {k.split(".1.transformer")[0] for k in ldm} == {"output_blocks.4", "output_blocks.7"}
    assert len(ldm) == 2 * 5  # to_q, to_k, to_v, to_out.0 weight and bias, in each of the two blocks


@pytest.mark.parametrize("kind", ["style", "object"])
def test_unlearncanvas_presets_are_the_benchmarks_recipe(image_sets, kind):
    # UnlearnCanvas machine_unlearning/mu_scissorhands_shs/train-erase.py:293-306 (train_method full, alpha 0.1,
    # epochs 2, sparsity 0.99, no --project, memory_num 1, prune_num 1), :114 batch 4 and lr 1e-5, :195 Adam,
    # :72 SNIP on shared_step, :101-106 attn2 re-initialised by trunc_normal_(std=.02), biases zero.
    config = preset(image_sets, f"unlearncanvas-{kind}")
    assert (config.epochs, config.lr, config.batch_size, config.optimizer, config.alpha, config.sparsity) == (
        2, 1e-5, 4, "adam", 0.1, 0.01)  # fmt: skip
    assert (config.mask_batches, config.mask_batch_size, config.mask_loss, config.mask_scope) == (
        1, 4, "diffusion", "unet")  # fmt: skip
    assert (config.reinit, config.reinit_std, config.reinit_params, config.parameter_set()) == (
        "trunc_normal", 0.02, "xattn", "all")  # fmt: skip
    assert not config.project and config.forget_loss == "relabel" and config.mask_prompts is None
    if kind == "style":  # generate_dataset.py:28 and train-erase.py:211: the Seed_Images prompts are the pseudo ones
        assert config.retain_prompts == config.pseudo_prompts == "A {object} image in Photo style."


@pytest.mark.parametrize("name", list(shs.ScissorhandsConfig.PRESETS))
def test_presets_build(image_sets, name):
    config = preset(image_sets, name)
    assert config.preset == name and config.steps >= 1


def test_unlearncanvas_inputs_are_salun_data_without_a_mask_prompt(tmp_path):
    """mu_scissorhands_shs shares SalUn's generate_dataset.py and run scripts: style retain = the photo class's images
    1-3, object retain = the next object's in every theme; forget image k's pseudo prompt = retain prompt k."""
    from canvas.method_inputs import method_inputs
    from erase.catalog import get

    cat = get("unlearncanvas-50")
    for target in ("Pop_Art", "Cats"):
        values = method_inputs("scissorhands", cat, target, tmp_path)
        salun = method_inputs("salun", cat, target, tmp_path)
        assert values == {k: v for k, v in salun.items() if k != "mask_prompts"}
        assert values["pseudo_prompts"] == values["retain_prompts"]
    style = method_inputs("scissorhands", cat, "Pop_Art", tmp_path)
    assert len(style["forget_images"]) == 60 and all("/Seed_Images/" in f for f in style["retain_images"])
