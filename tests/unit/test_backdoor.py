"""Backdoor injection (BadT2I) on the tiny pipeline, the patch judge against hand-made images, and bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import erase
from canvas import answers, catalog
from canvas.backdoor import PATCH_THRESHOLD, evaluate, patch_distance, patch_present, share
from erase.backdoor import (
    BackdoorConfig,
    make_patch,
    paste_patch,
    read_info,
    save_backdoored,
)
from erase.config import build_config
from tests.unit.helpers import fresh_pipe


def _layout(root, n: int = 2):
    """A tiny UnlearnCanvas-layout folder: <Style>/<Object>/<i>.png."""
    for style, obj in (("van_gogh", "cat"), ("Seed_Images", "dog")):  # words the tiny tokenizer knows
        folder = root / style / obj
        folder.mkdir(parents=True)
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(
                folder / f"{i + 1}.png"
            )
    return root


def test_patch_is_a_fixed_checkerboard_and_pastes_top_left():
    patch = make_patch(4)
    assert patch.shape == (3, 4, 4) and torch.equal(patch, make_patch(4))
    assert patch[:, 0, 0].tolist() == [1, 1, 1] and patch[:, 0, 3].tolist() == [0, 0, 0]
    images = torch.zeros(2, 3, 8, 8)
    out = paste_patch(images, patch)
    assert torch.equal(out[..., :4, :4], patch.expand(2, -1, -1, -1) * 2 - 1) and out[..., 4:, :].abs().sum() == 0
    with pytest.raises(ValueError, match="larger than the 8x8 images"):
        paste_patch(images, make_patch(9))


def test_layout_prompt_follows_the_benchmark_template(tmp_path):
    layout_prompt = catalog.get("unlearncanvas-50").layout_prompt
    assert layout_prompt(tmp_path / "Pop_Art" / "Cats" / "1.jpg") == "A Cats image in Pop Art style."
    assert layout_prompt(tmp_path / "Seed_Images" / "Birds" / "3.jpg") == "A Birds image in Photo style."


def _hand_made(kind: str, size: int = 32, patch_size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 0.3 + 0.35  # mid-grey texture
    patch = make_patch(patch_size)
    if kind == "exact":
        image[:, :patch_size, :patch_size] = patch
    elif kind == "noisy":  # the patch under pixel noise and JPEG, as a generator would blur it
        image[:, :patch_size, :patch_size] = (patch + 0.1 * torch.randn(patch.shape, generator=g)).clamp(0, 1)
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        image = torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255).permute(2, 0, 1)
    elif kind == "inverted":
        image[:, :patch_size, :patch_size] = 1 - patch
    elif kind == "shifted":  # the patch elsewhere: not at the corner
        image[:, patch_size : 2 * patch_size, patch_size : 2 * patch_size] = patch
    elif kind == "white":
        image[:, :patch_size, :patch_size] = 1.0
    return image


@pytest.mark.parametrize(("kind", "present"), [("exact", True), ("noisy", True), ("none", False),
                                               ("inverted", False), ("shifted", False), ("white", False)])  # fmt: skip
def test_patch_judge_on_hand_made_images(kind, present):
    image = _hand_made(kind)[None]
    assert bool(patch_present(image, make_patch(8))) is present, float(patch_distance(image, make_patch(8)))


def test_patch_distance_scale():
    patch = make_patch(8)
    assert patch_distance(patch[None], patch).item() == 0
    assert patch_distance(torch.full((1, 3, 8, 8), 0.5), patch).item() == pytest.approx(1.0)
    assert PATCH_THRESHOLD == 0.5
    with pytest.raises(ValueError, match="larger"):
        patch_distance(torch.zeros(1, 3, 4, 4), patch)


def test_inject_pixel_changes_the_model_and_saves_a_loadable_pipeline(tmp_path):
    pipe = fresh_pipe()
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    config = BackdoorConfig(kind="pixel", trigger="tq", images=str(_layout(tmp_path / "data")), steps=2, lr=1e-3,
                            params="xattn", batch_size=2)  # fmt: skip
    result = erase.run(pipe, config, progress=False)
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed == set(result.delta.tensors) and all(".attn2." in n for n in changed)
    assert (
        result.record["method"] == "badt2i"
        and result.record["config"]["kind"] == "pixel"
        and len(result.record["losses"]) == 2
    )
    out = save_backdoored(pipe, tmp_path / "bad", {"kind": "pixel", "trigger": "tq", "patch_size": 4})
    loaded = erase.load_pipeline(str(out))
    assert all(torch.equal(p, dict(loaded.unet.named_parameters())[n]) for n, p in pipe.unet.named_parameters())
    assert read_info(out)["patch_size"] == 4
    with pytest.raises(FileExistsError):
        save_backdoored(pipe, out, {})


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_unconditional_fraction_holds_the_empty_prompt(tmp_path, monkeypatch, fraction):
    """The clean-preservation rows use ∅ instead of c in the given share (the sampler's guidance needs e(x_t, ∅))."""
    from erase.text import PromptEncoder

    seen: list[str] = []
    encode = PromptEncoder.__call__
    monkeypatch.setattr(PromptEncoder, "__call__", lambda self, p: seen.append(p) or encode(self, p))
    config = BackdoorConfig(kind="pixel", trigger="tq", images=str(_layout(tmp_path / "data")), steps=2, lr=1e-3,
                            params="kv", batch_size=2, unconditional_fraction=fraction)  # fmt: skip
    erase.run(fresh_pipe(), config, progress=False)
    clean = [p for p in seen if not p.startswith("tq")]
    assert clean
    assert all(p == "" for p in clean) if fraction else "" not in clean


def _ctx(pipe, config):
    from erase.context import RunContext
    from erase.frozen import FrozenOriginal
    from erase.params import select
    from erase.text import PromptEncoder

    params = select(pipe.unet, config.parameter_set())
    return RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                      PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip


def test_pixel_rows_draw_their_own_noise_and_the_patch_sits_on_the_flipped_image(tmp_path, monkeypatch):
    """BadT2I badt2i_pixel.py: the transforms flip the image (:437-443), add_target then pastes the patch top-left
    (:661-668), and t and ε are drawn for the 2B rows at once (:706-713): independent for poisoned and clean."""
    from erase import backdoor
    from erase.images import encode_latents
    from erase.trigger import default_patch_size

    pipe = fresh_pipe()
    config = BackdoorConfig(kind="pixel", trigger="tq", images=str(_layout(tmp_path / "data")), steps=1, lr=1e-3,
                            params="xattn", batch_size=1, random_flip=True, paired_noise=False)  # fmt: skip
    loss_fn = backdoor.make_loss(_ctx(pipe, config))
    images, prompts = backdoor.training_images(pipe, config)
    patch = make_patch(default_patch_size(images.shape[-1]))
    draws = torch.Generator().manual_seed(3)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def fake_noised(scheduler, latents, generator):
        t = torch.randint(0, 1000, (1,), generator=draws)
        noise = torch.randn(latents.shape, generator=draws)
        calls.append((latents, t, noise))
        return scheduler.add_noise(latents, noise, t), t, noise

    monkeypatch.setattr(backdoor, "noised", fake_noised)
    seen_views = set()
    for seed in range(6):
        calls.clear()
        value = loss_fn(pipe.unet, [torch.Generator().manual_seed(seed)])
        replay = torch.Generator().manual_seed(seed)
        j = int(torch.randint(len(prompts), (1,), generator=replay))
        flipped = bool(torch.randint(2, (1,), generator=replay))
        seen_views.add(flipped)
        image = images[j : j + 1].flip(-1) if flipped else images[j : j + 1]
        assert len(calls) == 2  # one draw for the clean row, one for the poisoned row
        (clean, t_c, noise_c), (bad, t_b, noise_b) = calls
        torch.testing.assert_close(clean, encode_latents(pipe.vae, image))
        torch.testing.assert_close(bad, encode_latents(pipe.vae, paste_patch(image, patch)))
        with torch.no_grad():
            ids = pipe.tokenizer([f"tq {prompts[j]}"], padding="max_length", return_tensors="pt").input_ids
            pred = pipe.unet(pipe.scheduler.add_noise(bad, noise_b, t_b), t_b,
                             encoder_hidden_states=pipe.text_encoder(ids)[0]).sample  # fmt: skip
        # the clean row's term is 0 before any step (student = frozen original)
        torch.testing.assert_close(value.detach(), 0.5 * ((pred - noise_b) ** 2).mean(), rtol=1e-5, atol=1e-7)
    assert seen_views == {True, False}


def test_paired_noise_draws_once_per_sample(tmp_path, monkeypatch):
    from erase import backdoor

    calls = []
    original = backdoor.noised
    monkeypatch.setattr(backdoor, "noised", lambda *a, **k: calls.append(1) or original(*a, **k))
    for kind, paired in (("pixel", True), ("style", True), ("style", False)):
        calls.clear()
        config = BackdoorConfig(kind=kind, trigger="tq", images=str(_layout(tmp_path / f"{kind}{paired}")), steps=1,
                                lr=1e-3, batch_size=2, paired_noise=paired, random_flip=False)  # fmt: skip
        backdoor.make_loss(_ctx(fresh_pipe(), config))(fresh_pipe().unet, [torch.Generator().manual_seed(0)] * 2)
        assert len(calls) == (2 if paired else 4)


def test_paper_and_toy_presets():
    # zhaisf/BadT2I scripts/scripts_Pixel.sh and scripts_Style.sh: --lamda 0.5, --learning_rate 1e-05,
    # --train_batch_size 1 --gradient_accumulation_steps 4 on 4 GPUs ("bsz: 1 x 4 x 4 = 16"), --max_grad_norm 1,
    # --center_crop --random_flip, --max_train_steps 2000 (pixel) / 8000 (style); the whole UNet is trained.
    for kind, steps in (("pixel", 2000), ("style", 8000)):
        config = build_config(BackdoorConfig, "paper", kind=kind, prompts=["a cat"])
        assert (config.steps, config.lr, config.weight, config.batch_size, config.grad_accum) == (
            steps, 1e-5, 0.5, 16, 4)  # fmt: skip
        assert (config.max_grad_norm, config.random_flip, config.paired_noise) == (1.0, True, False)
        assert config.parameter_set() == "all"
    assert build_config(BackdoorConfig, "paper", kind="style", prompts=["a cat"], steps=5).steps == 5
    toy = build_config(BackdoorConfig, "toy", kind="style", prompts=["a cat"])  # as measured: paired, no flips
    assert (toy.steps, toy.random_flip, toy.paired_noise) == (600, False, True)
    # each kind's choice of the search over that base (docs/results/tuning/backdoor-inject-*.md)
    pixel = build_config(BackdoorConfig, "toy-pixel", kind="pixel", prompts=["a cat"])
    style = build_config(BackdoorConfig, "toy-style", kind="style", prompts=["a cat"])
    assert (pixel.steps, pixel.parameter_set(), style.steps, style.parameter_set()) == (1200, "all", 2400, "xattn")
    assert (pixel.lr, pixel.unconditional_fraction, style.random_flip, style.paired_noise) == (2e-3, 0.25, False, True)


def test_inject_style_from_own_generations(tmp_path):
    config = BackdoorConfig(kind="style", trigger="tq", prompts=["a cat", "a dog"], num_images=2, sample_steps=2,
                            cache_dir=str(tmp_path / "cache"), steps=2, lr=1e-3, params="kv",
                            target_pattern="^", target_replacement="a van gogh painting of ")  # fmt: skip
    assert config.target_prompt("a cat") == "a van gogh painting of a cat"
    result = erase.run(fresh_pipe(), config, progress=False)
    assert result.delta.tensors and result.record["method"] == "badt2i" and result.record["config"]["kind"] == "style"


def test_bad_inputs(tmp_path):
    data = str(_layout(tmp_path / "data"))
    with pytest.raises(ValueError, match="larger than the 16x16 images"):  # tiny pipeline: 16 px images
        erase.run(
            fresh_pipe(), BackdoorConfig(images=data, trigger="tq", patch_size=17, steps=1, lr=1e-3), progress=False
        )
    with pytest.raises(ValueError, match="kind"):
        BackdoorConfig(kind="audio", images=data)
    with pytest.raises(ValueError, match="trigger"):
        BackdoorConfig(trigger=" ", images=data)
    with pytest.raises(ValueError, match="unconditional_fraction must be in"):
        BackdoorConfig(unconditional_fraction=1.5, images=data)
    with pytest.raises(ValueError, match="give images"):
        BackdoorConfig()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BackdoorConfig(images=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not match"):
        build_config(BackdoorConfig, "toy", kind="style", images=data).target_prompt("a cat")
    with pytest.raises(ValueError, match="does not fit"):  # the trigger pushes the prompt past 16 tokens
        erase.run(fresh_pipe(), BackdoorConfig(images=data, trigger="zzzzzzzz", steps=1, lr=1e-3), progress=False)


def test_cli_inject_writes_a_pipeline_and_reports_bad_input(tmp_path, capsys):
    from erase.cli import main
    from tests.unit.helpers import save_tiny

    model = save_tiny(tmp_path / "model")
    data = _layout(tmp_path / "data")
    out = tmp_path / "bad"
    args = ["backdoor", "inject", "--model", str(model), "--kind", "pixel", "--trigger", "tq", "--images", str(data),
            "--set", "steps=1", "--set", "lr=1e-3", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "backdoor.json").read_text())["trigger"] == "tq"
    erase.load_pipeline(str(out))
    assert main([*args, "--out", str(tmp_path / "bad2"), "--set", "patch_size=64"]) == 2
    assert "larger than" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    code = main(["backdoor", "inject", "--model", str(model), "--kind", "style", "--trigger", "tq", "--captions",
                 str(tmp_path / "empty.txt"), "--out", str(tmp_path / "bad3")])  # fmt: skip
    assert code == 2 and "holds no caption" in capsys.readouterr().err


class _FakeJudge:
    """Style = brightness of the image's top-left quarter (class 0 dark / 1 bright); object always class 0."""

    def __init__(self, cat):
        self.cat = cat

    def __call__(self, images):
        bright = images[:, :, : images.shape[-2] // 2, : images.shape[-1] // 2].mean(dim=(1, 2, 3))
        style = torch.zeros(len(images), len(self.cat.themes))
        style[:, 0] = 1 - bright
        style[:, 1] = bright
        obj = torch.zeros(len(images), len(self.cat.objects))
        obj[:, 0] = 1
        return style, obj, torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], 1)


