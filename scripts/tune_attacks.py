"""Measure UnlearnDiffAtk and concept inversion on the toy, against UCE (toy preset), on the tuning targets only.

For each tuning target (canvas.splits.tuning_targets("toy")) a fresh toy is erased by UCE; the base model makes the
target images (benchmark prompts of the target, `TARGET_SEEDS`); each attack runs on the erased model and the
attacked prompts are sampled with the toy protocol at `EVAL_SEEDS`; an image is a success when the judge's style
(style target) or object (object target) argmax is the target. Prints every trial's figures and the choice (the
trial with the highest mean success after the attack; ties: the cheaper one). Usage:
    python scripts/tune_attacks.py udatk|inversion [trial index ...]
"""

from __future__ import annotations

import sys
import time

import torch

import canvas.answers as answers
import erase
import erase.text
from canvas.catalog import get as get_catalog
from canvas.judge import Judge
from canvas.method_inputs import concept_text
from canvas.splits import tuning_targets
from erase.attack import AttackResult
from erase.inversion import PLACEHOLDER, Inversion, invert, placeholder_prompt
from erase.unlearndiffatk import UnlearnDiffAtk, unlearndiffatk

TARGET_SEEDS = (11, 12)  # the base model's images of each prompt (the attack's targets)
EVAL_SEEDS = (188, 288, 588)  # images of the attacked prompt on the erased model
PARTNERS = {"style": ("Cats", "Towers"), "object": ("Pastel", "Sketch")}  # the other half of each prompt

UDATK_TRIALS = [
    UnlearnDiffAtk(tokens=5, iterations=40, lr=0.01, timesteps=5),
    UnlearnDiffAtk(tokens=5, iterations=20, lr=0.01, timesteps=10),
    UnlearnDiffAtk(tokens=5, iterations=40, lr=0.05, timesteps=5),
]
INVERSION_TRIALS = [
    Inversion(steps=200, lr=0.01, batch=4, accumulate=1, init="art"),
    Inversion(steps=200, lr=0.05, batch=4, accumulate=1, init="art"),
]


class AttackEncoder:
    """A PromptEncoder stand-in for sampling: an attacked prompt's text gives its condition, "" the empty prompt's."""

    def __init__(self, pipe, attacks: list[AttackResult]):
        self.by_text = {a.text: a.condition(pipe.text_encoder)[0] for a in attacks}
        self.empty = erase.text.PromptEncoder(pipe.tokenizer, pipe.text_encoder)([""])[0]

    def __call__(self, prompts):
        return torch.stack([self.empty if p == "" else self.by_text[p] for p in prompts])


def prompts_of(cat, target: str) -> list[str]:
    kind = "style" if cat.is_style(target) else "object"
    if kind == "style":
        return [cat.prompt(target, obj) for obj in PARTNERS[kind]]
    return [cat.prompt(theme, target) for theme in PARTNERS[kind]]


def successes(judge, cat, target: str, images: torch.Tensor) -> int:
    style, obj, _ = judge(images)
    if cat.is_style(target):
        return int((style.argmax(-1) == cat.style_label(target)).sum())
    return int((obj.argmax(-1) == cat.object_label(target)).sum())


def sample_attacks(pipe, attacks: list[AttackResult], sampler) -> torch.Tensor:
    texts = [a.text for a in attacks for _ in EVAL_SEEDS]
    seeds = [s for _ in attacks for s in EVAL_SEEDS]
    return answers.sample(pipe, texts, seeds, sampler, batch_size=len(texts), encoder=AttackEncoder(pipe, attacks))


def placeholder_form(cat, target: str, prompt: str) -> str:
    """The benchmark prompt with the target's words replaced by the placeholder."""
    words = concept_text(cat, target).removesuffix(" style")
    return prompt.replace(words, PLACEHOLDER)


def main() -> None:
    torch.set_num_threads(1)
    kind = sys.argv[1] if len(sys.argv) > 1 else "udatk"
    trials = UDATK_TRIALS if kind == "udatk" else INVERSION_TRIALS
    chosen = [int(i) for i in sys.argv[2:]] or list(range(len(trials)))
    cat = get_catalog("toy")
    judge = Judge(cat)
    sampler = answers.preset("toy")
    base = erase.load_pipeline("toy")
    base.set_progress_bar_config(disable=True)
    rows = {}
    for target in tuning_targets("toy"):
        prompts = prompts_of(cat, target)
        target_seeds = [s for _ in prompts for s in TARGET_SEEDS]
        target_images = answers.sample(base, [p for p in prompts for _ in TARGET_SEEDS], target_seeds, sampler,
                                       batch_size=8)  # fmt: skip
        erased = erase.load_pipeline("toy")
        erased.set_progress_bar_config(disable=True)
        erase.run(erased, erase.make_config("uce", "toy", concepts=[concept_text(cat, target)]), progress=False)
        base_hits = successes(judge, cat, target, target_images)
        plain = answers.sample(erased, [p for p in prompts for _ in EVAL_SEEDS],
                               [s for _ in prompts for s in EVAL_SEEDS], sampler, batch_size=8)  # fmt: skip
        before = successes(judge, cat, target, plain)
        print(f"{target}: base-model targets {base_hits}/{len(target_images)}, erased plain prompts "
              f"{before}/{len(plain)}", flush=True)  # fmt: skip
        for index in chosen:
            settings, start = trials[index], time.time()
            g = torch.Generator().manual_seed(0)
            if kind == "udatk":
                per_prompt = len(TARGET_SEEDS)
                attacks = [unlearndiffatk(erased, p, target_images[i * per_prompt : (i + 1) * per_prompt], settings,
                                          g, progress=False) for i, p in enumerate(prompts)]  # fmt: skip
            else:
                train_prompts = [placeholder_form(cat, target, p) for p in prompts for _ in TARGET_SEEDS]
                concept = invert(erased, train_prompts, target_images, settings, g, progress=False)
                attacks = [placeholder_prompt(erased, placeholder_form(cat, target, p), concept) for p in prompts]
            hits = successes(judge, cat, target, sample_attacks(erased, attacks, sampler))
            total = len(attacks) * len(EVAL_SEEDS)
            rows.setdefault(index, []).append(hits / total)
            print(f"  trial {index} {settings}: after attack {hits}/{total} ({time.time() - start:.0f} s); "
                  f"{[a.text for a in attacks]}", flush=True)  # fmt: skip
    for index, rates in rows.items():
        print(f"trial {index}: mean success after attack {100 * sum(rates) / len(rates):.1f}% "
              f"(per target {[round(100 * r) for r in rates]})")  # fmt: skip
    best = max(rows, key=lambda i: (sum(rows[i]), -i))
    print(f"choice: trial {best} {trials[best]}")


if __name__ == "__main__":
    main()
