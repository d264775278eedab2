"""LoRA export (erase.lora, `erase export-lora`): loaded by diffusers' own loaders, the factors reproduce the Delta.

The effective weight change of a loaded LoRA is read from the PEFT layers diffusers builds (scaling * B @ A), not
from our factors, so a wrong name, rank, alpha or scale shows up as a difference.
"""

import json

import pytest
import torch
from safetensors import safe_open

import erase
from erase.cli import main
from erase.delta import Delta, fingerprint
from erase.lora import export_lora
from erase.runtime import Runtime
from erase.testing import tiny_sdxl_pipeline
from tests.unit.helpers import fresh_pipe, generate, save_tiny
from tests.unit.test_registry import METHOD_EXAMPLES

pytest.importorskip("peft", reason="loading a LoRA into diffusers needs peft (the dev extra installs it)")

# Float32 factors of a float64 SVD, composed in float32 by the loaded layers: relative rounding ~1e-7 per tensor.
FACTOR_ROUNDING = 1e-5
# Images of 3 DDIM steps through the float32 tiny pipeline: B @ A differs from the Delta's new weights by rounding
# only, measured at up to 1.3e-6 of the [0, 1] pixel range (UCE, AdvUnlearn); the erasures move pixels by > 0.06.
IMAGE_TOLERANCE = 1e-5


def made(method: str, **overrides):
    """A Delta made on the tiny pipeline by `method`'s registry example (no image inputs needed)."""
    config = erase.make_config(method, **{**METHOD_EXAMPLES[method], **overrides})
    return erase.run(fresh_pipe(), config, progress=False).delta


@pytest.fixture(scope="module")
def uce_delta():
    return made("uce")


# AdvUnlearn's own parameter set also trains the layer norms and biases, which have no LoRA form: here only the
# text encoder's Linear weights, so that a full-rank LoRA can be the whole erasure.
TEXT_LINEAR_WEIGHTS = "text_encoder.encoder.layers.*_proj.weight,text_encoder.encoder.layers.*.fc?.weight"


@pytest.fixture(scope="module")
def advunlearn_delta():
    return made("advunlearn", params=TEXT_LINEAR_WEIGHTS)


def full_rank(delta: Delta) -> int:
    return max(min(t.shape[0], t[0].numel()) for t in delta.tensors.values() if t.dim() > 1)


def loaded(make, path):
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    return pipe


def effective_changes(pipe) -> dict[str, torch.Tensor]:
    """`<component>.<module>.weight` -> scaling * B @ A of every PEFT LoRA layer diffusers put in the pipeline."""
    changes = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for name, module in model.named_modules() if model is not None else ():
            if not hasattr(module, "lora_A") or not module.lora_A:
                continue
            (adapter,) = module.lora_A.keys()
            down, up = module.lora_A[adapter].weight.double(), module.lora_B[adapter].weight.double()
            product = module.scaling[adapter] * (up.flatten(1) @ down.flatten(1))
            changes[f"{component}.{name}.weight"] = product.reshape(module.base_layer.weight.shape).detach()
    return changes


def true_change(delta: Delta, base, name: str) -> torch.Tensor:
    component, _, param = name.partition(".")
    return delta.tensors[name].double() - getattr(base, component).get_parameter(param).detach().double()


@pytest.mark.parametrize("which", ["uce", "advunlearn"])
def test_full_rank_lora_loaded_by_diffusers_generates_the_erased_images(which, uce_delta, advunlearn_delta, tmp_path):
    delta = {"uce": uce_delta, "advunlearn": advunlearn_delta}[which]
    component = {"uce": "unet", "advunlearn": "text_encoder"}[which]
    assert {n.partition(".")[0] for n in delta.tensors} == {component}, "the example edits the component it should"
    export = export_lora(delta, fresh_pipe(), full_rank(delta), "diffusers")
    assert not export.not_exportable and max(export.errors.values()) < FACTOR_ROUNDING
    export.save(tmp_path / "lora.safetensors")
    erased = fresh_pipe()
    delta.apply(erased)
    expected, before = generate(erased), generate(fresh_pipe())
    assert (expected - before).abs().max() > 100 * IMAGE_TOLERANCE, "the erasure must change the images"
    got = generate(loaded(fresh_pipe, tmp_path / "lora.safetensors"))
    assert (got - expected).abs().max() < IMAGE_TOLERANCE


