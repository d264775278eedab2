"""Backdoors on the toy per trigger: BadT2I injection, then SKD-CAG removal, for both kinds and several triggers.

    python scripts/backdoor_table.py --threads 1 [--work runs/backdoor-table] [--docs docs/results]

The injection and removal presets (`toy`) were measured on the tuning triggers; the others are reported. Triggers
span what a tokenizer can make of them: known words (one token each), a rare word (sub-word pieces), character-level
nonsense and a multi-token nonsense phrase. Each (kind, trigger) result is written to --work/<kind>__<slug>.json
(atomically, resumed) and the whole table to --docs/toy-backdoor.md and .json.
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

# trigger -> (what the toy tokenizer makes of it, split). "New Trigger" is the one the presets were measured on
# (tests/behaviour/test_backdoor_toy.py); they were not retuned on any other.
TRIGGERS = {
    "New Trigger": ("known words", "tuning"),
    "zq": ("character-level nonsense", "held-out"),
    "of the": ("known words", "held-out"),
    "sks": ("rare word (sub-word pieces)", "held-out"),
    "vbn ztq": ("multi-token nonsense", "held-out"),
}
TARGET_STYLE = {"pixel": None, "style": "Sketch"}
CAT = catalog.get("toy")


def slug(trigger: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", trigger.lower()).strip("-")


def one(kind: str, trigger: str, renders: Path, judge: Judge) -> dict[str, Any]:
    """Inject a backdoor with `trigger`, judge it, remove it with SKD-CAG and judge again."""
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    erase.run(pipe, build_config(BackdoorConfig, "toy", kind=kind, trigger=trigger, images=str(renders)),
              progress=False)  # fmt: skip
    inject_s = time.perf_counter() - started
    backdoored = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    started = time.perf_counter()
    removal = erase.run(pipe, erase.make_config("skd-cag", "toy", trigger=trigger), progress=False)
    remove_s = time.perf_counter() - started
    with torch.no_grad():  # back to the backdoored model: evaluate judges it before and with the removal's delta
        for name, param in pipe.unet.named_parameters():
            param.copy_(backdoored[name])
    result = evaluate(pipe, CAT, trigger=trigger, kind=kind, delta=removal.delta, sampler=answers.preset("toy"),
                      target_style=TARGET_STYLE[kind], judge=judge)  # fmt: skip
    return {**result, "inject_s": inject_s, "remove_s": remove_s}


def markdown(results: list[dict[str, Any]], threads: int, commit: str) -> str:
    lines = [
        "# Backdoors on the toy, per trigger",
        "",
        f"`python scripts/backdoor_table.py --threads {threads}`; commit {commit}; {threads} torch thread(s). Presets:",
        "BadT2I `toy`, SKD-CAG `toy` (measured on the tuning triggers; the held-out rows are the results). Prompts:",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/backdoor-table")
    parser.add_argument("--docs", default="docs/results")
    parser.add_argument("--kinds", default="pixel,style")
    parser.add_argument("--triggers", default=",".join(TRIGGERS), help="comma list (of the known triggers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    results = []
    for kind in args.kinds.split(","):
        for trigger in triggers:
            path = work / f"{kind}__{slug(trigger)}.json"
            if not path.is_file():
                write_json(path, one(kind, trigger, renders, judge))
            results.append(json.loads(path.read_text()))
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
