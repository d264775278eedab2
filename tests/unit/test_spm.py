"""SPM on the tiny pipeline: the adapter's arithmetic and its prompt gate (checked against formulas computed here),
training that moves only the adapter, the patch's apply/revert, save/load and storage, config errors, the loss
against an independent computation, and the presets' recipe values."""

import json

import pytest
import torch
import torch.nn.functional as F

import erase
from canvas import bench
from erase.adapters import LowRankAdapter
from erase.cli import main
from erase.delta import Delta, fingerprint
from erase.frozen import FrozenOriginal
from erase.methods import spm
from erase.runtime import Runtime
from erase.sampling import generate as sample_images
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe, generate, save_tiny, unet_state

FAST = {"concepts": ["van gogh"], "steps": 2, "lr": 1e-3, "ddim_steps": 3, "anchors": 2}
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # its input is the text embedding itself
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # a 1x1 Conv2d in SD v1's layout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained():
    """One short SPM run: (its pipeline, which leaves carrying the patch, and the result)."""
    pipe = fresh_pipe()
    return pipe, erase.run(pipe, erase.make_config("spm", **FAST), progress=False)


def encoder(pipe) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


def random_patch(pipe, rank: int = 2, alpha: float = 3.0, gate: str = "clipcos") -> Runtime:
    """An SPM patch with random (not trained) adapter tensors on every module SPM wraps, erasing "van gogh"."""
    g = torch.Generator().manual_seed(1)
    names = spm.adapter_modules(pipe.unet, erase.make_config("spm", concepts=["van gogh"]))
    tensors = {}
    for name, layer in zip(names, LowRankAdapter(pipe.unet, names, rank, alpha).layers):
        tensors[f"{name}.down"] = torch.randn(layer.down.shape, generator=g)
        tensors[f"{name}.up"] = torch.randn(layer.up.shape, generator=g) * 0.1
    tensors[spm.TARGETS] = encoder(pipe)(["van gogh"])
    return Runtime("spm", tensors, {"concepts": ["van gogh"], "rank": rank, "alpha": alpha, "gate": gate})


def as_delta(pipe, patch: Runtime) -> Delta:
    return Delta({}, {"method": "spm", "base_fingerprint": fingerprint(pipe)}, patch)


