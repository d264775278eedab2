"""The attack suite's own machinery (canvas.attacks), with stand-in attacks on the toy: that attacked conditions are
what the erased model is drawn with, that ASR counts as UnlearnDiffAtk counts, and that folders resume and refuse."""

from __future__ import annotations

import json

import pytest
import torch

import erase
from canvas import answers, attack_suite, attacks, bench, catalog, judge, toy
from erase.attack import AttackResult, prompt_ids, word_embedding
from tests.unit.helpers import save_tiny

CAT = catalog.get("toy")


def hard_prompt(pipe, text: str) -> AttackResult:
    """An 'attacked' prompt that is just `text`, in the form every attack returns."""
    ids = prompt_ids(pipe.tokenizer, text)
    embeds = word_embedding(pipe.text_encoder).weight[ids].detach()
    return AttackResult(embeds[:, :0], ids, embeds, [1.0, 0.5], None, text)


def stand_in(name: str, pick_prompt, prepared: list[str]) -> attacks.PromptAttack:
    def prepare(run: attacks.AttackRun):
        prepared.append(run.target)
        return lambda item: hard_prompt(run.pipe, pick_prompt(item))

    return attacks.PromptAttack(name, {"paper": {"k": 1}}, prepare)


@pytest.fixture(scope="module")
def toy_run_parts():
    torch.manual_seed(0)
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe, judge.Judge(CAT), answers.preset("toy")


def make_run(pipe, sampler, out, target="Bricks", settings=None):
    return attacks.AttackRun(pipe, None, CAT, target, settings or {"k": 1}, sampler, out, progress=False)


def test_attacked_conditions_are_what_the_model_draws(tmp_path, toy_run_parts):
    """Swapping each Bricks prompt for the same object in Pop Art style must take the judge's Bricks verdict away on
    the attacked images, while the plain images keep it: the attacked condition, not the plain prompt, was drawn."""
    pipe, verdict, sampler = toy_run_parts
    items = attacks.attack_items(CAT, "Bricks", [188])
    assert len(items) == len(CAT.objects)
    items = items[:4]
    swap = stand_in("swap", lambda it: CAT.prompt("Pop_Art", it.object), [])
    summary = attacks.run_attack(make_run(pipe, sampler, tmp_path), swap, items, verdict)
    pre = sum(r["pre"] for r in summary["rows"])
    post = sum(r["post"] for r in summary["rows"])
    assert summary["prompts"] == len(items)
    assert pre >= 3 and post == 0, (pre, post)  # the toy draws its styles reliably (test_toy_quality)
    assert summary["pre_asr"] == 100.0 * pre / len(items)
    assert (tmp_path / "grid.png").is_file()


def test_an_unchanged_prompt_attack_keeps_every_verdict_and_resumes(tmp_path, toy_run_parts):
    pipe, verdict, sampler = toy_run_parts
    items = attacks.attack_items(CAT, "Cats", [188])[:4]
    prepared: list[str] = []
    same = stand_in("same", lambda it: CAT.prompt(it.theme, it.object), prepared)
    first = attacks.run_attack(make_run(pipe, sampler, tmp_path, "Cats"), same, items, verdict)
    assert [r["pre"] for r in first["rows"]] == [r["post"] for r in first["rows"]]
    assert first["asr"] == first["pre_asr"]
    assert len(attacks.attack_items(CAT, "Cats", [188, 288])) == 2 * len(CAT.themes)
    assert prepared == ["Cats"]
    # every prompt is on disk: a rerun prepares nothing and reads the same rows
    again = attacks.run_attack(make_run(pipe, sampler, tmp_path, "Cats"), same, items, verdict)
    assert prepared == ["Cats"] and again == first
    # one prompt's files gone: only it is redone
    stem = items[2].filename.rsplit(".", 1)[0]
    (tmp_path / "images" / f"{stem}_attacked.png").unlink()
    attacks.run_attack(make_run(pipe, sampler, tmp_path, "Cats"), same, items, verdict)
    assert prepared == ["Cats", "Cats"]
    assert json.loads((tmp_path / "results.json").read_text()) == first
    stored = attacks.load_attacked(tmp_path, items[0])
    assert torch.equal(stored.ids, prompt_ids(pipe.tokenizer, CAT.prompt(items[0].theme, items[0].object)))


