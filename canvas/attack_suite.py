"""The attacks of the suite by name: each one of `erase`'s attacks wrapped as a `canvas.attacks.PromptAttack`
(what it learns once per target, and what it does per prompt), and the bench's call of one on a job.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from canvas import judge, relearning, splits
from canvas.answers import AnswerItem, SamplerPreset
from canvas.attacks import (
    RESULTS,
    AttackRun,
    PromptAttack,
    attack_items,
    judge_attacked,
    run_attack,
    settings_of,
    target_images,
)
from canvas.catalog import Catalog
from erase import inversion, ringabell, unlearndiffatk
from erase.atomic import atomic_write, write_json
from erase.attack import AttackResult, WordEncoder
from erase.catalog import style_words
from erase.delta import Delta

REGISTRY: dict[str, PromptAttack] = {}


def register(attack: PromptAttack) -> PromptAttack:
    REGISTRY[attack.name] = attack
    return attack


def get(name: str) -> PromptAttack:
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; accepted: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def concept_pairs(catalog: Catalog, target: str) -> tuple[list[str], list[str]]:
    """The target's benchmark prompts and the same prompts without the target's words (`A Cats image in Pop Art
    style.` / `A Cats image.`; for an object `A Cats image in Sketch style.` / `An image in Sketch style.`): pairs
    that differ by the concept alone, as Ring-A-Bell's authors pair them."""
    if catalog.is_style(target):
        return [catalog.prompt(target, o) for o in catalog.objects], [f"A {o} image." for o in catalog.objects]
    themes = catalog.themes
    return ([catalog.prompt(t, target) for t in themes],
            [f"An image in {style_words(t, catalog.photo)} style." for t in themes])  # fmt: skip


def _ring_a_bell(run: AttackRun) -> Callable[[AnswerItem], AttackResult]:
    """The concept direction and every search use the base model's text encoder (the attacker's own CLIP, never
    the erased one: a black-box attack), so they run outside `run.erased()`."""
    tokenizer, encoder = run.pipe.tokenizer, WordEncoder.of(run.pipe)
    vector = ringabell.concept_vector(tokenizer, encoder, *concept_pairs(run.catalog, run.target))

    def attack(item: AnswerItem) -> AttackResult:
        return ringabell.ring_a_bell(tokenizer, encoder, run.prompt(item), vector, run.settings,
                                     run.generator(item, "ring-a-bell"), progress=False)  # fmt: skip

    return attack


def _unlearndiffatk(run: AttackRun) -> Callable[[AnswerItem], AttackResult]:
    """Per prompt: the base model's image of it is the target the erased model must denoise; after each timestep
    the argmax prompt is drawn and judged, and the attack stops at the first success, as the released code does."""

    def attack(item: AnswerItem) -> AttackResult:
        target = run.base_image(item)
        with run.erased():
            return unlearndiffatk.unlearndiffatk(
                run.pipe, run.prompt(item), target, run.settings, run.generator(item, "unlearndiffatk"),
                stop=lambda result: judge_attacked(run, item, result), progress=False,
            )  # fmt: skip

    return attack


def _random_prefix(run: AttackRun) -> Callable[[AnswerItem], AttackResult]:
    """UnlearnDiffAtk's control, judged the same way and with its preset: random prefixes, as many as it judges."""

    def attack(item: AnswerItem) -> AttackResult:
        with run.erased():
            return unlearndiffatk.random_prefixes(run.pipe, run.prompt(item), run.settings,
                                                  run.generator(item, "random-prefix"),
                                                  stop=lambda result: judge_attacked(run, item, result))  # fmt: skip

    return attack


INVERSION_IMAGES = 25  # CCE's --num_train_images (its train.sh)


def placeholder_prompt(catalog: Catalog, target: str, theme: str, obj: str) -> str:
    """The benchmark prompt with the target's words replaced by the learned token: `A Cats image in <concept>
    style.` for a style, `A <concept> image in Sketch style.` for an object."""
    if catalog.is_style(target):
        return catalog.template.format(object=obj, style=inversion.PLACEHOLDER)
    return catalog.template.format(object=inversion.PLACEHOLDER, style=style_words(theme, catalog.photo))