def expected_gate(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m² per row, m the cosine similarity of the flattened embeddings, written out in float64."""
    a, b = rows.reshape(rows.shape[0], -1).double(), target.reshape(-1).double()
    return ((a @ b) / (a.norm(dim=1) * b.norm())) ** 2


def hook_counts(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.unet.modules())


def capture(module, seen: dict, key: str):
    """A forward hook registered after SPM's, so it sees the input and the patched output."""
    return module.register_forward_hook(lambda m, args, out: seen.update({key: (args[0], out)}))


def test_adapter_adds_the_gated_low_rank_term_per_row():
    pipe = fresh_pipe()
    patch = random_patch(pipe, rank=2, alpha=3.0)
    prompts = ["", "van gogh", "a photo of a cat", ""]  # CFG-style rows: unconditional and conditional together
    emb = encoder(pipe)(prompts)
    as_delta(pipe, patch).apply(pipe)
    seen: dict = {}
    hooks = [capture(pipe.unet.get_submodule(n), seen, n) for n in (TO_K, PROJ_IN)]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe.unet(x, torch.tensor([500] * 4), encoder_hidden_states=emb)
    for hook in hooks:
        hook.remove()
    gate = expected_gate(emb, patch.tensors[spm.TARGETS]).float()
    assert gate[1] == pytest.approx(1.0) and gate[1] > gate[2], "the target prompt opens the gate more"
    scale = 3.0 / 2  # alpha / rank
    inputs, out = seen[TO_K]
    assert torch.equal(inputs, emb)
    linear = pipe.unet.get_submodule(TO_K)
    down, up = patch.tensors[f"{TO_K}.down"], patch.tensors[f"{TO_K}.up"]
    expected = F.linear(inputs, linear.weight, linear.bias) + scale * gate[:, None, None] * (inputs @ down.T @ up.T)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    inputs, out = seen[PROJ_IN]
    conv = pipe.unet.get_submodule(PROJ_IN)
    merged = patch.tensors[f"{PROJ_IN}.up"][:, :, 0, 0] @ patch.tensors[f"{PROJ_IN}.down"][:, :, 0, 0]
    low_rank = torch.einsum("oc,bchw->bohw", merged, inputs)
    plain = F.conv2d(inputs, conv.weight, conv.bias)
    assert torch.allclose(out, plain + scale * gate[:, None, None, None] * low_rank, atol=1e-5, rtol=1e-5)


def test_gate_formula_and_the_gate_off():
    pipe = fresh_pipe()
    emb = encoder(pipe)(["van gogh", "a photo of a cat", "a dog"])
    targets = encoder(pipe)(["van gogh", "a dog"])
    both = torch.maximum(expected_gate(emb, targets[0]), expected_gate(emb, targets[1]))  # max over concepts
    assert torch.allclose(spm.gate(emb, targets).double(), both, atol=1e-6)
    assert spm.gate(emb, targets[:1])[0] > spm.gate(emb, targets[:1])[1]
    with pytest.raises(ValueError, match="shape"):
        spm.gate(emb[:, :5], targets)
    patch = random_patch(pipe, gate="off")
    as_delta(pipe, patch).apply(pipe)
    seen: dict = {}
    hook = capture(pipe.unet.get_submodule(TO_K), seen, "k")
    with torch.no_grad():
        pipe.unet(torch.zeros(3, 4, 8, 8), torch.tensor([10] * 3), encoder_hidden_states=emb)
    hook.remove()
    inputs, out = seen["k"]
    down, up = patch.tensors[f"{TO_K}.down"], patch.tensors[f"{TO_K}.up"]
    linear = pipe.unet.get_submodule(TO_K)
    assert linear.bias is None
    assert torch.allclose(out, inputs @ linear.weight.T + 1.5 * (inputs @ down.T @ up.T), atol=1e-5, rtol=1e-5)


def test_training_moves_only_the_adapter(trained):
    pipe, result = trained
    base = fresh_pipe()
    assert result.delta.tensors == {}
    base_state = unet_state(base)
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert spm.SUBMODULE not in dict(pipe.unet.named_children()), "the training submodule is taken out again"
    names = spm.adapter_modules(base.unet, erase.make_config("spm", **FAST))
    tensors = result.delta.runtime.tensors
    assert set(tensors) == {f"{n}.{p}" for n in names for p in ("down", "up")} | {spm.TARGETS}
    assert any(tensors[f"{n}.up"].abs().sum() > 0 for n in names), "the adapter's up matrices left zero"
    assert torch.equal(tensors[spm.TARGETS], encoder(base)(["van gogh"]))
    assert len(result.record["losses"]) == 2 and result.record["changed_tensors"] == 0


def test_params_restrict_the_wrapped_modules():
    unet = fresh_pipe().unet
    names = spm.adapter_modules(unet, erase.make_config("spm", concepts=["x"], params="xattn"))
    assert names and all(".attn2." in n for n in names)
    everything = spm.adapter_modules(unet, erase.make_config("spm", concepts=["x"]))
    assert len(everything) == 48 and len(names) == 16  # 4 transformers x 12 modules; attn2 q, k, v, out
    with pytest.raises(ValueError, match="nothing to wrap"):
        spm.adapter_modules(unet, erase.make_config("spm", concepts=["x"], params="conv_in.*"))


def test_apply_revert_save_load_and_storage(trained, tmp_path):
    _, result = trained
    delta = result.delta
    pipe = fresh_pipe()
    plain, hooks = generate(pipe), hook_counts(pipe)
    delta.apply(pipe)
    patched = generate(pipe)
    assert not torch.equal(patched, plain)
    delta.revert(pipe)
    assert torch.equal(generate(pipe), plain) and hook_counts(pipe) == hooks
    base_state = unet_state(fresh_pipe())
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.unet.state_dict().items())
    delta.save(tmp_path / "spm")
    loaded = Delta.load(tmp_path / "spm")
    other = fresh_pipe()
    loaded.apply(other)
    assert torch.equal(generate(other), patched) and loaded.digest() == delta.digest()
    names = spm.adapter_modules(other.unet, erase.make_config("spm", **FAST))
    modules = [other.unet.get_submodule(n) for n in names]
    shapes = [(m.in_features, m.out_features) if hasattr(m, "in_features") else (m.in_channels, m.out_channels)
              for m in modules]  # fmt: skip
    adapter_bytes = 4 * sum(i + o for i, o in shapes)  # rank 1, fp32
    targets_bytes = 4 * loaded.runtime.tensors[spm.TARGETS].numel()
    settings = json.dumps(loaded.runtime.settings, sort_keys=True).encode()
    assert delta.nbytes == loaded.nbytes == adapter_bytes + targets_bytes + len(settings)
    assert result.record["storage_bytes"] == delta.nbytes