def test_low_rank_reported_error_is_the_loaded_lora_error(tmp_path):
    base = fresh_pipe()
    delta = made("esd")  # a trained change: full rank, so rank 2 truncates it
    export = export_lora(delta, base, 2, "diffusers")
    export.save(tmp_path / "lora.safetensors")
    changes = effective_changes(loaded(fresh_pipe, tmp_path / "lora.safetensors"))
    assert set(changes) == set(export.errors) == {n for n in delta.tensors if n.endswith(".weight")}
    for name, reported in export.errors.items():
        change = true_change(delta, base, name)
        measured = float((changes[name] - change).norm() / change.norm())
        assert measured > 0.01, f"{name}: rank 2 should not reproduce a trained change"
        assert abs(measured - reported) < FACTOR_ROUNDING, name
        assert export.ranks[name] == 2


def handmade(pipe, components: tuple[str, ...]) -> Delta:
    """A Delta changing every parameter of `components` (Linear, Conv2d, norms, biases, embeddings) by noise."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for component in components:
        for name, p in getattr(pipe, component).named_parameters():
            tensors[f"{component}.{name}"] = p.detach() + 0.01 * torch.randn(p.shape, generator=g)
    return Delta(tensors, {"method": "hand", "base_fingerprint": fingerprint(pipe)})


@pytest.mark.parametrize(
    ("make", "components", "prefixes"),
    [
        (fresh_pipe, ("unet", "text_encoder"), ("lora_unet_down_blocks_", "lora_te_text_model_encoder_")),
        (
            tiny_sdxl_pipeline,
            ("unet", "text_encoder", "text_encoder_2"),
            (
                "lora_unet_input_blocks_",
                "lora_unet_output_blocks_",
                "lora_unet_middle_block_",
                "lora_unet_label_emb_",
                "lora_te1_text_model_",
                "lora_te2_text_model_",
                "lora_te2_text_projection",
            ),
        ),  # fmt: skip
    ],
    ids=["sd1", "sdxl"],
)
def test_kohya_file_loads_through_diffusers_to_the_diffusers_format_model(make, components, prefixes, tmp_path):
    base = make()
    delta = handmade(base, components)
    # Rank 40: full for the small matrices (padded in kohya), truncating for the 64-wide ones.
    files = {}
    for fmt in ("diffusers", "kohya"):
        export = export_lora(delta, base, 40, fmt)
        files[fmt] = export.save(tmp_path / f"{fmt}.safetensors")
    kohya_keys = set(safe_open(files["kohya"], "pt").keys())
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in kohya_keys), prefix
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya_keys)
    from_diffusers = effective_changes(loaded(make, files["diffusers"]))
    from_kohya = effective_changes(loaded(make, files["kohya"]))
    assert set(from_kohya) == set(from_diffusers) == set(export.errors)
    assert len({export.ranks[n] for n in export.errors}) > 1, "the test must cover modules of different ranks"
    assert any(e > 0.01 for e in export.errors.values()) and min(export.errors.values()) < FACTOR_ROUNDING
    for name, reported in export.errors.items():
        change = true_change(delta, base, name)
        assert torch.allclose(from_kohya[name], from_diffusers[name], rtol=0, atol=1e-6), name
        measured = float((from_kohya[name] - change).norm() / change.norm())
        assert abs(measured - reported) < FACTOR_ROUNDING, name
    # Everything else the Delta changed is listed, with a reason, in the result and in the file.
    assert set(export.not_exportable) == set(delta.tensors) - set(export.errors)
    assert any(".bias" in n for n in export.not_exportable) and any("embedding" in n for n in export.not_exportable)
    assert all(d.dim() < 2 or "embedding" in n for n, d in delta.tensors.items() if n in export.not_exportable)
    meta = safe_open(files["kohya"], "pt").metadata()
    assert json.loads(meta["erasekit.not_exportable"]) == export.not_exportable
    assert json.loads(meta["erasekit.relative_errors"]) == pytest.approx(export.errors)
    assert (meta["erasekit.format"], meta["erasekit.rank"], meta["erasekit.method"]) == ("kohya", "40", "hand")
    assert meta["erasekit.base_fingerprint"] == fingerprint(base)


def test_bad_inputs_are_clear_errors(uce_delta):
    base = fresh_pipe()
    for rank in (0, -3, 1.5):
        with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank}"):
            export_lora(uce_delta, base, rank)
    with pytest.raises(ValueError, match="unknown LoRA format 'lycoris'; accepted: diffusers, kohya"):
        export_lora(uce_delta, base, 4, "lycoris")
    with pytest.raises(ValueError, match="made on base model"):
        export_lora(uce_delta, fresh_pipe(seed=1), 4)
    patch = Delta({}, {"base_fingerprint": fingerprint(base)}, Runtime("seot", {}, {"concepts": ["cat"]}))
    with pytest.raises(ValueError, match=r"runtime patch \(seot\): it changes no weight"):
        export_lora(patch, base, 4)
    norms = {n: p.detach() + 1 for n, p in base.unet.named_parameters() if "norm" in n and n.endswith("weight")}
    only_norms = Delta({f"unet.{n}": v for n, v in norms.items()}, {"base_fingerprint": fingerprint(base)})
    with pytest.raises(ValueError, match=r"no Linear or Conv2d weight change to export as LoRA \(unet\..*norm"):
        export_lora(only_norms, base, 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_cli_export_lora(uce_delta, model_dir, tmp_path, capsys):
    folder = tmp_path / "uce"
    uce_delta.save(folder)
    (folder / "record.json").write_text(json.dumps({"model": str(model_dir)}))
    out = tmp_path / "uce-lora.safetensors"
    assert main(["export-lora", "--delta", str(folder), "--rank", "2", "--format", "kohya", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and (tmp_path / "uce-lora.README.md").is_file()
    export = export_lora(uce_delta, fresh_pipe(), 2, "kohya")
    for name, error in export.errors.items():
        assert f"{name}  rank 2  relative error {error:.3g}" in printed
    assert "not exportable (kept only in the delta): none" in printed
    assert set(safe_open(out, "pt").keys()) == set(export.tensors)

    def fails(*argv: str) -> str:
        assert main(["export-lora", "--delta", str(folder), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    new = str(tmp_path / "new.safetensors")
    assert "--rank must be a positive integer, got 0" in fails("--rank", "0", "--out", new)
    assert "exists; choose a new file" in fails("--rank", "2", "--out", str(out))
    assert "must be a .safetensors file" in fails("--rank", "2", "--out", str(tmp_path / "x.pt"))
    other = save_tiny(tmp_path / "other", seed=1)
    assert "made on base model" in fails("--rank", "2", "--out", new, "--model", str(other))
    (folder / "record.json").unlink()
    assert "--model not given" in fails("--rank", "2", "--out", new)
    patch = Delta({}, {"base_fingerprint": fingerprint(fresh_pipe())}, Runtime("seot", {}, {"concepts": ["cat"]}))
    patch.save(tmp_path / "patch")
    assert main(["export-lora", "--delta", str(tmp_path / "patch"), "--rank", "2", "--out", new, "--model",
                 str(model_dir)]) == 2  # fmt: skip
    assert "runtime patch" in capsys.readouterr().err
    assert not (tmp_path / "new.safetensors").exists()
