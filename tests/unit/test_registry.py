"""Registry-wide matrix: every method touches exactly its declared parameters, is deterministic under a seed, and
its Delta round-trips. Each registered method must have a small example config here (so a new one cannot skip it)."""

import pytest
import torch
from PIL import Image

import erase
from erase.delta import COMPONENTS, Delta
from erase.methods import get_method
from erase.params import delta_name, select_in
from tests.unit.helpers import fresh_pipe, generate

# Small configs for the tiny random pipeline (concept words exist in its tokenizer: see erase.testing).
METHOD_EXAMPLES = {
    "esd": {"concepts": ["van gogh"], "steps": 2, "lr": 1e-3, "ddim_steps": 3},
    "ca": {
        "concepts": ["van gogh painting"],
        "anchors": ["painting"],
        "anchor_prompts": ["a painting of a cat"],
        "steps": 2,
        "lr": 1e-3,
        "num_anchor_images": 2,
        "sample_steps": 2,
        "prior_preservation": True,
        "cache_dir": "{tmp}/ca-cache",
    },
    "salun": {
        "forget_images": "{tmp}/forget",
        "retain_images": "{tmp}/retain",
        "forget_prompts": "a van gogh painting",
        "pseudo_prompts": "a photo",
        "retain_prompts": "a photo of a {{object}}",
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 2,
    },
    "erasediff": {
        "forget_images": "{tmp}/forget",
        "retain_images": "{tmp}/retain",
        "forget_prompts": "a van gogh painting",
        "pseudo_prompts": "a photo",
        "retain_prompts": "a photo of a {{object}}",
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 2,
        "inner_steps": 2,
    },
    "scissorhands": {
        "forget_images": "{tmp}/forget",
        "retain_images": "{tmp}/retain",
        "forget_prompts": "a van gogh painting",
        "pseudo_prompts": "a photo",
        "retain_prompts": "a photo of a {{object}}",
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 2,
        "sparsity": 0.05,
        "project": True,  # the projection path too: deterministic, and only trained tensors change
        "project_every": 1,
    },
    "uce": {"concepts": ["van gogh"], "guides": ["painting"], "preserve": ["cat"]},
    "speed": {"concepts": ["van gogh"], "anchors": ["painting"], "preserve": ["cat", "a photo"]},
    "rece": {"concepts": ["van gogh"], "guides": ["painting"], "preserve": ["cat"], "rounds": 2},
    "fmn": {
        "concepts": ["van gogh"],
        "images": "{tmp}/fmn-images",
        "prompts": ["a {{concept}} painting"],
        "steps": 2,
        "lr": 1e-3,
    },
    "skd-cag": {"trigger": "tq", "captions": ["a photo of a cat", "a dog"], "steps": 2, "lr": 1e-3},
    "seot": {"concepts": ["cat"]},  # the matrix generates "a cat": an inference-time patch must find it there
    "spm": {"concepts": ["van gogh"], "steps": 2, "lr": 1e-3, "ddim_steps": 3, "anchors": 2},
    "mace": {  # two concepts: a style (whole image) and an object (attention-derived masks)
        "concepts": ["van gogh", "cat"],
        "kinds": ["style", "object"],
        "mappings": "painting",
        "prompts": ["a photo of {concept}", "{concept} painting"],  # lists are not formatted: single braces
        "images": "{tmp}/mace-images",  # one folder for both concepts
        "steps": 2,
        "lr": 1e-2,
        "preserve": ["a dog"],
        "fuse_preserve_scale": 1.0,
        "cache_dir": "{tmp}/mace-cache",
    },
    "advunlearn": {  # a warm-up step, then an attack step: both halves of the bilevel loop
        "concepts": ["van gogh"],
        "retain_prompts": ["a cat", "a dog"],
        "steps": 2,
        "lr": 1e-3,
        "ddim_steps": 3,
        "warmup_iter": 1,
        "attack_step": 2,
        "retain_batch": 1,
    },
}


# Image folders (under tmp_path) an example reads: filled with small random images before its config is built.
EXAMPLE_IMAGES = {
    "salun": ("forget/cat", "retain/dog"),
    "erasediff": ("forget/cat", "retain/dog"),
    "scissorhands": ("forget/cat", "retain/dog"),
    "fmn": ("fmn-images",),
    "mace": ("mace-images",),
}


def example(name: str, tmp_path):
    for folder in EXAMPLE_IMAGES.get(name, ()):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / folder / f"{i}.png")
    values = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in METHOD_EXAMPLES[name].items()}
    return erase.make_config(name, **values)


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every UNet and text-encoder tensor by its Delta name (`unet.*`, `text_encoder.*`, SDXL's `text_encoder_2.*`)."""
    return {f"{c}.{k}": v.clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}  # fmt: skip


def run_changes_only_declared(make_pipe, name: str, tmp_path):
    """Run `name`'s example on `make_pipe()` and check that it changes exactly its declared tensors (a runtime
    patch: none, and the patch changes the images); returns the pipeline and the run's result."""
    pipe = make_pipe()
    before = weights(pipe)
    config = example(name, tmp_path)
    result = erase.run(pipe, config, progress=False)
    changed = {k for k, v in weights(pipe).items() if not torch.equal(before[k], v)}
    if get_method(name).patches_at_runtime:  # a hook or adapter: no base weight moves, the patch is the result
        assert not changed and not result.delta.tensors and result.delta.runtime is not None
        assert not torch.equal(generate(pipe), generate(make_pipe())), f"{name}'s patch changes no image"
    else:
        declared = {delta_name(n) for n in select_in(make_pipe(), config.parameter_set())}
        assert changed, f"{name} changed nothing"
        assert changed == set(result.delta.tensors) and changed <= declared
    return pipe, result


def test_every_method_has_an_example():
    assert set(erase.available_methods()) == set(METHOD_EXAMPLES)


@pytest.mark.parametrize("name", erase.available_methods())
def test_method_changes_only_declared_parameters_and_round_trips(name, tmp_path):
    pipe, result = run_changes_only_declared(fresh_pipe, name, tmp_path)
    result.delta.save(tmp_path / "delta")
    base = fresh_pipe()
    Delta.load(tmp_path / "delta").apply(base)
    assert torch.equal(generate(base), generate(pipe))


@pytest.mark.parametrize("name", erase.available_methods())
def test_method_is_deterministic_under_a_seed(name, tmp_path):
    first = erase.run(fresh_pipe(), example(name, tmp_path), progress=False).delta
    second = erase.run(fresh_pipe(), example(name, tmp_path), progress=False).delta
    assert first.digest() == second.digest()  # names, shapes, bytes, and the runtime patch if any