def test_the_patch_works_in_the_toolkit_sampler_too(trained):
    _, result = trained
    pipe = fresh_pipe()
    kwargs = {"steps": 3, "guidance": 7.5, "encoder": encoder(pipe), "output_type": "pt"}
    plain = sample_images(pipe, ["van gogh", "a cat"], [0, 1], **kwargs)
    result.delta.apply(pipe)
    patched = sample_images(pipe, ["van gogh", "a cat"], [0, 1], **kwargs)
    result.delta.revert(pipe)
    assert not torch.equal(patched, plain)
    assert torch.equal(sample_images(pipe, ["van gogh", "a cat"], [0, 1], **kwargs), plain)


def test_anchor_rows():
    concept = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(1, 16, 32)
    anchors = spm.sample_anchors(concept, 64, torch.Generator().manual_seed(1))
    ratio = anchors.flatten(1).norm(dim=1) / concept.norm()
    assert anchors.shape == (64, 16, 32) and ratio.min() >= 0.8 and ratio.max() < 1.2 and ratio.std() > 0.05
    for n, empties in ((4, 2), (3, 1), (1, 0)):
        cfg = erase.make_config("spm", concepts=["x"], anchors=n)
        rows = spm.anchor_rows(concept, empty, cfg, torch.Generator().manual_seed(2))
        assert rows.shape[0] == n and int((rows.flatten(1).abs().sum(1) == 0).sum()) == empties
    cfg = erase.make_config("spm", concepts=["x"], anchors=4, anchor_rows="random")
    rows = spm.anchor_rows(concept, empty, cfg, torch.Generator().manual_seed(2))
    assert int((rows.flatten(1).abs().sum(1) == 0).sum()) == 0


def test_dynamic_resolution_draws_the_released_bucket():
    """The code's 512 px bucket: heights and widths of 256-448 px in steps of 64, i.e. latents 32-56 by 8."""
    cfg = erase.make_config("spm", concepts=["x"], dynamic_resolution=True)
    sides = {}
    for size in (64, 8):
        unet = type("UNet", (), {"config": type("Config", (), {"sample_size": size})})()
        drawn = [spm.latent_size(unet, cfg, torch.Generator().manual_seed(s)) for s in range(200)]
        sides[size] = {side for pair in drawn for side in pair}
    assert sides == {64: {32, 40, 48, 56}, 8: {4, 5, 6, 7}}
    fixed = erase.make_config("spm", concepts=["x"])
    assert spm.latent_size(fresh_pipe().unet, fixed, torch.Generator()) == (8, 8)


def merged_unet(pipe, adapter: LowRankAdapter):
    """The UNet with the adapter folded into its weights: W + (alpha/rank)·up·down, built without any hook."""
    unet = fresh_pipe().unet
    with torch.no_grad():
        for name, layer in zip(adapter.names, adapter.layers):
            module = unet.get_submodule(name)
            product = layer.up.flatten(1) @ layer.down.flatten(1)
            module.weight += adapter.scale * product.reshape(module.weight.shape)
    return unet


