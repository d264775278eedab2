"""Answer sets: naming, per-image noise, resumption with identical pixels, sharding equal to one run, versions."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from canvas import answers, catalog
from erase.sampling import ddim_scheduler
from tests.unit.helpers import fresh_pipe

CAT = catalog.get("toy")
FAST = answers.SamplerPreset("test", steps=2, guidance=3.0)


def _items():
    return answers.answer_items(CAT, seeds=[188, 288], themes=CAT.themes[:3], objects=CAT.objects[:2])


def _pixels(directory, items):
    return {it.filename: np.asarray(Image.open(directory / it.filename)) for it in items}


def test_items_follow_unlearncanvas_naming():
    items = answers.answer_items(CAT)
    assert len(items) == len(CAT.themes) * len(CAT.objects) * 5
    assert items[0].filename == f"{CAT.themes[0]}_{CAT.objects[0]}_seed188.jpg"
    with pytest.raises(ValueError, match="not a theme"):
        answers.answer_items(CAT, themes=["Nope"])


def test_resume_regenerates_exactly_the_missing_images(tmp_path, monkeypatch):
    pipe, items = fresh_pipe(), _items()
    answers.generate(pipe, items, CAT, tmp_path, FAST, batch_size=4, progress=False)
    first = _pixels(tmp_path, items)
    removed = [items[1].filename, items[9].filename]
    for name in removed:
        (tmp_path / name).unlink()
    (tmp_path / items[5].filename).write_bytes(b"truncated")  # an unreadable image counts as missing
    removed.append(items[5].filename)
    untouched = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.jpg") if p.name not in removed}
    answers.generate(pipe, items, CAT, tmp_path, FAST, batch_size=4, progress=False)
    again = _pixels(tmp_path, items)
    assert all(np.array_equal(again[k], first[k]) for k in first), "regenerated images must be pixel-identical"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.jpg") if p.name not in removed} == untouched
    loaded_items, paths, manifest = answers.load_answer_set(tmp_path)
    assert loaded_items == items and manifest["sampler"]["steps"] == 2 and len(paths) == len(items)


def test_two_shards_equal_one_run(tmp_path):
    pipe, items = fresh_pipe(), _items()
    answers.generate(pipe, items, CAT, tmp_path / "one", FAST, batch_size=4, progress=False)
    for index in (0, 1):
        answers.generate(pipe, items, CAT, tmp_path / "two", FAST, batch_size=4, shard=(index, 2), progress=False)
    one, two = _pixels(tmp_path / "one", items), _pixels(tmp_path / "two", items)
    assert all(np.array_equal(one[k], two[k]) for k in one)


def test_shard_parsing():
    assert answers.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            answers.parse_shard(bad)


def _noise_recorder(pipe, steps):
    """Records each batch's initial noise: the latents the UNet gets at the schedule's first timestep."""
    first = int(ddim_scheduler(pipe.scheduler.config, steps).timesteps[0])
    noises = []

    def hook(module, args, kwargs):
        if int(args[1]) == first:
            noises.append(args[0].chunk(2)[0].clone())  # (unconditional, conditional) halves hold the same latents

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return noises


def test_image_seed_is_a_stable_sha256_of_theme_object_seed():
    digest = hashlib.sha256(b'["Lava", "circle", 188]').hexdigest()
    assert answers.image_seed("Lava", "circle", 188) == int(digest[:16], 16) // 2
    assert answers.AnswerItem("Lava", "circle", 188).generator_seed == int(digest[:16], 16) // 2
    seeds = {answers.image_seed(t, o, s) for t in ("Lava", "Ink") for o in ("circle", "square") for s in (188, 288)}
    assert len(seeds) == 8 and max(seeds) < 2**63


def test_prompts_of_one_seed_start_from_their_own_noise(tmp_path):
    pipe, items = fresh_pipe(), _items()
    noises = _noise_recorder(pipe, FAST.steps)
    answers.generate(pipe, items, CAT, tmp_path, FAST, batch_size=len(items), progress=False)
    (noise,) = noises
    for it, drawn in zip(items, noise):
        expected = torch.randn((1, *drawn.shape), generator=torch.Generator().manual_seed(it.generator_seed))[0]
        assert torch.equal(drawn, expected), f"{it} did not start from its own generator's noise"
    same_seed = [n for it, n in zip(items, noise) if it.seed == 188]
    assert len(same_seed) == 6 and not any(torch.equal(same_seed[0], n) for n in same_seed[1:])


def test_an_image_does_not_depend_on_its_batch_or_shard(tmp_path):
    pipe, items = fresh_pipe(), _items()
    noises = _noise_recorder(pipe, FAST.steps)
    answers.generate(pipe, items, CAT, tmp_path / "one", FAST, batch_size=len(items), progress=False)
    answers.generate(pipe, items, CAT, tmp_path / "five", FAST, batch_size=5, progress=False)
    answers.generate(pipe, items, CAT, tmp_path / "shard", FAST, batch_size=5, shard=(1, 2), progress=False)
    one, five, shard = noises[0], torch.cat(noises[1:4]), torch.cat(noises[4:])
    assert torch.equal(one, five), "the same noise in batches of 12 and of 5"
    assert torch.equal(shard, five[5:10]), "shard 1/2 takes the second batch of 5, with its noise"
    a, b = _pixels(tmp_path / "one", items), _pixels(tmp_path / "five", items)
    assert all(np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1 for k in a), "batch mates: float rounding only"
    sharded, whole = _pixels(tmp_path / "shard", items[5:10]), _pixels(tmp_path / "five", items[5:10])
    assert all(np.array_equal(sharded[k], whole[k]) for k in whole), "a shard's images are the whole run's"


def test_folders_of_the_old_shared_noise_are_refused(tmp_path):
    pipe, items = fresh_pipe(), _items()[:2]
    old = {"catalog": CAT.name, "sampler": dataclasses.asdict(FAST), **answers.answer_identity(pipe)}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "identity.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="answer_version"):
        answers.generate(pipe, items, CAT, tmp_path / "old", FAST, identity=answers.answer_identity(pipe),
                         progress=False)  # fmt: skip
    new = answers.generate(pipe, items, CAT, tmp_path / "new", FAST, progress=False)
    manifest = json.loads((new / answers.MANIFEST).read_text())
    assert manifest["answer_version"] == answers.ANSWER_VERSION == 2
    del manifest["answer_version"]
    (new / answers.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="answer-set version 1"):
        answers.load_answer_set(new)
