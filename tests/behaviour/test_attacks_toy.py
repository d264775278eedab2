"""The attacks are attacks, not noise: run on the unedited toy, each keeps the judge's verdict where it was.

On the base model a held-out style's prompts all show the style (pre-ASR 100: the toy draws its styles reliably,
test_toy_quality). An attack that works by finding a prompt the model denoises the target's images well with (or
a word learned on them) must leave that so: the attacked images of at least 3 of the 4 prompts still show the style
(one may drift, the toy's sampling noise). A broken attack that scrambles prompts would fail this; whether attacks
bring an erased style back is checked per method in test_erasure_toy.py (ATTACKS).
"""

import pytest

import erase
from canvas import answers, attack_suite, attacks, catalog, splits, toy
from canvas.judge import Judge

pytestmark = pytest.mark.slow

CAT = catalog.get("toy")
TARGET = "Crayon"
PROMPTS = 4


@pytest.mark.parametrize("name", ["unlearndiffatk", "inversion"])
def test_an_attack_on_the_base_model_keeps_the_target(tmp_path, name):
    assert splits.target_split(CAT, TARGET) == splits.HELD_OUT
    pipe = erase.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    attack = attack_suite.get(name)
    images = attacks.target_images(CAT, TARGET, toy.render, splits.load().forget_retain)
    run = attacks.AttackRun(pipe, None, CAT, TARGET, attacks.settings_of(attack, None, "toy"), answers.preset("toy"),
                            tmp_path, images, progress=False)  # fmt: skip
    summary = attacks.run_attack(run, attack, attacks.attack_items(CAT, TARGET, [188])[:PROMPTS], Judge(CAT))
    post = sum(r["post"] for r in summary["rows"])
    print(name, summary["pre_asr"], post, [r["attacked"] for r in summary["rows"]])
    assert summary["pre_asr"] == 100.0, summary["rows"]
    assert post >= PROMPTS - 1, summary["rows"]