def test_loss_against_an_independent_computation():
    pipe = fresh_pipe()
    cfg = erase.make_config("spm", concepts=["van gogh"], anchors=3, anchor_weight=7.0, negative_guidance=1.5)
    adapter = LowRankAdapter(pipe.unet, spm.adapter_modules(pipe.unet, cfg), rank=1, alpha=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.down.copy_(torch.randn(layer.down.shape, generator=g))
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)
    adapter.attach()
    encode = encoder(pipe)
    concept, empty = encode("van gogh"), encode("")
    anchors = spm.anchor_rows(concept, empty, cfg, torch.Generator().manual_seed(3))
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])

    def model(x, t, e):
        return pipe.unet(x, t, encoder_hidden_states=e).sample

    def original(x, t, e):
        with adapter.disabled(), torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=e).sample

    total, erase_term, anchor_term = spm.spm_loss(model, original, x_t, t, concept, empty, anchors, cfg)
    base, merged = fresh_pipe().unet, merged_unet(pipe, adapter)
    with torch.no_grad():
        e0 = {k: base(x_t, t, encoder_hidden_states=v).sample for k, v in (("c", concept), ("", empty))}
        target = e0[""] - 1.5 * (e0["c"] - e0[""])
        expected_erase = ((merged(x_t, t, encoder_hidden_states=concept).sample - target) ** 2).mean()
        xs = x_t.expand(3, -1, -1, -1)
        anchored = base(xs, t, encoder_hidden_states=anchors).sample
        expected_anchor = ((merged(xs, t, encoder_hidden_states=anchors).sample - anchored) ** 2).mean()
    assert expected_anchor > 0 and expected_erase > 0
    assert erase_term.item() == pytest.approx(expected_erase.item(), rel=1e-4)
    assert anchor_term.item() == pytest.approx(expected_anchor.item(), rel=1e-4)
    assert total.item() == pytest.approx(expected_erase.item() + 7.0 * expected_anchor.item(), rel=1e-4)
    total.backward()
    assert all(layer.down.grad is not None for layer in adapter.layers)
    adapter.detach()