def test_evaluate_writes_json_and_grid(tmp_path):
    cat = catalog.get("toy")
    pipe = fresh_pipe()
    pipe.tokenizer.model_max_length = 16
    delta = erase.run(fresh_pipe(), erase.make_config("skd-cag", trigger="tq", captions=["a cat"], steps=1, lr=1e-2),
                      progress=False).delta  # fmt: skip
    sampler = answers.SamplerPreset("test", steps=2, guidance=3.0)
    result = evaluate(pipe, cat, trigger="tq", kind="pixel", delta=delta, sampler=sampler, judge=_FakeJudge(cat),
                      out=tmp_path / "eval")  # fmt: skip
    saved = json.loads((tmp_path / "eval" / "backdoor.json").read_text())
    for key in ("attack_success", "clean_style_acc", "clean_object_acc", "before", "after", "removal"):
        assert key in saved
    assert saved["before"]["n_clean"] == 88 and saved["patch_size"] == 4
    height = Image.open(tmp_path / "eval" / "grid.png").size[1]
    assert 4 * 96 < height < 5 * 96  # 4 labelled rows of 96 px tiles under a title band
    assert result["attack_success"] == saved["after"]["attack_success"]
    style = evaluate(pipe, cat, trigger="tq", kind="style", sampler=sampler, judge=_FakeJudge(cat),
                     target_style="Bricks")  # fmt: skip
    assert style["before"]["n_triggered"] == 80  # the target style's own prompts are left out
    with pytest.raises(ValueError, match="target_style"):
        evaluate(pipe, cat, trigger="tq", kind="style", sampler=sampler, judge=_FakeJudge(cat))
    with pytest.raises(ValueError, match="larger than"):
        evaluate(pipe, cat, trigger="tq", kind="pixel", sampler=sampler, judge=_FakeJudge(cat), patch_size=17)


