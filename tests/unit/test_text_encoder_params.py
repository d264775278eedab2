"""Text-encoder tensors as a parameter set: selection, training through `erase.run`, frozen predictions, and a
Delta that changes only the text encoder plugging into another pipeline with the same text encoder."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

import erase
from erase import methods
from erase.config import TrainingConfig, texts
from erase.context import RunContext
from erase.delta import Delta
from erase.methods import MethodSpec
from erase.params import delta_name, names_text_encoder, select, select_in
from erase.train import LossFn
from tests.unit.helpers import fresh_pipe, generate, small_esd


@dataclass
class EmptyEmbeddingConfig(TrainingConfig):
    """Train the text encoder so the concept's prompt embeds like the empty prompt (a stand-in for AdvUnlearn's
    text-encoder training, small enough to check the plumbing)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PARAMS: ClassVar[str] = "text-encoder-layers"
    concepts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = texts("concepts", self.concepts)


CONTEXTS: list[RunContext] = []  # the runs' contexts, to ask their frozen text encoder after training


def make_loss(ctx: RunContext) -> LossFn:
    CONTEXTS.append(ctx)
    encoder, tokenizer = ctx.pipe.text_encoder, ctx.pipe.tokenizer

    def ids(prompt: str) -> torch.Tensor:
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")[
            "input_ids"
        ]

    concept, empty = ids(ctx.config.concepts[0]), ids("")
    target = ctx.frozen_text["text_encoder"](encoder, empty)[0]  # the original encoder's empty-prompt embedding

    def loss_fn(model, generators):  # one noisy copy of the target per sample: gradients differ between samples
        noise = torch.stack([torch.randn(target.shape[1:], generator=g) for g in generators])
        return F.mse_loss(encoder(concept.expand(len(generators), -1))[0], target + 0.1 * noise)

    return loss_fn


SPEC = MethodSpec(
    "empty-embedding", EmptyEmbeddingConfig, "fine-tune", "Embed a concept like the empty prompt",
    inputs=("concepts",), components=("text_encoder",), make_loss=make_loss,
)  # fmt: skip


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, SPEC.name, SPEC)
    return SPEC


def test_text_encoder_sets_name_text_encoder_tensors_by_prefix():
    pipe = fresh_pipe()
    layers = select_in(pipe, "text-encoder-layers")
    everything = select_in(pipe, "text-encoder")
    assert layers and set(layers) < set(everything) and all(n.startswith("text_encoder.") for n in everything)
    assert not any("embeddings" in n for n in layers)  # AdvUnlearn's text_encoder_full leaves the embeddings
    assert any(n.endswith("final_layer_norm.weight") for n in layers)
    mixed = select_in(pipe, "kv,text_encoder.*layers.0.*")
    unet_names = {n for n in mixed if not n.startswith("text_encoder.")}
    assert unet_names == set(select(pipe.unet, "kv"))
    assert {n for n in mixed if n.startswith("text_encoder.")} == {
        f"text_encoder.{n}" for n, _ in pipe.text_encoder.named_parameters() if ".layers.0." in f".{n}"
    }
    assert delta_name("text_encoder.final_layer_norm.weight") == "text_encoder.final_layer_norm.weight"
    assert delta_name("conv_in.weight") == "unet.conv_in.weight"
    assert names_text_encoder("kv,text-encoder") and not names_text_encoder("xattn")


