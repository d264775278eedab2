"""Pipeline loading: diffusers folders, CompVis single files, weights-only .ckpt, the toy, and clear refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from erase.convert import ldm_state_dict, to_single_file, unet_key
from erase.pipeline import load_pipeline
from erase.testing import tiny_pipeline
from tests.unit.helpers import save_tiny

COMPONENTS = ("unet", "vae", "text_encoder")
OPEN_CLIP_NAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline(seed=3)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    base.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single_file(base, tmp_path_factory) -> Path:
    return to_single_file(base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def assert_same_weights(a, b, components=COMPONENTS) -> None:
    for name in components:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        for key, value in left.items():
            assert torch.equal(value, right[key].to(value.dtype)), f"{name}.{key}"


def test_folder_round_trip(base, saved):
    pipe = load_pipeline(saved)
    assert_same_weights(base, pipe)
    assert pipe.safety_checker is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folder_dtype_applied(saved, base, dtype):
    pipe = load_pipeline(str(saved), dtype=dtype, device="cpu")
    for name in COMPONENTS:
        params = list(getattr(pipe, name).parameters())
        assert {p.dtype for p in params} == {dtype}, name
        assert {p.device.type for p in params} == {"cpu"}, name
    assert torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight.to(dtype))


def test_single_file_round_trip(base, saved, single_file):
    pipe = load_pipeline(single_file, config=saved)
    assert_same_weights(base, pipe)
    for name in COMPONENTS:
        module = getattr(pipe, name)
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), name
    assert not any(m.training for name in COMPONENTS for m in getattr(pipe, name).modules())


def test_single_file_needs_only_configs(base, saved, single_file, tmp_path):
    """config= may be a folder of configs alone (no weights): the architecture is all we read from it."""
    configs = tmp_path / "configs"
    for item in saved.rglob("*"):
        if item.is_file() and item.suffix not in (".safetensors", ".bin"):
            target = configs / item.relative_to(saved)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    pipe = load_pipeline(single_file, config=configs, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight.to(torch.bfloat16))


def test_key_layout_matches_diffusers_converter(base, saved):
    """Our diffusers->LDM table agrees with diffusers' own LDM->diffusers conversion (an independent implementation)."""
    checkpoint = ldm_state_dict(base)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in checkpoint)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(saved), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(checkpoint, config=str(saved), subfolder="vae", local_files_only=True)
    for ours, theirs in ((base.unet, unet), (base.vae, vae)):
        expected = theirs.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())


def test_open_clip_text_encoder(base, saved):
    """SD 2.x checkpoints carry an OpenCLIP text tower (fused q/k/v); it loads into the CLIPTextModel."""
    checkpoint = {k: v for k, v in ldm_state_dict(base).items() if not k.startswith("cond_stage_model.")}
    te = {k.removeprefix("text_model."): v for k, v in base.text_encoder.state_dict().items()}
    prefix = "cond_stage_model.model."
    checkpoint[prefix + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
    checkpoint[prefix + "positional_embedding"] = te["embeddings.position_embedding.weight"]
    checkpoint[prefix + "ln_final.weight"] = te["final_layer_norm.weight"]
    checkpoint[prefix + "ln_final.bias"] = te["final_layer_norm.bias"]
    layers = base.text_encoder.config.num_hidden_layers
    for i in range(layers + 1):  # one more layer than diffusers keeps, as in SD 2 (penultimate-layer conditioning)
        src, dst = f"encoder.layers.{min(i, layers - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            fused = [te[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            checkpoint[f"{dst}attn.in_proj_{kind}"] = torch.cat(fused)
            for ours, theirs in OPEN_CLIP_NAMES:
                checkpoint[f"{dst}{theirs}.{kind}"] = te[f"{src}{ours}.{kind}"]
    from transformers import CLIPTextModel

    from erase.convert import load_text_encoder_from_ldm

    loaded = CLIPTextModel(base.text_encoder.config)
    load_text_encoder_from_ldm(loaded, checkpoint, torch.float32)
    assert_same_weights(base, type("P", (), {"text_encoder": loaded}), components=("text_encoder",))


def test_ckpt_state_dict_loads(base, saved, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_state_dict(base), "global_step": 7}, path)
    pipe = load_pipeline(path, config=saved)
    assert_same_weights(base, pipe)