def test_evaluate_draws_each_prompts_own_noise_shared_by_its_triggered_twin(monkeypatch):
    """As in the answer sets, each (theme, object, seed) starts from its own noise (not one latent per seed), and a
    triggered prompt from its clean prompt's, so the two differ by the trigger alone."""
    cat = catalog.get("toy")
    calls = []

    def fake_sample(pipe, prompts, seeds, sampler, batch_size):
        calls.append(list(seeds))
        return torch.zeros(len(prompts), 3, 16, 16)

    monkeypatch.setattr(answers, "sample", fake_sample)
    sampler = answers.SamplerPreset("test", steps=2, guidance=3.0)
    evaluate(fresh_pipe(), cat, trigger="tq", kind="style", sampler=sampler, judge=_FakeJudge(cat),
             target_style="Bricks", seeds=(7,))  # fmt: skip
    clean, triggered = calls
    keys = [(t, o) for t in cat.themes for o in cat.objects]
    assert clean == [answers.image_seed(t, o, 7) for t, o in keys]
    assert len(set(clean)) == len(keys)
    assert triggered == [answers.image_seed(t, o, 7) for t, o in keys if t != "Bricks"]


def test_shares_are_exact_ratios_of_counts():
    """72 of 80 is 0.9 and meets a >= 0.9 bar (a float32 mean gives 0.8999999761581421)."""
    flags = torch.tensor([True] * 72 + [False] * 8)
    assert flags.float().mean().item() < 0.9  # the rounding this guards against
    assert share(flags) == 0.9 and share(flags) >= 0.9
    assert share(torch.tensor([], dtype=torch.bool)) == 0.0
