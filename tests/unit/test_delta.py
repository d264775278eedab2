"""Delta: save/load, apply/revert, fingerprints, export as a full pipeline."""

import pytest
import torch
from safetensors.torch import save_file

import erase
from erase.delta import Delta, fingerprint
from tests.unit.helpers import fresh_pipe, generate, small_esd, unet_state


@pytest.fixture(scope="module")
def esd_result():
    pipe = fresh_pipe()
    result = erase.run(pipe, small_esd(), progress=False)
    return pipe, result


def test_round_trip_reproduces_the_erased_model_bit_for_bit(tmp_path, esd_result):
    erased, result = esd_result
    result.delta.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"delta.safetensors", "delta.json"}
    loaded = Delta.load(tmp_path)
    assert loaded.metadata["method"] == "esd" and loaded.nbytes == result.delta.nbytes
    base = fresh_pipe()
    loaded.apply(base)
    assert torch.equal(generate(base), generate(erased))
    loaded.revert(base)
    pristine = fresh_pipe()
    assert all(torch.equal(v, pristine.unet.state_dict()[k]) for k, v in unet_state(base).items())


def test_storage_is_the_bytes_of_the_changed_tensors(esd_result):
    _, result = esd_result
    expected = sum(t.numel() * t.element_size() for t in result.delta.tensors.values())
    assert result.delta.nbytes == expected == result.record["storage_bytes"]


def test_delta_for_another_base_is_refused_unless_forced(esd_result):
    _, result = esd_result
    other = fresh_pipe(seed=1)
    assert fingerprint(other) != result.delta.metadata["base_fingerprint"]
    with pytest.raises(ValueError, match="made on base model"):
        result.delta.apply(other)
    result.delta.apply(other, force=True)
    result.delta.revert(other)


def test_fingerprint_ignores_fp16_storage():
    pipe = fresh_pipe()
    fp = fingerprint(pipe)
    pipe.unet.half()
    pipe.text_encoder.half()
    assert fingerprint(pipe) == fp


def test_export_writes_a_loadable_pipeline(tmp_path, esd_result):
    erased, result = esd_result
    base = fresh_pipe()
    before = unet_state(base)
    out = result.delta.export(base, tmp_path / "exported")
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items()), "export must not leave edits"
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded), generate(erased))


def test_corrupt_files_are_clear_errors(tmp_path, esd_result):
    _, result = esd_result
    result.delta.save(tmp_path)
    (tmp_path / "delta.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Delta.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no delta.safetensors"):
        Delta.load(tmp_path / "missing")
    save_file({"unet.nope": torch.zeros(1)}, tmp_path / "delta.safetensors")
    with pytest.raises(ValueError, match="no matching parameter"):
        Delta.load(tmp_path).apply(fresh_pipe(), force=True)


def test_edited_metadata_and_bad_tensors_are_refused(tmp_path, esd_result):
    """Deleting base_fingerprint must not switch the base check off; NaN, integer or list metadata are errors."""
    _, result = esd_result
    meta = dict(result.delta.metadata)
    del meta["base_fingerprint"]
    with pytest.raises(ValueError, match="does not record its base model"):
        Delta(result.delta.tensors, meta).apply(fresh_pipe())
    Delta(result.delta.tensors, meta).apply(fresh_pipe(), force=True)
    name = next(iter(result.delta.tensors))
    for bad, message in (
        (torch.full((2,), float("nan")), "NaN or infinite"),
        (torch.zeros(2, dtype=torch.int64), "not a float"),
    ):
        folder = tmp_path / message.split()[0]
        Delta({name: bad}, result.delta.metadata).save(folder)
        with pytest.raises(ValueError, match=message):
            Delta.load(folder)
    result.delta.save(tmp_path / "list")
    (tmp_path / "list" / "delta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        Delta.load(tmp_path / "list")


def test_applied_is_the_erased_model_inside_the_block_and_the_base_after_it(esd_result):
    erased, result = esd_result
    base = fresh_pipe()
    before = generate(base)
    with result.delta.applied(base) as inside:
        assert inside is base and result.delta.is_applied(base)
        assert torch.equal(generate(base), generate(erased))
    assert not result.delta.is_applied(base) and torch.equal(generate(base), before)
    with pytest.raises(RuntimeError, match="inside"), result.delta.applied(base):
        raise RuntimeError("inside")
    assert not result.delta.is_applied(base) and torch.equal(generate(base), before), "reverted on an error too"
    with pytest.raises(ValueError, match="made on base model"), result.delta.applied(fresh_pipe(seed=1)):
        pass