class Payload:
    """Unpickling this would create a marker file: the loader must refuse before any such code runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_with_code_is_refused(base, saved, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm_state_dict(base), "payload": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="only weights-only checkpoints are accepted") as info:
        load_pipeline(path, config=saved)
    assert "evil.ckpt" in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


def test_every_torch_load_is_weights_only(base, saved, tmp_path, monkeypatch):
    """Our path and the libraries' (.bin weights in a folder) never unpickle with weights_only=False."""
    calls: list[object] = []
    real_load = torch.load

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    bin_folder = tmp_path / "bin"
    base.save_pretrained(bin_folder, safe_serialization=False)
    assert any(bin_folder.rglob("*.bin"))
    assert_same_weights(base, load_pipeline(bin_folder))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_state_dict(base)}, ckpt)
    load_pipeline(ckpt, config=saved)
    assert calls


def test_toy_resolves_from_env(saved, base, monkeypatch):
    monkeypatch.setenv("ERASEKIT_TOY", str(saved))
    assert_same_weights(base, load_pipeline("toy"))


def test_toy_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASEKIT_TOY", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'toy'") as info:
        load_pipeline("toy")
    assert str(tmp_path) in str(info.value) and "build_toy.py" in str(info.value)


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        load_pipeline(missing)
    assert "diffusers pipeline folder" in str(info.value)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="without model_index.json") as info:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(info.value) and "'toy'" in str(info.value)


def test_folder_without_unet2dcondition(saved, tmp_path):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(saved, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no UNet2DConditionModel"):
        load_pipeline(folder)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"model\.onnx.*unknown suffix") as info:
        load_pipeline(path)
    assert ".safetensors" in str(info.value) and ".ckpt" in str(info.value)


def test_corrupt_safetensors(saved, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=r"broken\.safetensors.*not a readable \.safetensors"):
        load_pipeline(path, config=saved)


def test_corrupt_ckpt(saved, tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(ValueError, match=r"broken\.ckpt.*not a readable \.ckpt"):
        load_pipeline(path, config=saved)


def test_single_file_without_config(single_file):
    with pytest.raises(ValueError, match="needs config="):
        load_pipeline(single_file)


def test_single_file_with_wrong_architecture(saved, single_file, tmp_path):
    import shutil

    wider = tmp_path / "wider"
    shutil.copytree(saved, wider)
    config_file = wider / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [24, 32]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tiny\.safetensors.*shape .* config expects"):
        load_pipeline(single_file, config=wider)


def test_diffusers_layout_single_file_is_refused(base, saved, tmp_path):
    """A diffusers-named safetensors (e.g. a bare unet file) is not a CompVis checkpoint: say so, don't half-load."""
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in base.unet.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="CompVis/LDM layout"):
        load_pipeline(path, config=saved)


def test_bad_dtype_and_device(saved):
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(saved, dtype=torch.int8)
    with pytest.raises(ValueError, match="device"):
        load_pipeline(saved, device="tpu:banana")


def test_to_single_file_wants_safetensors(base, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        to_single_file(base, tmp_path / "model.ckpt")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1", "sd2"])
def test_sd_shaped_unet_layout_matches_diffusers(tmp_path, linear_projection):
    """SD's real block layout (4 levels, 2 layers each; SD 2 with linear proj_in) at toy width: our LDM names match
    diffusers' converter, so real SD checkpoints map the same way."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=linear_projection,
    )
    unet.save_config(tmp_path / "unet")
    checkpoint = {f"model.diffusion_model.{unet_key(k, unet.config)}": v for k, v in unet.state_dict().items()}
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in checkpoint  # SD's last upsampler slot
    theirs = UNet2DConditionModel.from_single_file(
        checkpoint, config=str(tmp_path), subfolder="unet", local_files_only=True
    ).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in unet.state_dict().items())


def test_a_folder_with_code_carrying_bin_weights_is_refused_without_running_it(tmp_path):
    folder = save_tiny(tmp_path / "model")
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "EXECUTED"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a weights-only pickle"):
        load_pipeline(str(folder))
    assert not marker.exists()


def test_quiet_libraries_silences_the_loading_bars_and_notices():
    import diffusers
    import transformers

    from erase import quiet_libraries

    libs = (diffusers, transformers)
    saved = [(lib.utils.logging.is_progress_bar_enabled(), lib.utils.logging.get_verbosity()) for lib in libs]
    try:
        for lib in libs:
            lib.utils.logging.enable_progress_bar()
            lib.utils.logging.set_verbosity_warning()
        quiet_libraries()
        for lib in libs:
            assert not lib.utils.logging.is_progress_bar_enabled()
            assert lib.utils.logging.get_verbosity() == lib.utils.logging.ERROR
    finally:
        for lib, (bar, level) in zip(libs, saved):
            (lib.utils.logging.enable_progress_bar if bar else lib.utils.logging.disable_progress_bar)()
            lib.utils.logging.set_verbosity(level)