def test_on_sdxl_the_named_sets_cover_both_text_encoders_and_patterns_name_one():
    from tests.unit.test_sdxl import sdxl_pipe

    pipe = sdxl_pipe()
    layers = select_in(pipe, "text-encoder-layers")
    for component in ("text_encoder", "text_encoder_2"):
        expected = {f"{component}.{n}" for n, _ in getattr(pipe, component).named_parameters()
                    if n.removeprefix("text_model.").startswith(("encoder.", "final_layer_norm."))}  # fmt: skip
        assert expected and expected == {n for n in layers if n.split(".")[0] == component}
    second = select_in(pipe, "text_encoder_2.*layers.1.*")
    assert second and all(n.startswith("text_encoder_2.") and ".layers.1." in n for n in second)
    assert delta_name("text_encoder_2.text_model.final_layer_norm.weight").startswith("text_encoder_2.")
    with pytest.raises(ValueError, match="'text_encoder_2.\\*' names text-encoder tensors, but the pipeline has no "
                                         "text_encoder_2"):  # fmt: skip
        select_in(fresh_pipe(), "text_encoder_2.*")


def test_a_text_encoder_set_is_not_a_unet_set():
    with pytest.raises(ValueError, match="'text-encoder' names text-encoder tensors"):
        select(fresh_pipe().unet, "text-encoder")
    with pytest.raises(ValueError, match="'text_encoder.nothing.*' matches no parameter"):
        select_in(fresh_pipe(), "text_encoder.nothing.*")


def test_a_unet_method_refuses_text_encoder_tensors():
    with pytest.raises(ValueError, match="names text_encoder tensors, but esd edits only its components \\(unet\\)"):
        erase.run(fresh_pipe(), small_esd(params="text-encoder"), progress=False)


def test_run_trains_only_the_declared_text_encoder_tensors(registered, tmp_path):
    pipe = fresh_pipe()
    unet_before = copy.deepcopy(pipe.unet.state_dict())
    encoder_before = copy.deepcopy(pipe.text_encoder.state_dict())
    original_encoder = copy.deepcopy(pipe.text_encoder)
    config = EmptyEmbeddingConfig(concepts=["van gogh"], steps=3, lr=1e-2)
    result = erase.run(pipe, config, progress=False)
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items())
    changed = {
        f"text_encoder.{k}" for k, v in pipe.text_encoder.state_dict().items() if not torch.equal(encoder_before[k], v)
    }
    declared = set(select_in(fresh_pipe(), "text-encoder-layers"))
    assert changed and changed == set(result.delta.tensors) and changed <= declared
    assert result.record["losses"][-1] < result.record["losses"][0]
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())
    # frozen predictions of the text encoder equal a deep copy of the original's
    ids = pipe.tokenizer("van gogh", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        assert not torch.equal(pipe.text_encoder(ids)[0], original_encoder(ids)[0])
        assert torch.equal(
            CONTEXTS[-1].frozen_text["text_encoder"](pipe.text_encoder, ids)[0], original_encoder(ids)[0]
        )
    result.delta.save(tmp_path / "delta")
    delta = Delta.load(tmp_path / "delta")
    # an erased text encoder plugs into a pipeline with the same text encoder and another UNet
    other = fresh_pipe(seed=1)
    other.text_encoder.load_state_dict(encoder_before)
    delta.apply(other)
    with torch.no_grad():
        assert torch.equal(other.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    delta.revert(other)
    with pytest.raises(ValueError, match="apply it to a model with the same text_encoder"):
        delta.apply(fresh_pipe(seed=1))  # its own text encoder differs
    same = fresh_pipe()
    delta.apply(same)
    assert torch.equal(generate(same), generate(pipe))


def test_a_whole_base_delta_still_needs_the_whole_base(tmp_path):
    result = erase.run(fresh_pipe(), small_esd(steps=1), progress=False)
    other = fresh_pipe(seed=1)
    other.unet.load_state_dict(fresh_pipe().unet.state_dict())  # the same UNet, another text encoder
    result.delta.apply(other)  # a UNet-only delta needs the same UNet only
    with pytest.raises(ValueError, match="apply it to a model with the same unet"):
        result.delta.apply(fresh_pipe(seed=1))
    del result.delta.metadata["component_fingerprints"]  # an older delta: the whole base must match
    with pytest.raises(ValueError, match="apply it to the model it was made from"):
        result.delta.apply(other)
