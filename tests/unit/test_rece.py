"""RECE: the regenerating embedding and each round's edit against independent least-squares solutions, the round
moving the regenerating embedding's output to the guide's, rounds=0 as plain UCE, recorded norms, many concepts,
the authors' recipes, and clear errors."""

import pytest
import torch

import erase
from erase.delta import Delta
from erase.methods.rece import regenerating_map
from erase.params import select
from tests.unit.helpers import fresh_pipe, kv_weights, padded_vectors, unet_state

CONCEPTS, GUIDES, PRESERVE = ["van gogh", "dog"], ["painting", ""], ["cat"]


def lstsq_regenerating(new: dict, old: dict, concept: torch.Tensor, reg: float) -> torch.Tensor:
    """argmin_x Σ_l ‖W_new,l x − W_old,l c‖² + λ_reg‖x‖² for every token c (rows of `concept`), stacked."""
    dim = concept.shape[1]
    a = torch.cat([*new.values(), reg**0.5 * torch.eye(dim, dtype=torch.float64)])
    y = torch.cat([*(concept @ old[n].T for n in new), torch.zeros(concept.shape[0], dim, dtype=torch.float64)], 1)
    return torch.linalg.lstsq(a, y.T, driver="gelsd").solution.T  # (T, d)


def lstsq_round(weight, erased, guides, kept, lam, eta_e, eta_p) -> torch.Tensor:
    """argmin_W* λ‖W*−W‖² + η_e Σ‖W*c' − W g‖² + η_p Σ‖W*p − W p‖² (W the weight before the round)."""
    dim = weight.shape[1]
    a = torch.cat([lam**0.5 * torch.eye(dim, dtype=torch.float64), eta_e**0.5 * erased, eta_p**0.5 * kept])
    y = torch.cat([lam**0.5 * weight.T, eta_e**0.5 * (guides @ weight.T), eta_p**0.5 * (kept @ weight.T)])
    return torch.linalg.lstsq(a, y, driver="gelsd").solution.T


def config(**values):
    base = {"concepts": CONCEPTS, "guides": GUIDES, "preserve": PRESERVE, "token_choice": "through_eos",
            "reg_scale": 0.05, "round_lam": 0.1, "round_preserve_scale": 0.3}  # fmt: skip
    return erase.make_config("rece", **{**base, **values})


def uce_only():
    """The tiny pipeline after the UCE stage alone, run by the `uce` method (RECE's defaults for λ, η are UCE's)."""
    pipe = fresh_pipe()
    erase.run(pipe, erase.make_config("uce", concepts=CONCEPTS, guides=GUIDES, preserve=PRESERVE,
                                      token_choice="through_eos"), progress=False)  # fmt: skip
    return pipe


def test_regenerating_embedding_equals_independent_least_squares():
    original, edited = kv_weights(fresh_pipe()), kv_weights(uce_only())
    mapping = regenerating_map(edited, original, 0.05)
    for text in CONCEPTS:
        c = padded_vectors(fresh_pipe(), text)
        expected = lstsq_regenerating(edited, original, c, 0.05)
        got = c @ mapping.T
        assert (got - expected).norm() / expected.norm() < 1e-8, text
        assert (expected - c).norm() > 1e-3 * c.norm()  # UCE moved it: the embedding is not the concept's own
    # With the original weights (nothing edited) and no regulariser the concept regenerates itself.
    c = padded_vectors(fresh_pipe(), CONCEPTS[0])
    assert torch.allclose(c @ regenerating_map(original, original, 0.0).T, c, atol=1e-8)


def test_round_norms_are_the_regenerating_embeddings_norms_and_are_saved(tmp_path):
    original, edited = kv_weights(fresh_pipe()), kv_weights(uce_only())
    result = erase.run(fresh_pipe(), config(rounds=3), progress=False)
    norms = result.record["findings"]["round_norms"]
    assert len(norms) == 3 and all(len(r) == len(CONCEPTS) for r in norms)
    for text, norm in zip(CONCEPTS, norms[0]):  # round 1 starts from the UCE weights
        expected = lstsq_regenerating(edited, original, padded_vectors(fresh_pipe(), text), 0.05).norm()
        assert norm == pytest.approx(float(expected), rel=1e-8)
    assert norms[1] != norms[0] and all(n > 0 for r in norms for n in r)
    result.delta.save(tmp_path / "delta")
    assert Delta.load(tmp_path / "delta").metadata["findings"]["round_norms"] == norms


def test_round_equals_independent_least_squares_and_moves_the_output_to_the_guide():
    before_round, original = kv_weights(uce_only()), kv_weights(fresh_pipe())
    pipe = fresh_pipe()
    erase.run(pipe, config(rounds=1), progress=False)
    after = kv_weights(pipe)
    mapping = regenerating_map(before_round, original, 0.05)
    erased = torch.cat([padded_vectors(pipe, c) @ mapping.T for c in CONCEPTS])  # c' of every token, both concepts
    guides = torch.cat([padded_vectors(pipe, g) for g in GUIDES])
    kept = torch.cat([padded_vectors(pipe, p) for p in ["", *PRESERVE]])  # "" first, every token
    moved_before = moved_after = 0.0
    for name, w in before_round.items():
        expected = lstsq_round(w, erased, guides, kept, lam=0.1, eta_e=1.0, eta_p=0.3)
        change, expected_change = after[name] - w, expected - w
        assert expected_change.norm() > 1e-4 * w.norm(), name
        assert (change - expected_change).norm() / expected_change.norm() < 1e-4, name
        target = guides @ w.T  # the guide's keys/values under the weights before the round
        moved_before += float((erased @ w.T - target).norm() ** 2)
        moved_after += float((erased @ after[name].T - target).norm() ** 2)
    assert moved_after < 0.5 * moved_before  # the round erased what regenerated the concept


