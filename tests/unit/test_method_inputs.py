"""The bench's per-method inputs build valid configs for style and object targets on the toy catalog."""

import pytest

import erase
from canvas import catalog, toy
from canvas.method_inputs import INPUTS, method_inputs

CAT = catalog.get("toy")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return toy.export(tmp_path_factory.mktemp("data"), CAT, indices=range(1, 4))


@pytest.mark.parametrize("method", ["esd", "uce", "fmn", "ca", "salun"])
@pytest.mark.parametrize("target", ["Pop_Art", "Cats"])
def test_inputs_make_valid_configs(method, target, data_root):
    values = method_inputs(method, CAT, target, data_root)
    presets = erase.get_method(method).config_cls.PRESETS
    preset = "toy-object" if target == "Cats" and "toy-object" in presets else "toy"  # as the bench picks
    config = erase.make_config(method, preset, **values)
    if method == "fmn":
        prompt = config.prompt_pairs()[0][1]
        assert prompt in {CAT.prompt(t, o) for t in CAT.themes for o in CAT.objects}
        assert len(config.images) == (8 if target == "Pop_Art" else 11)
    if method == "salun":
        assert len(values["forget_images"]) == len(values["forget_prompts"]) == len(values["pseudo_prompts"])
        assert all("Pop_Art" in f for f in values["forget_images"]) == (target == "Pop_Art")
        assert any("/Pop_Art/" in f for f in values["retain_images"]) == (target != "Pop_Art")


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
