"""Runtime patches carried by a Delta: save/load, attach on apply and removal on revert, storage and identity."""

import json

import pytest
import torch

from erase import runtime
from erase.delta import Delta, fingerprint
from tests.unit.helpers import fresh_pipe, generate, unet_state


class _Scaled:
    """A test patch: multiplies the text encoder's hidden states by the patch's `scale` tensor."""

    def __init__(self, pipe, patch: runtime.Runtime):
        scale = patch.tensors["scale"]
        self._hook = pipe.text_encoder.register_forward_hook(
            lambda module, args, output: (output[0] * scale, *output[1:])
        )

    def remove(self) -> None:
        self._hook.remove()


runtime.register("test-scaled", _Scaled)


def scaled_delta(pipe, value: float = 0.5) -> Delta:
    patch = runtime.Runtime("test-scaled", {"scale": torch.tensor([value])}, {"note": "halves"})
    return Delta({}, {"method": "test", "base_fingerprint": fingerprint(pipe)}, patch)


def test_apply_attaches_the_patch_and_revert_removes_it():
    pipe = fresh_pipe()
    plain = generate(pipe)
    delta = scaled_delta(pipe)
    delta.apply(pipe)
    patched = generate(pipe)
    assert not torch.allclose(patched, plain)
    delta.revert(pipe)
    assert torch.equal(generate(pipe), plain)


def test_patch_round_trips_through_save_and_load(tmp_path):
    pipe = fresh_pipe()
    delta = scaled_delta(pipe)
    delta.save(tmp_path)
    meta = json.loads((tmp_path / "delta.json").read_text())
    assert meta["runtime"] == {"kind": "test-scaled", "settings": {"note": "halves"}}
    loaded = Delta.load(tmp_path)
    assert loaded.tensors == {} and loaded.runtime.kind == "test-scaled"
    assert loaded.digest() == delta.digest() and loaded.nbytes == delta.nbytes
    before = unet_state(pipe)
    loaded.apply(pipe)
    other = fresh_pipe()
    delta.apply(other)
    assert torch.equal(generate(pipe), generate(other))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_storage_counts_the_patch_tensors_and_settings():
    delta = scaled_delta(fresh_pipe())
    settings = len(json.dumps({"note": "halves"}, sort_keys=True).encode())
    assert delta.nbytes == 4 + settings


def test_digest_tells_patches_apart():
    pipe = fresh_pipe()
    assert scaled_delta(pipe, 0.5).digest() != scaled_delta(pipe, 0.25).digest()


def test_double_apply_unknown_kind_and_export_are_refused(tmp_path):
    pipe = fresh_pipe()
    delta = scaled_delta(pipe)
    delta.apply(pipe)
    with pytest.raises(ValueError, match="already attached"):
        delta.apply(pipe)
    delta.revert(pipe)
    with pytest.raises(ValueError, match="runtime patch"):
        delta.export(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    unknown = Delta({}, {"base_fingerprint": fingerprint(pipe)}, runtime.Runtime("no-such-kind"))
    with pytest.raises(ValueError, match="unknown runtime patch kind 'no-such-kind'; accepted: .*test-scaled"):
        unknown.apply(pipe)


def test_runtime_tensors_without_a_description_are_refused(tmp_path):
    pipe = fresh_pipe()
    scaled_delta(pipe).save(tmp_path)
    meta = json.loads((tmp_path / "delta.json").read_text())
    del meta["runtime"]
    (tmp_path / "delta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="describes no runtime patch"):
        Delta.load(tmp_path)
