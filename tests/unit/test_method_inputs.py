"""The bench's per-method inputs build valid configs for style and object targets on the toy catalog."""

import pytest
from transformers import CLIPTokenizer

import erase
from canvas import catalog, toy
from canvas.method_inputs import INPUTS, method_inputs
from erase.methods import seot
from erase.paths import toy_path
from erase.testing import word_tokenizer

CAT = catalog.get("toy")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return toy.export(tmp_path_factory.mktemp("data"), CAT, indices=range(1, 4))


@pytest.mark.parametrize(
    "method", ["esd", "uce", "fmn", "ca", "salun", "erasediff", "scissorhands", "speed", "mace", "rece"]
)
@pytest.mark.parametrize("target", ["Pop_Art", "Cats"])
def test_inputs_make_valid_configs(method, target, data_root):
    values = method_inputs(method, CAT, target, data_root)
    presets = erase.get_method(method).config_cls.PRESETS
    kind = "object" if target == "Cats" else "style"
    preset = next((p for p in (f"toy-{kind}", "toy") if p in presets), None)  # as the bench picks (job_preset)
    config = erase.make_config(method, preset, **values)
    if method == "fmn":
        prompt = config.prompt_pairs()[0][1]
        assert prompt in {CAT.prompt(t, o) for t in CAT.themes for o in CAT.objects}
        assert len(config.images) == (8 if target == "Pop_Art" else 11)
    if method in ("salun", "erasediff", "scissorhands"):
        assert len(values["forget_images"]) == len(values["forget_prompts"]) == len(values["pseudo_prompts"])
        assert all("Pop_Art" in f for f in values["forget_images"]) == (target == "Pop_Art")
        assert any("/Pop_Art/" in f for f in values["retain_images"]) == (target != "Pop_Art")
    if method == "speed":  # priors: every other style and object, named as the concept is
        others = [t for t in (*CAT.styles, *CAT.objects) if t != target]
        assert config.prior_prompts() == [method_inputs("uce", CAT, t, None)["concepts"][0] for t in others]


def test_concept_words():
    # UnlearnCanvas's spelling, on the toy too: `{Style} Style`; ESD objects `An image of {Object}.`
    # (mu_erasing_concepts_esd)
    for cat, style in ((CAT, "Pop_Art"), (catalog.get("unlearncanvas-50"), "Van_Gogh")):
        assert method_inputs("esd", cat, style, None) == {"concepts": [f"{style.replace('_', ' ')} style"]}
        assert method_inputs("esd", cat, "Cats", None) == {"concepts": ["An image of Cats."]}
        assert method_inputs("uce", cat, "Cats", None) == {"concepts": ["Cats"]}
    assert method_inputs("ca", CAT, "Pop_Art", None)["concepts"] == ["Pop Art"]
    # SPM: UnlearnCanvas's recipe names the target by its folder name (configs/<target>/prompt.yaml); the toy keeps
    # the short forms its text encoder learned.
    unlearncanvas = catalog.get("unlearncanvas-50")
    assert method_inputs("spm", unlearncanvas, "Van_Gogh", None) == {"concepts": ["Van_Gogh"]}
    assert method_inputs("spm", unlearncanvas, "Cats", None) == {"concepts": ["Cats"]}
    assert method_inputs("spm", CAT, "Pop_Art", None) == {"concepts": ["Pop Art style"]}
    assert method_inputs("spm", CAT, "Cats", None) == {"concepts": ["Cats"]}


def test_every_registered_method_has_benchmark_inputs():
    assert set(erase.available_methods()) <= set(INPUTS)


def test_given_values_win_and_unknown_methods_are_named():
    assert method_inputs("esd", CAT, "Pop_Art", None, {"concepts": ["mine"]}) == {"concepts": ["mine"]}
    with pytest.raises(ValueError, match="'nope' has no benchmark inputs"):
        method_inputs("nope", CAT, "Pop_Art", None)


def _answer_prompts(cat, target):
    """The answer-set prompts of `target`'s own images (its theme with every object, or its object in every theme)."""
    if cat.is_style(target):
        return [cat.prompt(target, o) for o in cat.objects]
    return [cat.prompt(t, target) for t in cat.themes]


def test_seot_finds_its_concept_in_every_answer_prompt_of_its_target():
    """SEOT does nothing where its concept's tokens are not found, so a spelling mismatch between method_inputs and
    the benchmark prompt would silently erase nothing: check every target of the toy with the toy's own tokenizer,
    and the UnlearnCanvas catalog with a tokenizer that knows its words whole (as CLIP's knows most)."""
    uc = catalog.get("unlearncanvas-60")
    words = {w.lower() for text in (*uc.prompts(), *map(str, uc.objects)) for w in text.rstrip(".").split()}
    cases = [(CAT, CLIPTokenizer.from_pretrained(toy_path() / "tokenizer")),
             (uc, word_tokenizer(sorted(words), model_max_length=77))]  # fmt: skip
    for cat, tokenizer in cases:
        for target in (*cat.styles, *cat.objects):
            config = erase.make_config("seot", **method_inputs("seot", cat, target, None))
            pipe = type("Pipe", (), {"tokenizer": tokenizer, "text_encoder": object()})()
            settings = seot.Settings.parse(seot.settings_for(pipe, config))
            for prompt in _answer_prompts(cat, target):
                length = tokenizer.model_max_length  # cut as the answer sets' encoder cuts
                ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
                found = seot.suppressed_positions(ids, settings)
                assert found, f"{target}: {config.concepts} not found in {prompt!r}"
                concept = [ids[i] for i in found if ids[i] != tokenizer.eos_token_id]
                assert concept == list(settings.concept_ids[0]), f"{target}: {prompt!r}"
    style, obj = method_inputs("seot", CAT, "Pop_Art", None), method_inputs("seot", CAT, "Cats", None)
    assert style == {"concepts": ["Pop Art style"], "prompts": [CAT.prompt("Pop_Art", o) for o in CAT.objects]}
    assert obj == {"concepts": ["Cats"], "prompts": [CAT.prompt(t, "Cats") for t in CAT.themes]}