def test_zero_rounds_is_plain_uce_exactly():
    rece_pipe, uce_pipe = fresh_pipe(), uce_only()
    result = erase.run(rece_pipe, config(rounds=0), progress=False)
    assert result.record["findings"]["round_norms"] == []
    for (name, p), q in zip(select(rece_pipe.unet, "kv").items(), select(uce_pipe.unet, "kv").values()):
        assert torch.equal(p, q), name
    one = fresh_pipe()
    erase.run(one, config(rounds=1), progress=False)
    pairs = zip(select(one.unet, "kv").values(), select(uce_pipe.unet, "kv").values())
    assert not all(torch.equal(p, q) for p, q in pairs)  # and a round does change them


def test_many_concepts_in_one_run():
    words = ["cat", "dog", "van", "gogh", "painting", "photo", "style", "image"]
    concepts = [f"{a} {b}" for a in words for b in words]  # 64 concepts: the solves stay d×d, no limit on the count
    result = erase.run(fresh_pipe(), erase.make_config("rece", concepts=concepts, rounds=2), progress=False)
    norms = result.record["findings"]["round_norms"]
    assert len(norms) == 2 and all(len(r) == len(concepts) for r in norms)
    assert all(torch.isfinite(torch.tensor(r)).all() for r in norms)


def test_round_preserve_prompts():
    cfg = erase.make_config("rece", concepts=["dog"], preserve=["cat", "dog cat"], token_choice="through_eos",
                            prepend_empty=True)  # fmt: skip
    assert cfg.round_preserve_prompts() == ["", "cat", "dog cat"]  # "" once
    assert erase.make_config("rece", concepts=["dog"], round_prepend_empty=False).round_preserve_prompts() == []


# The authors' values (github:CharlesGong12/RECE: README notes, scripts/*.sh, train*.py defaults; the UCE stage from
# the names of its UCE checkpoints).
UCE_STAGE = {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": None, "token_choice": "through_eos",
             "prepend_empty": True}  # fmt: skip
ROUND = {"round_lam": 0.1, "round_erase_scale": 1.0, "round_preserve_scale": 0.1}
RECIPES = {
    "paper": {**UCE_STAGE, **ROUND, "guides": [" "], "rounds": 3, "reg_scale": 0.1},
    "paper-art": {**UCE_STAGE, **ROUND, "guides": ["art"], "rounds": 1, "reg_scale": 1e-3},
    "paper-object": {**UCE_STAGE, **ROUND, "guides": [" "], "rounds": 1, "reg_scale": 1e-3},
}


@pytest.mark.parametrize("preset", list(RECIPES))
def test_presets_are_the_recipes_they_are_named_after(preset):
    cfg = erase.make_config("rece", preset=preset, concepts=["nudity"])
    for name, value in RECIPES[preset].items():
        assert getattr(cfg, name) == value, name
    assert cfg.parameter_set() == "kv" and cfg.round_preserve_prompts() == [""]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": []}, "concepts must be"),
        ({"concepts": ["dog", "Dog "]}, "must be distinct, got 'Dog ' twice"),
        ({"concepts": ["dog"], "rounds": -1}, "rounds must be"),
        ({"concepts": ["dog"], "rounds": 1.5}, "rounds must be an integer"),
        ({"concepts": ["dog"], "rounds": True}, "rounds must be an integer"),
        ({"concepts": ["dog"], "reg_scale": -0.1}, "reg_scale must be"),
        ({"concepts": ["dog"], "reg_scale": float("nan")}, "reg_scale must be"),
        ({"concepts": ["dog"], "round_lam": -1.0}, "round_lam must be"),
    ],
)
def test_bad_configs_are_refused_clearly(values, message):
    with pytest.raises(ValueError, match=message):
        erase.make_config("rece", **values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": ["日本"]}, "tokenizes to nothing"),  # unknown characters: the tokenizer's end token only
        ({"concepts": ["dog " * 20]}, "more than the tokenizer"),
        # λ' = 0 and nothing preserved: a round's 16 token vectors cannot span 32 dims (the UCE stage had moved W)
        ({"concepts": ["dog"], "round_lam": 0.0, "round_prepend_empty": False}, "singular"),
    ],
)
def test_bad_inputs_fail_and_leave_the_weights_as_they_were(values, message):
    pipe = fresh_pipe()
    before = unet_state(pipe)
    with pytest.raises(ValueError, match=message):
        erase.run(pipe, erase.make_config("rece", **values), progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_concept_of_unknown_characters_tokenizes_to_nothing_on_the_toy_tokenizer():
    from erase.methods.rece import _check_words

    tokenizer = erase.load_pipeline("toy").tokenizer
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        _check_words(tokenizer, ["Cats", "é"])
    _check_words(tokenizer, ["Cats", "Pop Art style"])


def test_singular_regenerating_system_is_refused():
    weights = {"a": torch.zeros(3, 4, dtype=torch.float64)}
    weights["a"][0, 0] = 1.0
    with pytest.raises(ValueError, match="reg_scale=0.0 leaves"):
        regenerating_map(weights, weights, 0.0)
