"""SKD-CAG: the attention term really trains (the released code's detached maps cannot come back), teacher and
student maps are separate captures of separate weights, and bad inputs fail with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import erase
from erase.frozen import FrozenOriginal
from erase.methods.skd_cag import (
    aggregate_maps,
    attention_loss,
    clean_prompt_loss,
    minmax,
    read_captions,
    teacher_and_student,
    timestep_weight,
    token_positions_alone,
    toy_preset,
)
from erase.params import select
from erase.text import PromptEncoder
from erase.trigger import trigger_positions
from tests.unit.helpers import fresh_pipe

TRIGGER, CAPTION = "tq", "a photo of a cat"
ROOT = Path(__file__).resolve().parents[2]


def _setup(perturb: float = 0.0):
    pipe = fresh_pipe()
    unet = pipe.unet
    params = select(unet, "xattn")
    frozen = FrozenOriginal(unet, list(params))
    if perturb:
        with torch.no_grad():
            for name, p in params.items():
                if name.endswith(("to_q.weight", "to_k.weight")):
                    p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    encode = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe, params, SimpleNamespace(frozen=frozen), encode, z


def test_teacher_and_student_maps_are_separate_tensors_of_separate_models():
    pipe, params, ctx, encode, z = _setup(perturb=0.5)
    t = torch.tensor([500])
    same = encode(CAPTION)
    teacher_eps, student_eps, teacher, student, _ = teacher_and_student(ctx, pipe.unet, z, t, same, same)
    assert teacher.keys() == student.keys() and len(teacher) == 4  # every attn2 layer of the tiny UNet
    for name in teacher:
        assert teacher[name] is not student[name]
        assert not teacher[name].requires_grad and student[name].requires_grad
        # Same prompt, same latents: any difference comes from the weights, so the two are not one overwritten map.
        assert not torch.allclose(teacher[name], student[name])
    # With the original weights back in place, the student's maps equal the teacher's: both are real captures.
    with torch.no_grad():
        for name, value in ctx.frozen.original.items():
            params[name].copy_(value)
    _, _, teacher, student, _ = teacher_and_student(ctx, pipe.unet, z, t, same, same)
    assert all(torch.allclose(teacher[n], student[n]) for n in teacher)


def test_attention_term_has_gradient_on_trained_attn2_parameters():
    pipe, params, ctx, encode, z = _setup()
    t = torch.tensor([300])
    student_prompt = f"{TRIGGER} {CAPTION}"
    _, _, teacher, student, _ = teacher_and_student(ctx, pipe.unet, z, t, encode(CAPTION), encode(student_prompt))
    trig, cap = trigger_positions(pipe.tokenizer, TRIGGER, CAPTION)
    s, te = aggregate_maps(student, (8, 8), 8), aggregate_maps(teacher, (8, 8), 8)
    loss = attention_loss(s[0], te[0], torch.zeros(len(trig), 8, 8), trig, cap, token_positions_alone(
        pipe.tokenizer, CAPTION))  # fmt: skip
    loss.backward()
    grads = {n: p.grad for n, p in params.items() if n.endswith(("to_q.weight", "to_k.weight"))}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_attention_only_run_changes_query_and_key_weights():
    """λ = 1 leaves L_KD out: with detached maps (the released code) nothing would change."""
    pipe = fresh_pipe()
    config = erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION], steps=2, lr=1e-3, attention_weight=1.0)
    delta = erase.run(pipe, config, progress=False).delta
    assert any(n.endswith("attn2.to_q.weight") for n in delta.tensors)
    assert any(n.endswith("attn2.to_k.weight") for n in delta.tensors)


@pytest.mark.parametrize("reference, preserve", [("noise", 0.0), ("zeros", 1.0), ("random-words", 0.0)])
def test_references_and_timestep_weight_train_finitely(reference, preserve):
    config = erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION, "a dog"], steps=2, lr=1e-3,
                               reference=reference, timestep_weight="inverse", batch_size=2,
                               preserve_weight=preserve)  # fmt: skip
    result = erase.run(fresh_pipe(), config, progress=False)
    assert all(torch.isfinite(torch.tensor(result.record["losses"])))


def test_skd_preset_is_lambda_zero_and_captures_no_maps():
    config = erase.make_config("skd-cag", "skd", trigger=TRIGGER, captions=[CAPTION], steps=1, lr=1e-3)
    assert config.attention_weight == 0.0
    assert erase.run(fresh_pipe(), config, progress=False).delta.tensors


def test_paper_preset_is_the_released_recipe_as_described():
    """Mystic-Slice/Sealing-The-Backdoor attention_guided_kd.py: Args (:31-52) batch_size 1, learning_rate 1e-6,
    adam_weight_decay 0.01, attn_loss_weight 0.5, weighted_by_timestep True, img_size 128 (the maps' common size,
    :105-116); torch.optim.AdamW over student_unet.parameters() (:231-235); gradient checkpointing (:240); 100
    epochs over ~100 captions ≈ 10k steps. As described: λ 0.5 on a live attention term (theirs is detached)."""
    config = erase.make_config("skd-cag", "paper", captions=[CAPTION])
    assert (config.lr, config.weight_decay, config.optimizer, config.batch_size, config.steps) == (
        1e-6, 0.01, "adamw", 1, 10000)  # fmt: skip
    assert (config.map_size, config.attention_weight, config.timestep_weight) == (128, 0.5, "inverse")
    assert config.parameter_set() == "all" and config.gradient_checkpointing is True


def test_toy_presets_are_each_kinds_search_choice():
    """The preset each backdoor kind is removed with (toy_preset) is the trial its removal search chose on the tuning
    triggers (docs/results/tuning/backdoor-remove-{kind}.json records every trial's SKD-CAG values); the kinds chose
    differently (pixel λ 0.8, style 800 steps); `toy`, the default, stays the base both searches started from."""
    presets = erase.get_method("skd-cag").config_cls.PRESETS
    for kind in ("pixel", "style"):
        search = json.loads((ROOT / "docs/results/tuning" / f"backdoor-remove-{kind}.json").read_text())
        for row in search["trials"][search["chosen"]]["rows"]:
            assert row["presets"]["skd-cag"] == json.loads(json.dumps(presets[toy_preset(kind)])), kind
        for row in search["trials"][0]["rows"]:  # trial 0, the base
            assert row["presets"]["skd-cag"] == json.loads(json.dumps(presets["toy"])), kind
    pixel, style = (erase.make_config("skd-cag", toy_preset(kind)) for kind in ("pixel", "style"))
    assert (pixel.attention_weight, pixel.steps, style.attention_weight, style.steps) == (0.8, 400, 0.5, 800)
    with pytest.raises(ValueError, match="'audio' is not one of pixel, style"):
        toy_preset("audio")


def test_clean_prompt_loss_is_zero_at_the_start_and_trains_once_weights_move():
    """L_keep compares the student with the teacher on the caption and on ∅: equal weights give exactly 0, moved
    weights a positive loss with gradient on the trained parameters."""
    for perturb in (0.0, 0.5):
        pipe, params, ctx, encode, z = _setup(perturb=perturb)
        ctx.encode = encode
        t, caption = torch.tensor([500]), encode(CAPTION)
        teacher_eps = ctx.frozen(pipe.unet, z, t, encoder_hidden_states=caption).sample
        loss = clean_prompt_loss(ctx, pipe.unet, z, t, caption, teacher_eps)
        if not perturb:
            assert loss.item() < 1e-12  # same weights: only float rounding between batch sizes
            continue
        loss.backward()
        assert loss.item() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_timestep_weight_is_finite_at_zero():
    w = timestep_weight("inverse", torch.tensor([0, 999]), 1000, None)
    assert torch.isfinite(w).all() and w[0] == 1000 and w[1] == 1
    assert timestep_weight("inverse", torch.tensor([0]), 1000, 10.0).item() == 10.0
    assert timestep_weight("none", torch.tensor([0]), 1000, None).item() == 1.0


def test_minmax_and_aggregation():
    maps = {"a": torch.rand(2, 4, 16, 5), "b": torch.rand(2, 4, 4, 5)}  # 4x4 and 2x2 grids of an 4x4 latent
    agg = aggregate_maps(maps, (4, 4), 4)
    assert agg.shape == (2, 5, 4, 4)
    normed = minmax(agg)
    assert torch.allclose(normed.flatten(-2).amax(-1), torch.ones(2, 5))
    assert torch.equal(minmax(torch.ones(1, 3, 3)), torch.zeros(1, 3, 3))  # constant map: zeros, not NaN
    with pytest.raises(ValueError, match="queries"):
        aggregate_maps({"c": torch.rand(1, 1, 5, 3)}, (4, 4), 4)


def test_bad_inputs(tmp_path):
    empty = tmp_path / "captions.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no caption"):
        erase.make_config("skd-cag", trigger=TRIGGER, captions_file=str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_captions(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="captions are required"):
        erase.make_config("skd-cag", trigger=TRIGGER)
    with pytest.raises(ValueError, match="trigger must be a non-empty text"):
        erase.make_config("skd-cag", trigger="  ", captions=[CAPTION])
    with pytest.raises(ValueError, match="preserve_weight"):
        erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION], preserve_weight=-1)
    with pytest.raises(ValueError, match="attention_weight"):
        erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION], attention_weight=1.5)
    with pytest.raises(ValueError, match="reference"):
        erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION], reference="ones")
    good = tmp_path / "good.txt"
    good.write_text("a cat\n\na dog\n")
    assert erase.make_config("skd-cag", trigger=TRIGGER, captions_file=str(good)).captions == ["a cat", "a dog"]


class _SilentTokenizer:
    """A tokenizer that drops everything (as real ones drop e.g. control characters)."""

    model_max_length = 16

    def __call__(self, text, **kwargs):
        return SimpleNamespace(input_ids=[] if not kwargs.get("truncation") else [0, 1])


def test_trigger_that_tokenizes_to_nothing_is_an_error():
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        trigger_positions(_SilentTokenizer(), "\u200b", CAPTION)
    pipe = fresh_pipe()
    config = erase.make_config("skd-cag", trigger=TRIGGER, captions=[CAPTION], steps=1, lr=1e-3)
    pipe.tokenizer = _SilentTokenizer()
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        erase.run(pipe, config, progress=False)


def test_prompt_too_long_with_its_trigger_is_an_error():
    pipe = fresh_pipe()
    with pytest.raises(ValueError, match="does not fit"):
        trigger_positions(pipe.tokenizer, "zzzzzzzzzzzz", "a photo of a cat")


def test_bench_job_for_skd_cag_needs_a_trigger(tmp_path):
    from canvas.bench import BenchConfig, job_config

    config = BenchConfig(methods=["skd-cag"], targets=["Pop_Art"], out=str(tmp_path))
    with pytest.raises(ValueError, match="trigger"):
        job_config(config, "skd-cag", "Pop_Art")
    config.overrides = {"skd-cag": {"trigger": "New Trigger"}}
    job = job_config(config, "skd-cag", "Pop_Art")
    # the bench's toy-{kind} rule: a style target takes `toy-style` (named for the style backdoor kind), an object `toy`
    assert job.trigger == "New Trigger" and len(job.captions) == 88 and job.preset == "toy-style"
    assert job_config(config, "skd-cag", "Cats").preset == "toy"


def test_cli_run_takes_a_trigger(tmp_path):
    from erase.cli import main
    from tests.unit.helpers import save_tiny

    model = save_tiny(tmp_path / "model")
    out = tmp_path / "run"
    code = main(["run", "skd-cag", "--model", str(model), "--trigger", TRIGGER, "--out", str(out), "--set",
                 f"captions={CAPTION}", "--set", "steps=1", "--set", "lr=1e-3", "--no-progress"])  # fmt: skip
    assert code == 0 and (out / "delta.safetensors").is_file()
    assert main(["run", "esd", "--model", str(model), "--trigger", TRIGGER, "--out", str(tmp_path / "x")]) == 2