def test_x_t_steps_timestep_and_which_model_predicts(monkeypatch):
    """k ~ [1, n) DDIM steps sampled by the model being trained (adapter on), fed schedule_T[k·T/n] of the T-step
    schedule; the frozen predictions are the UNet with the adapter off."""
    pipe = fresh_pipe()
    cfg = erase.make_config("spm", concepts=["van gogh"], ddim_steps=4)
    adapter = LowRankAdapter(pipe.unet, spm.adapter_modules(pipe.unet, cfg), 1, 1.0)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.down.normal_()
            layer.up.normal_()
    adapter.attach()
    calls = []

    def fake_partial(sampler, scheduler, noise, cond, uncond, guidance, stop_index):
        calls.append({"k": stop_index, "guidance": guidance, "steps": len(scheduler.timesteps), "sampler": sampler})
        return noise, 0

    def fake_loss(model, original, x_t, t, *args):
        calls[-1].update(t=int(t), original=original)
        return (torch.zeros(()),)

    monkeypatch.setattr(spm, "ddim_partial", fake_partial)
    monkeypatch.setattr(spm, "spm_loss", fake_loss)
    ctx = type(
        "Ctx", (), {"config": cfg, "pipe": pipe, "encode": encoder(pipe), "frozen": FrozenOriginal(pipe.unet, [])}
    )
    loss_fn = spm.make_loss(ctx(), adapter)
    for seed in range(60):
        loss_fn(pipe.unet, [torch.Generator().manual_seed(seed)])
    schedule = erase.sampling.ddim_scheduler(pipe.scheduler.config, 1000).timesteps
    assert {c["k"] for c in calls} == {1, 2, 3}
    assert all(c["t"] == int(schedule[int(c["k"] * 1000 / 4)]) and c["guidance"] == 3.0 for c in calls)
    assert all(c["steps"] == 4 for c in calls)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([300]), encoder(pipe)("van gogh")
    with torch.no_grad():
        plain = fresh_pipe().unet(x, t, encoder_hidden_states=emb).sample
        with_adapter = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(calls[0]["original"](x, t, emb), plain)
    assert torch.equal(calls[0]["sampler"](x, t, emb), with_adapter) and not torch.equal(with_adapter, plain)
    adapter.detach()


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"rank": 1.5}, "rank must be an integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"anchor_weight": -1.0}, "anchor_weight must be a number >= 0"),
        ({"negative_guidance": -2.0}, "negative_guidance must be a number >= 0"),
        ({"anchors": 0}, "anchors must be an integer >= 1"),
        ({"ddim_steps": 1}, "ddim_steps must be an integer >= 2"),
        ({"gate": "sigmoid"}, "gate 'sigmoid' is not one of clipcos, off"),
        ({"anchor_rows": "all"}, "anchor_rows 'all' is not one of released, random"),
        ({"sample_with": "other"}, "sample_with 'other' is not one of trained, frozen"),
        ({"concepts": []}, "concepts must be one or more non-empty texts"),
        ({"concepts": [" "]}, "concepts must be one or more non-empty texts"),
    ],
)
def test_bad_configs_are_one_clear_error(values, fragment):
    with pytest.raises(ValueError) as info:
        erase.make_config("spm", **{"concepts": ["van gogh"], **values})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_runs_spm_and_bad_input_writes_nothing(tmp_path, model_dir, capsys):
    fast = ["--set", "steps=2", "--set", "ddim_steps=3", "--set", "anchors=2", "--no-progress"]
    out = tmp_path / "spm"
    assert main(["run", "spm", "--model", str(model_dir), "--concept", "van gogh", "--out", str(out), *fast]) == 0
    assert {p.name for p in out.iterdir()} == {"delta.safetensors", "delta.json", "record.json", "README.md"}
    delta = Delta.load(out)
    assert delta.runtime.kind == "spm" and delta.tensors == {}
    bad = tmp_path / "bad"
    argv = ["run", "spm", "--model", str(model_dir), "--concept", "van gogh", "--out", str(bad), "--set", "rank=0"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "rank must be an integer >= 1" in err and len(err.splitlines()) == 1 and not bad.exists()


def test_bench_runs_an_spm_job(tmp_path, model_dir):
    config = bench.BenchConfig(
        methods=["spm"], targets=["Sketch"], out=str(tmp_path), model=str(model_dir), catalog="toy", sampler="toy",
        seeds=[188], overrides={"spm": {"steps": 2, "ddim_steps": 3, "anchors": 2}}, presets={}, batch_size=64,
    )  # fmt: skip
    result = bench.Bench(config, progress=False).run()
    (row,) = result["rows"]
    assert row["method"] == "spm" and row["storage_gb"] > 0 and 0 <= row["UA"] <= 100
    record = json.loads((tmp_path / "jobs" / "spm__Sketch" / "delta" / "record.json").read_text())
    assert record["config"]["concepts"] == ["Sketch style"]


def test_presets_are_the_released_recipe():
    released = {
        "steps": 3000, "lr": 1e-4, "rank": 1, "alpha": 1.0, "negative_guidance": 1.0, "anchor_weight": 1000.0,
        "anchors": 4, "anchor_rows": "released", "ddim_steps": 30, "start_guidance": 3.0, "sample_with": "trained",
        "dynamic_resolution": True, "optimizer": "adamw", "weight_decay": 1e-2, "batch_size": 1,
    }  # fmt: skip
    recipes = ("paper", "unlearncanvas-style", "unlearncanvas-object")
    assert set(spm.SPMConfig.PRESETS) == {*recipes, "toy", "toy-object"}  # the toy's: ours, tuned (tune_toy.py)
    for name in recipes:
        config = erase.make_config("spm", name, concepts=["Van_Gogh"])
        assert {k: getattr(config, k) for k in released} == released, name
        assert config.mixed_precision == "no" and config.max_grad_norm is None and config.gate == "clipcos"