def test_a_folder_of_other_settings_is_refused(tmp_path, toy_run_parts):
    pipe, verdict, sampler = toy_run_parts
    items = attacks.attack_items(CAT, "Cats", [188])[:1]
    same = stand_in("same", lambda it: CAT.prompt(it.theme, it.object), [])
    attacks.run_attack(make_run(pipe, sampler, tmp_path, "Cats"), same, items, verdict)
    with pytest.raises(ValueError):
        attacks.run_attack(make_run(pipe, sampler, tmp_path, "Cats", settings={"k": 2}), same, items, verdict)


def test_asr_counts_the_prompts_seen_before_or_after_the_attack():
    rows = [{"pre": True, "post": False}, {"pre": False, "post": True}, {"pre": False, "post": False},
            {"pre": True, "post": True}]  # fmt: skip
    assert attacks.asr(rows) == (50.0, 75.0)
    with pytest.raises(ValueError, match="no attacked prompts"):
        attacks.asr([])


def test_conditions_answer_attacked_keys_and_encode_the_rest(toy_run_parts):
    pipe = toy_run_parts[0]
    vector = torch.randn(1, 77 if pipe.tokenizer.model_max_length == 77 else pipe.tokenizer.model_max_length,
                         pipe.text_encoder.config.hidden_size)  # fmt: skip
    encode = attacks.Conditions(pipe, {"\x00key": vector})
    both = encode(["\x00key", ""])
    assert torch.equal(both[0], vector[0])
    with torch.no_grad():
        empty = pipe.text_encoder(prompt_ids(pipe.tokenizer, ""))[0]
    assert torch.allclose(both[1], empty[0])


def test_target_images_walk_the_targets_pairs():
    images = attacks.target_images(CAT, "Bricks", toy.render, [1, 2])
    batch, pairs = images(3)
    assert batch.shape == (3, 3, 32, 32) and pairs == [("Bricks", o) for o in CAT.objects[:3]]
    assert torch.equal(batch[0], judge.to_unit_tensor([toy.render("Bricks", CAT.objects[0], 1)])[0])
    assert images(100)[0].shape[0] == 2 * len(CAT.objects)  # all there are
    with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
        images(0)


def test_bad_attack_names_and_presets_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attack_suite.get("nope")
    same = stand_in("same", lambda it: "", [])
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        attacks.settings_of(same, "fast", "toy")
    assert attacks.settings_of(same, None, "toy") == {"k": 1}  # no toy preset: paper


def test_the_bench_adds_attack_columns_and_a_failing_attack_loses_nothing(tmp_path, monkeypatch):
    """`canvas bench --attacks`: a finished bench gains the columns without erasing again; an attack that fails is
    recorded in its folder while the job's scores and the other attacks stay."""
    model = save_tiny(tmp_path / "model")
    monkeypatch.setitem(attack_suite.REGISTRY, "same", stand_in("same", lambda it: CAT.prompt(it.theme, it.object), []))

    def broken(run):
        raise RuntimeError("broken attack")

    monkeypatch.setitem(attack_suite.REGISTRY, "broken", attacks.PromptAttack("broken", {"paper": {}}, broken))

    def config(names):
        return bench.BenchConfig(methods=["esd"], targets=["Sketch"], out=str(tmp_path / "bench"), model=str(model),
                                 catalog="toy", sampler="toy", seeds=[188], presets={"esd": "paper"},
                                 overrides={"esd": {"steps": 2, "ddim_steps": 2}}, batch_size=64,
                                 attacks=names)  # fmt: skip

    bench.Bench(config([]), progress=False).run()
    erased = []
    real_run = erase.run
    monkeypatch.setattr(erase, "run", lambda *a, **k: erased.append(1) or real_run(*a, **k))
    result = bench.Bench(config(["broken", "same"]), progress=False).run()
    assert not erased, "a finished job must not erase again for its attacks"
    (row,) = result["rows"]
    assert row["UA"] is not None and "ASR[broken]" not in row
    assert row["ASR[same]"] == row["preASR[same]"]  # the unchanged prompt: the same verdicts
    job = tmp_path / "bench" / "jobs" / "esd__Sketch" / "attacks"
    assert "broken attack" in json.loads((job / "broken" / "error.json").read_text())["error"]
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## Attacks" in report and "same pre-ASR" in report and "broken" not in report
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        config(["nope"])