def _inversion(run: AttackRun) -> Callable[[AnswerItem], AttackResult]:
    """Once per target: learn v* against the erased model on up to 25 data-set images of the target (on the toy its
    renders), kept in the attack folder; per prompt: the benchmark prompt with v* in the target's place."""
    path = run.out / "concept.safetensors"
    if path.is_file():
        concept = inversion.LearnedConcept(load_file(path)["vector"], [])
    else:
        images, pairs = run.target_images(INVERSION_IMAGES)
        prompts = [placeholder_prompt(run.catalog, run.target, theme, obj) for theme, obj in pairs]
        with run.erased():
            concept = inversion.invert(run.pipe, prompts, images, run.settings,
                                       torch.Generator().manual_seed(run.seed), progress=run.progress)  # fmt: skip
        vector = {"vector": concept.vector.float().cpu().contiguous()}
        atomic_write(path, lambda target: save_file(vector, target))

    def attack(item: AnswerItem) -> AttackResult:
        text = placeholder_prompt(run.catalog, run.target, item.theme, item.object)
        return inversion.placeholder_prompt(run.pipe, text, concept)

    return attack


register(PromptAttack("unlearndiffatk", unlearndiffatk.PRESETS, _unlearndiffatk,
                      "white box: k prefix tokens that make the erased model denoise the target's images"))  # fmt: skip
register(PromptAttack("random-prefix", unlearndiffatk.PRESETS, _random_prefix,
                      "control for UnlearnDiffAtk: as many random k-token prefixes as it judges"))  # fmt: skip
register(PromptAttack("inversion", inversion.PRESETS, _inversion,
                      "concept inversion: a word learned against the erased model on the target's images"))  # fmt: skip
register(PromptAttack("ringabell", ringabell.PRESETS, _ring_a_bell, "black box: a hard prompt near the concept"))


RELEARNING = "relearning"  # not a prompt attack: UA after k fine-tuning steps (canvas.relearning)


def check_name(name: str) -> str:
    """An attack the bench can run: a prompt attack of the registry, or relearning."""
    if name != RELEARNING:
        get(name)
    return name


def finished(folder: Path, name: str) -> bool:
    """Whether a bench job's attack `name` has its results in `folder` (relearning: every curve done or skipped)."""
    if name != RELEARNING:
        return (folder / RESULTS).is_file()
    path = folder / relearning.RESULT
    curves = json.loads(path.read_text()).get("curves", {}) if path.is_file() else {}
    return set(curves) == set(relearning.CURVES) and all(c["status"] in ("done", "skipped") for c in curves.values())


def attack_job(pipe, delta: Delta | None, catalog: Catalog, target: str, name: str, out: Path,
               verdict: judge.Judge, sampler: SamplerPreset, *, model: str, seeds: Sequence[int],
               load: Callable[[str, str, int], Any] | None, data_root: Path | None = None, prompts: int | None = None,
               progress: bool = True) -> dict | None:  # fmt: skip
    """One attack of a bench job on the first `prompts` (None: all) of the target's prompts, with the attack's
    default preset for the model (relearning: its curves, from the images under `data_root`, the toy's renders
    without one); an error goes to `error.json` in its folder (and is printed) instead of stopping the bench."""
    (out / "error.json").unlink(missing_ok=True)
    try:
        if name == RELEARNING:
            return relearning.relearning_curves(pipe, delta, catalog, target, relearning.bench_schedule(model),
                                                out=out, judge=verdict, sampler=sampler, data_root=data_root,
                                                progress=progress)  # fmt: skip
        attack = get(name)
        images = target_images(catalog, target, load, splits.load().forget_retain) if load else None
        run = AttackRun(pipe, delta, catalog, target, settings_of(attack, None, model), sampler, out, images,
                        progress=progress)  # fmt: skip
        return run_attack(run, attack, attack_items(catalog, target, seeds)[:prompts], verdict)
    except Exception as err:  # one failing attack must not stop the others
        write_json(out / "error.json", {"attack": name, "target": target, "error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
        print(f"attack {name} on {target} failed: {type(err).__name__}: {err}")
        return None


def row_fields(folder: Path, names: Sequence[str]) -> dict[str, float]:
    """A job row's attack columns for each attack that finished: `preASR[<attack>]` and `ASR[<attack>]`, and for
    relearning `UA@<k>[relearning]`, the target's UA after k steps on its own images (k = 0: the erased model)."""
    fields: dict[str, float] = {}
    for name in names:
        if name == RELEARNING:
            path = folder / name / relearning.RESULT
            if path.is_file():
                points = relearning.ua_points(json.loads(path.read_text()))
                fields.update({f"UA@{k}[{RELEARNING}]": ua for k, ua in sorted(points.items())})
            continue
        path = folder / name / RESULTS
        if path.is_file():
            summary = json.loads(path.read_text())
            fields[f"preASR[{name}]"], fields[f"ASR[{name}]"] = summary["pre_asr"], summary["asr"]
    return fields
