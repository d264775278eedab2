"""The README's "Adding a method" example, verbatim in shape: one config + `make_loss`, one registry row and one
`method_inputs` entry make a method that `erase.run`, `erase run` and the bench's job builder all accept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

import erase
from canvas import method_inputs
from canvas.bench import BenchConfig, job_config
from erase import methods
from erase.cli import main
from erase.config import TrainingConfig, texts
from erase.context import RunContext
from erase.methods import MethodSpec
from erase.params import select
from erase.sampling import randn
from erase.train import LossFn
from tests.unit.helpers import fresh_pipe, save_tiny


@dataclass
class NoiseAnchorConfig(TrainingConfig):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"toy": {"steps": 2, "lr": 1e-3}}
    DEFAULT_PARAMS: ClassVar[str] = "kv"
    concepts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = texts("concepts", self.concepts)


def make_loss(ctx: RunContext) -> LossFn:
    unet, empty = ctx.pipe.unet, ctx.encode("")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def loss_fn(model, generators):
        x = torch.cat([randn((1, *shape), g, unet.device, unet.dtype) for g in generators])
        t = torch.cat([torch.randint(1000, (1,), generator=g) for g in generators]).to(unet.device)
        concept = ctx.encode([ctx.config.concepts[0]] * len(generators))
        target = ctx.frozen(unet, x, t, encoder_hidden_states=empty.expand_as(concept)).sample
        return F.mse_loss(model(x, t, encoder_hidden_states=concept).sample, target)

    return loss_fn


@pytest.fixture
def registered(monkeypatch):
    spec = MethodSpec(
        "noise-anchor", NoiseAnchorConfig, "fine-tune", "Map a concept onto the empty prompt",
        inputs=("concepts",), make_loss=make_loss,
    )  # fmt: skip
    monkeypatch.setitem(methods.METHODS, spec.name, spec)
    monkeypatch.setitem(method_inputs.INPUTS, spec.name, method_inputs.concept_inputs)
    return spec


def test_the_new_method_runs_and_touches_only_its_parameters(registered):
    config = erase.make_config("noise-anchor", concepts=["van gogh"], steps=2, lr=1e-3)
    result = erase.run(fresh_pipe(), config, progress=False)
    assert result.record["method"] == "noise-anchor" and len(result.record["losses"]) == 2
    kv = {f"unet.{n}" for n in select(fresh_pipe().unet, "kv")}
    assert result.delta.tensors and set(result.delta.tensors) <= kv


def test_the_cli_and_the_bench_take_it_without_knowing_its_name(registered, tmp_path):
    model = save_tiny(tmp_path / "model")
    out = tmp_path / "out"
    args = ["run", "noise-anchor", "--model", str(model), "--concept", "van gogh", "--set", "steps=1", "--out"]
    assert main([*args, str(out), "--no-progress"]) == 0
    assert (out / "delta.safetensors").is_file()
    bench = BenchConfig(methods=["noise-anchor"], targets=["Pop_Art"], out=str(tmp_path / "bench"))
    job = job_config(bench, "noise-anchor", "Pop_Art")
    assert job.concepts == ["Pop Art style"] and job.preset == "toy"  # canvas.method_inputs.concept_text
