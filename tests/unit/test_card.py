"""Model cards (erase.card): a Delta's and an exported LoRA's README carry the facts a user needs to trust them."""

import json

import pytest
import torch
import yaml

import erase
from erase.card import delta_card, lora_card, lora_card_path, write_delta_card
from erase.cli import main
from erase.lora import export_lora
from tests.unit.helpers import fresh_pipe, save_tiny

RECORD = {
    "losses": [0.9, 0.5, 0.25],
    "wall_time_s": 12.5,
    "peak_memory_bytes": 3 * 2**30,
    "memory_kind": "peak_rss",
    "device": "cpu",
    "dtype": "float32",
    "torch_threads": 1,
    "storage_bytes": 4096,
    "model": "toy",
}
METRICS = {"method": "uce", "target": "Van_Gogh", "UA": 91.25, "IRA": 80.5, "CRA": 77.75, "FID": 33.5, "time_s": 2.0}


@pytest.fixture(scope="module")
def uce():
    config = erase.make_config("uce", preset=None, concepts=["van gogh"], guides=["painting"], preserve=["cat"])
    return erase.run(fresh_pipe(), config, progress=False)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_delta_card_has_fingerprint_method_preset_concepts_record_and_metrics(uce):
    metadata = {**uce.delta.metadata, "config": {**uce.delta.metadata["config"], "preset": "toy"}}
    card = delta_card(metadata, RECORD, METRICS)
    assert {"concept-erasure", "uce"} <= set(front_matter(card)["tags"])
    assert metadata["base_fingerprint"] in card and "`van gogh`" in card
    assert "- method: `uce`" in card and "- preset: `toy`" in card
    for figure in ("| steps | 3 |", "| wall time | 12.5 s |", "| peak memory | 3.000 GiB (peak_rss) |",
                   "| final loss | 0.25 |", "| device | cpu |", "| torch threads | 1 |"):  # fmt: skip
        assert figure in card, figure
    for metric in ("| UA | 91.25 |", "| IRA | 80.5 |", "| CRA | 77.75 |", "| FID | 33.5 |", "| time_s | 2 |"):
        assert metric in card, metric
    assert "Van_Gogh" in card
    without = delta_card(metadata, RECORD)
    assert "Benchmark metrics" not in without and "| UA |" not in without


def test_lora_card_lists_errors_and_what_was_not_exported(uce):
    export = export_lora(uce.delta, fresh_pipe(), 1, "kohya")
    card = lora_card(export, "erased.safetensors", uce.delta.metadata, RECORD, METRICS)
    assert {"concept-erasure", "uce", "lora"} <= set(front_matter(card)["tags"])
    assert uce.delta.metadata["base_fingerprint"] in card and "rank 1" in card and "`kohya`" in card
    for name, error in export.errors.items():
        assert f"| {name} | 1 / {error:.3g} |" in card
    assert "| UA | 91.25 |" in card and "| final loss | 0.25 |" in card
    assert "Every tensor the erasure changed is in the LoRA." in card and not export.not_exportable
    with_bias = erase.Delta({**uce.delta.tensors, "unet.conv_in.bias": torch.zeros(16)}, uce.delta.metadata)
    partial = lora_card(export_lora(with_bias, fresh_pipe(), 1), "erased.safetensors", uce.delta.metadata)
    assert "- `unet.conv_in.bias`: Conv2d.bias (1-D)" in partial and "not the whole erasure" in partial
    assert lora_card_path("out/erased.safetensors").as_posix() == "out/erased.README.md"


def test_erase_run_writes_the_card(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    out = tmp_path / "esd"
    fast = ["--set", "steps=2", "--set", "ddim_steps=3", "--set", "lr=1e-3", "--no-progress"]
    argv = ["run", "esd", "--model", str(model), "--concept", "van gogh", "--out", str(out), *fast]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    record = json.loads((out / "record.json").read_text())
    assert record["base_fingerprint"] in card and "`van gogh`" in card and "- method: `esd`" in card
    assert f"| final loss | {record['losses'][-1]:.4g} |" in card and "| steps | 2 |" in card
    assert f"| torch threads | {record['torch_threads']} |" in card and str(model) in card
    write_delta_card(out, METRICS)  # as `canvas bench` does once it has scored the job
    assert "| CRA | 77.75 |" in (out / "README.md").read_text()
    capsys.readouterr()
