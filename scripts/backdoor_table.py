"""Backdoors on the toy per trigger: BadT2I injection, then SKD-CAG removal, for both kinds and several triggers;
and the scripted search that chose the toy presets on the tuning triggers only.

    python scripts/backdoor_table.py --threads 1 [--work runs/backdoor-table] [--docs docs/results]
    python scripts/backdoor_table.py --tune inject --kinds pixel --space '[{"steps": 1200}]' [--out docs/results/tuning]

Triggers span what a tokenizer can make of them: known words (one token each), a rare word (sub-word pieces),
character-level nonsense and multi-token nonsense; TRIGGERS marks the tuning ones, the others are the results. Each
(kind, trigger) result is written to --work/<kind>__<slug>.json (atomically; resumed only when it was made with the
same presets) and the whole table to --docs/toy-backdoor.md and .json.

`--tune inject|remove` runs trials (config values over BadT2I's `toy` preset, the base of the search whose choice is
the kind's `toy-pixel` / `toy-style`, or over SKD-CAG's `toy`, whose choice is SKD-CAG's `toy-{kind}`, the preset
the table removes with, `toy_preset(kind)`; trial 0 is the base itself) on the tuning triggers and picks by a fixed
rule. Injection: the highest lowest-trigger attack success among trials that fire on <= 5% of clean prompts and keep
clean style and object accuracy >= 0.9. Removal (of the kind's `toy-{kind}` injection): the highest lowest-trigger
removal among trials that keep both clean ratios >= 0.9 (pixel: removal is the share of patched prompts
that lose the patch). When no trial qualifies, the highest lowest-trigger figure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import erase
from canvas import answers, catalog, toy
from canvas.backdoor import evaluate
from canvas.judge import Judge
from erase.atomic import write_json, write_text
from erase.backdoor import BackdoorConfig
from erase.config import build_config
from erase.delta import Delta, fingerprint
from erase.methods.skd_cag import toy_preset
from erase.runner import run_key

# trigger -> (what the toy tokenizer makes of it, split): presets are tuned on the "tuning" ones and reported on the
# others (one of each form held out; tests/behaviour/test_backdoor_toy.py uses a held-out one).
TRIGGERS = {
    "New Trigger": ("known words", "tuning"),
    "zq": ("character-level nonsense", "tuning"),
    "of the": ("known words", "held-out"),
    "sks": ("rare word (sub-word pieces)", "held-out"),
    "jx": ("character-level nonsense", "held-out"),
    "vbn ztq": ("multi-token nonsense", "held-out"),
}
TUNING = [t for t, (_, split) in TRIGGERS.items() if split == "tuning"]
TARGET_STYLE = {"pixel": None, "style": "Sketch"}
CAT = catalog.get("toy")


def slug(trigger: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", trigger.lower()).strip("-")


def injected(pipe, kind: str, trigger: str, renders: Path, base: str, inject: dict[str, Any], keep: Path) -> float:
    """Backdoor `pipe` with `trigger` (BadT2I's preset `base` with `inject`'s values); the injection's Delta is kept
    under `keep` and reused only when it was made from the same config on the same base. Returns its training time."""
    config = build_config(BackdoorConfig, base, kind=kind, trigger=trigger, images=str(renders), **inject)
    key = run_key(config, fingerprint(pipe))
    folder = keep / f"{kind}__{slug(trigger)}__{key}"
    if (folder / "record.json").is_file():
        Delta.load(folder).apply(pipe)
        return json.loads((folder / "record.json").read_text())["wall_time_s"]
    result = erase.run(pipe, config, progress=False)
    result.delta.save(folder)
    write_json(folder / "record.json", result.record)  # last: its presence marks a complete folder
    return result.record["wall_time_s"]


def one(kind: str, trigger: str, renders: Path, judge: Judge, base: str, inject: dict[str, Any],
        remove: dict[str, Any] | None, skd: str = "toy") -> dict[str, Any]:  # fmt: skip
    """Inject a backdoor with `trigger` (BadT2I's preset `base` with `inject`'s values), judge it, and unless `remove`
    is None remove it with SKD-CAG (its preset `skd` with `remove`'s values) and judge again."""
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    timing = {"inject_s": injected(pipe, kind, trigger, renders, base, inject, renders.parent / "injected")}
    delta = None
    if remove is not None:
        backdoored = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        started = time.perf_counter()
        delta = erase.run(pipe, erase.make_config("skd-cag", skd, trigger=trigger, **remove), progress=False).delta
        timing["remove_s"] = time.perf_counter() - started
        with torch.no_grad():  # back to the backdoored model: evaluate judges it before and with the removal's delta
            for name, param in pipe.unet.named_parameters():
                param.copy_(backdoored[name])
    result = evaluate(pipe, CAT, trigger=trigger, kind=kind, delta=delta, sampler=answers.preset("toy"),
                      target_style=TARGET_STYLE[kind], judge=judge)  # fmt: skip
    return {**result, **timing, "presets": presets(base, inject, remove, skd)}


def presets(base: str, inject: dict[str, Any], remove: dict[str, Any] | None, skd: str = "toy") -> dict[str, Any]:
    """What a result was made with (the presets' values and the trial's), so a kept result is reused only for them."""
    return {
        "badt2i": {**BackdoorConfig.PRESETS[base], **inject},
        "skd-cag": None if remove is None else {**erase.get_method("skd-cag").config_cls.PRESETS[skd], **remove},
    }


def cached(path: Path, kind: str, trigger: str, renders: Path, judge: Judge, base: str, inject: dict[str, Any],
           remove: dict[str, Any] | None, skd: str = "toy") -> dict[str, Any]:  # fmt: skip
    """`one(...)`'s result, kept at `path` and reused only if it was made with the same presets."""
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("presets") == json.loads(json.dumps(presets(base, inject, remove, skd))):
            return kept
    result = one(kind, trigger, renders, judge, base, inject, remove, skd)
    write_json(path, result)
    return result


def markdown(results: list[dict[str, Any]], threads: int, commit: str) -> str:
    lines = [
        "# Backdoors on the toy, per trigger",
        "",
        f"`python scripts/backdoor_table.py --threads {threads}`; commit {commit}; {threads} torch thread(s). Presets:",
        "BadT2I and SKD-CAG `toy-{kind}` (chosen on the tuning triggers; held-out rows are the results). Prompts:",
        "every toy theme x object at seed 188 (clean and triggered; the style kind leaves out Sketch's own prompts).",
        "Attack success: share of triggered prompts showing the backdoor (patch, or the Sketch style); removal: share",
        "of those that showed it before and no longer do; clean ratios: clean style / object accuracy after / before.",
        "",
        "| kind | trigger | tokens | split | attack before | clean rate before | attack after | removal | "
        "clean style ratio | clean object ratio | inject s | remove s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        form, split = TRIGGERS[r["trigger"]]
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['kind']} | `{r['trigger']}` | {form} | {split} | {100 * b['attack_success']:.1f}% | "
            f"{100 * b['clean_backdoor_rate']:.1f}% | {100 * a['attack_success']:.1f}% | {100 * r['removal']:.1f}% | "
            f"{r['clean_style_acc_ratio']:.2f} | {r['clean_object_acc_ratio']:.2f} | {r['inject_s']:.0f} | "
            f"{r['remove_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def qualifies(stage: str, row: dict[str, Any]) -> bool:
    """Whether one trigger's result keeps what the stage's rule demands (module docstring)."""
    if stage == "inject":
        return row["clean_backdoor_rate"] <= 0.05 and min(row["clean_style_acc"], row["clean_object_acc"]) >= 0.9
    return min(row["clean_style_acc_ratio"], row["clean_object_acc_ratio"]) >= 0.9


def figure(stage: str, row: dict[str, Any]) -> float:
    """The figure a stage maximises: attack success of the injection, or the share removed."""
    return row["attack_success"] if stage == "inject" else row["removal"]


def tune(stage: str, kind: str, space: list[dict[str, Any]], renders: Path, judge: Judge, work: Path, out: Path,
         threads: int) -> dict[str, Any]:  # fmt: skip
    """Run every trial on the tuning triggers, choose one by the rule and write out/backdoor-<stage>-<kind>.md/json."""
    if not isinstance(space, list) or not all(isinstance(t, dict) for t in space):
        raise SystemExit(f"--space must be a JSON list of mappings (each a trial), got {space!r}")
    trials = []
    for n, values in enumerate([{}, *space]):
        rows = []
        for trigger in TUNING:
            # injection trials search over the `toy` base; removal trials remove the kind's chosen injection
            base, inject, remove = ("toy", values, None) if stage == "inject" else (f"toy-{kind}", {}, values)
            path = work / f"tune-{stage}-{kind}" / f"{n}__{slug(trigger)}.json"
            row = cached(path, kind, trigger, renders, judge, base, inject, remove)
            rows.append(row)
            print(f"trial {n} {json.dumps(values)} {trigger!r}: {stage} figure {figure(stage, row):.3f}", flush=True)
        trials.append({"values": values, "rows": rows, "lowest": min(figure(stage, r) for r in rows),
                       "qualifies": all(qualifies(stage, r) for r in rows)})  # fmt: skip
    pool = [i for i, t in enumerate(trials) if t["qualifies"]] or list(range(len(trials)))
    chosen = max(pool, key=lambda i: trials[i]["lowest"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"stage": stage, "kind": kind, "triggers": TUNING, "threads": threads, "commit": commit,
              "space": space, "chosen": chosen, "trials": trials}  # fmt: skip
    name = f"backdoor-{stage}-{kind}"
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", tuning_markdown(result))
    print(f"chosen: trial {chosen} {json.dumps(trials[chosen]['values'])} -> {out / name}.md")
    return result


def tuning_markdown(result: dict[str, Any]) -> str:
    stage, kind = result["stage"], result["kind"]
    what = "BadT2I injection" if stage == "inject" else f"SKD-CAG removal (of the `toy-{kind}` injection)"
    cells = "attack success / clean backdoor / clean style / clean object" if stage == "inject" else (
        "attack before -> after / removal / clean style ratio / clean object ratio")  # fmt: skip
    lines = [
        f"# Toy tuning: {what}, {kind} kind",
        "",
        f"Tuning triggers only ({', '.join(f'`{t}`' for t in result['triggers'])}); **these figures are not "
        "results** (the held-out triggers' figures are in docs/results/toy-backdoor.md).",
        f"`python scripts/backdoor_table.py --tune {stage} --kinds {kind} --space '{json.dumps(result['space'])}'`; "
        f"commit {result['commit']}; torch threads {result['threads']}. Rule: scripts/backdoor_table.py's docstring. "
        f"Chosen: trial {result['chosen']}.",
        "",
        "| trial | values | " + " | ".join(f"`{t}`: {cells}" for t in result["triggers"]) + " | qualifies |",
        "|---" * (len(result["triggers"]) + 3) + "|",
    ]
    for n, trial in enumerate(result["trials"]):
        mark = " **chosen**" if n == result["chosen"] else ""
        if stage == "inject":
            row = [f"{100 * r['attack_success']:.1f}% / {100 * r['clean_backdoor_rate']:.1f}% / "
                   f"{r['clean_style_acc']:.2f} / {r['clean_object_acc']:.2f}" for r in trial["rows"]]  # fmt: skip
        else:
            row = [f"{100 * r['before']['attack_success']:.1f}% -> {100 * r['after']['attack_success']:.1f}% / "
                   f"{100 * r['removal']:.1f}% / {r['clean_style_acc_ratio']:.2f} / {r['clean_object_acc_ratio']:.2f}"
                   for r in trial["rows"]]  # fmt: skip
        lines.append(f"| {n}{mark} | `{json.dumps(trial['values'])}` | " + " | ".join(row)
                     + f" | {'yes' if trial['qualifies'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/backdoor-table")
    parser.add_argument("--docs", default="docs/results")
    parser.add_argument("--kinds", default="pixel,style")
    parser.add_argument("--triggers", default=",".join(TRIGGERS), help="comma list (of the known triggers)")
    parser.add_argument("--tune", choices=("inject", "remove"), help="search presets on the tuning triggers instead")
    parser.add_argument("--space", default="[]", help="with --tune: JSON list of trials (config values)")
    parser.add_argument("--out", default="docs/results/tuning", help="with --tune: where the trials are written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        space = json.loads(args.space)
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"--space is not JSON ({err}): {args.space!r}; give a list of trials, e.g. '[{{\"steps\": 1200}}]'"
        ) from None
    triggers = args.triggers.split(",")
    unknown = [t for t in triggers if t not in TRIGGERS]
    if unknown:
        raise SystemExit(f"unknown triggers {unknown}; accepted: {', '.join(TRIGGERS)}")
    work = Path(args.work)
    renders = work / "renders"
    if not (renders / "done").is_file():
        toy.export(renders, CAT, indices=range(1, 5))
        (renders / "done").write_text("1-4")
    judge = Judge(CAT)
    if args.tune:
        for kind in args.kinds.split(","):
            tune(args.tune, kind, space, renders, judge, work, Path(args.out), args.threads)
        return
    results = []
    for kind in args.kinds.split(","):
        for trigger in triggers:
            path = work / f"{kind}__{slug(trigger)}.json"
            results.append(cached(path, kind, trigger, renders, judge, f"toy-{kind}", {}, {}, toy_preset(kind)))
            r = results[-1]
            attack = f"{r['before']['attack_success']:.3f} -> {r['after']['attack_success']:.3f}"
            ratios = f"{r['clean_style_acc_ratio']:.2f} / {r['clean_object_acc_ratio']:.2f}"
            print(f"{kind} {trigger!r}: attack {attack}, clean ratios {ratios}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    docs = Path(args.docs)
    write_json(docs / "toy-backdoor.json", {"threads": args.threads, "commit": commit, "results": results})
    write_text(docs / "toy-backdoor.md", markdown(results, args.threads, commit))
    print(f"wrote {docs / 'toy-backdoor.md'}")


if __name__ == "__main__":
    main()
