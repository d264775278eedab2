"""SPEED: the null-space property, the edit against the paper's closed form computed another way (explicit projector
from an SVD, explicit inverses), what prior filtering (IPF) and augmentation (DPA) keep, many concepts, the
invariants, presets against the released scripts, and clear errors."""

import pytest
import torch

import erase
from erase.methods.speed import (
    AUGMENT_CHUNK,
    SPEEDStatistics,
    influence_map,
    layer_update,
    refine_priors,
    speed_statistics,
)
from tests.unit.helpers import fresh_pipe, kv_weights, unet_state

PRESERVE = ["cat", "a photo of", "image", "dog style", "photo in image"]
WORDS = ["cat", "dog", "van", "gogh", "painting", "photo", "style", "image"]


@torch.no_grad()
def encoded(pipe, prompt: str) -> tuple[torch.Tensor, int]:
    """Padded token vectors (T, d) in float64 and the index of the last word (BOS for an empty prompt)."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0].double(), max(len(tok(prompt).input_ids) - 2, 0)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    """`a` holds the rows of `b` in some order (the priors are shuffled), to float32 encoding precision."""
    assert a.shape == b.shape
    assert float(torch.cdist(b, a).min(dim=1).values.max()) < 1e-5
    assert len(set(torch.cdist(b, a).argmin(dim=1).tolist())) == len(b)


def reference_statistics(pipe, concepts, anchors, token_choice="last_word"):
    """S_cc and S_ac as the authors' code forms them, one prompt at a time: per concept Σ c cᵀ and Σ a cᵀ over its
    chosen tokens, then the mean over concepts."""
    cc, ac = [], []
    for concept, anchor in zip(concepts, anchors):
        c, i = encoded(pipe, concept)
        a, j = encoded(pipe, anchor)
        c, a = (c[1:], a[1:]) if token_choice == "all" else (c[i : i + 1], a[j : j + 1])
        cc.append(c.T @ c)
        ac.append(a.T @ c)
    return torch.stack(cc).mean(0), torch.stack(ac).mean(0)


def paper_delta(weight, s_cc, s_ac, prior_vectors, invariants, threshold, alpha, lamb):
    """The paper's closed form with an explicit projector from an SVD and explicit inverses (the code's path):
    Δ = W(S_ac − S_cc) P (I − M K (KᵀPMK + λI)⁻¹ KᵀP) M, M = (S_cc P + αI)⁻¹."""
    d = weight.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    cov = prior_vectors.T @ prior_vectors / len(prior_vectors)
    u, s, _ = torch.linalg.svd(cov)
    p = u[:, s < threshold] @ u[:, s < threshold].T
    m = torch.inverse(s_cc @ p + alpha * eye)
    k = invariants.T
    inner = torch.inverse(k.T @ p @ m @ k + lamb * torch.eye(k.shape[1], dtype=torch.float64))
    return weight @ (s_ac - s_cc) @ p @ (eye - m @ k @ inner @ k.T @ p) @ m


def speed(pipe, **values):
    config = erase.make_config("speed", **values)
    return config, erase.run(pipe, config, progress=False)


@pytest.mark.parametrize("augment", [0, 10])
def test_preserved_outputs_stay_while_erased_ones_move_to_their_anchors(augment):
    pipe = fresh_pipe()
    before = kv_weights(pipe)
    concepts, anchors = ["van gogh", "dog painting"], ["painting", "photo"]
    config, _ = speed(pipe, concepts=concepts, anchors=anchors, preserve=PRESERVE, prior_filter=False,
                      augment=augment)  # fmt: skip
    after = kv_weights(pipe)
    kept = torch.stack([encoded(pipe, p)[0][encoded(pipe, p)[1]] for p in PRESERVE])  # last word of each prior
    empty = encoded(pipe, "")[0][:1]  # the start token, an invariant
    for name, w in before.items():
        for c in (*kept, *empty):
            assert (after[name] @ c - w @ c).norm() <= 1e-5 * (w @ c).norm(), name
        for concept, anchor in zip(concepts, anchors):
            c, i = encoded(pipe, concept)
            a, j = encoded(pipe, anchor)
            target = w @ a[j]
            assert (after[name] @ c[i] - target).norm() < 0.9 * (w @ c[i] - target).norm(), name


@pytest.mark.parametrize(
    "values",
    [
        {"prior_filter": False, "augment": 0, "lamb": 0.0},
        {"prior_filter": False, "augment": 0, "lamb": 0.5, "retain_scale": 0.3},
        {"prior_filter": True, "augment": 6, "lamb": 0.0},
        {"prior_filter": True, "augment": 6, "lamb": 0.5, "token_choice": "all", "preserve": []},
    ],
)
def test_edit_equals_the_papers_closed_form_computed_with_an_explicit_projector(values):
    pipe = fresh_pipe()
    before = kv_weights(pipe)
    concepts, anchors = ["van gogh", "dog", "cat painting"], ["painting", "", "photo"]
    values = {"preserve": PRESERVE, "threshold": 1e-3, **values}
    config, result = speed(pipe, concepts=concepts, anchors=anchors, **values)
    after = kv_weights(pipe)
    s_cc, s_ac = reference_statistics(pipe, concepts, anchors, config.token_choice)
    stats = speed_statistics(pipe, config)
    assert torch.allclose(stats.erase, s_cc, atol=1e-9) and torch.allclose(stats.shift, s_ac - s_cc, atol=1e-9)
    if config.preserve:  # the last word of each prior not naming an erased concept ("dog style" is dropped)
        assert config.prior_prompts() == [p for p in PRESERVE if p != "dog style"]
        same_rows(stats.priors, torch.stack([encoded(pipe, p)[0][encoded(pipe, p)[1]] for p in config.prior_prompts()]))
    generator = torch.Generator().manual_seed(config.seed + 1)  # the edit draws DPA shifts layer by layer
    assert len(before) == 8
    for name, w in before.items():
        refined = refine_priors(w, stats.priors, influence_map(stats), config, generator)
        vectors = refined.vectors(stats.priors)  # IPF's kept priors and DPA's copies, materialised
        expected = paper_delta(w, s_cc, s_ac, vectors, stats.invariants, 1e-3, config.retain_scale, config.lamb)
        change = after[name] - w
        assert expected.norm() > 1e-3 * w.norm(), name  # not a trivially small edit
        assert (change - expected).norm() <= 1e-4 * expected.norm(), name
    assert set(result.delta.tensors) == {f"unet.{n}" for n in before}


def test_invariants_are_the_start_token_and_k_means_centres_of_the_empty_prompt():
    pipe = fresh_pipe()
    stats = speed_statistics(pipe, erase.make_config("speed", concepts=["dog"], preserve=PRESERVE))
    empty = encoded(pipe, "")[0]
    assert torch.allclose(stats.invariants[0], empty[0])
    centres, rest = stats.invariants[1:], empty[1:]
    label = torch.cdist(rest, centres).argmin(1)
    for j in range(len(centres)):  # a fixed point of Lloyd's iteration: each centre is its cluster's mean
        if (label == j).any():
            assert torch.allclose(centres[j], rest[label == j].mean(0), atol=1e-2 * rest.norm(dim=1).mean())


def test_prior_filter_keeps_exactly_the_priors_the_unconstrained_edit_moves_most():
    pipe = fresh_pipe()
    prompts = [f"{a} {b}" for a in WORDS for b in WORDS[:3]]
    config = erase.make_config(
        "speed", concepts=["van gogh"], anchors=["photo"], preserve=prompts, augment=0, threshold=1e-6
    )  # an exact null space: kept priors are kept to rounding
    stats = speed_statistics(pipe, config)
    s_cc, s_ac = reference_statistics(pipe, ["van gogh"], ["photo"])
    unconstrained = (s_ac - s_cc) @ torch.inverse(torch.eye(s_cc.shape[0], dtype=torch.float64) + s_cc)
    for name, w in kv_weights(pipe).items():
        refined = refine_priors(w, stats.priors, influence_map(stats), config, None)
        influence = (stats.priors @ (w @ unconstrained).T).norm(dim=1)  # ‖Δ₀ c‖ per prior
        expected = torch.nonzero(influence >= influence.mean()).flatten()
        assert refined.kept.tolist() == expected.tolist(), name
        assert 0 < len(expected) < len(prompts), name
        assert not len(refined.source) and refined.direction is None
    # Skewed influences (a few priors moved a lot), where "at least the mean" is not "the upper half".
    torch.manual_seed(1)
    priors = torch.randn(60, 16, dtype=torch.float64) * torch.randn(60, 1, dtype=torch.float64).exp() * 2
    weight, influence = torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    norms = (priors @ (weight @ influence).T).norm(dim=1)
    assert int((norms >= norms.mean()).sum()) < int((norms >= norms.median()).sum())
    refined = refine_priors(weight, priors, influence, config, None)
    assert refined.kept.tolist() == torch.nonzero(norms >= norms.mean()).flatten().tolist()
    # The kept priors are what the edit preserves exactly.
    before = kv_weights(pipe)
    erase.run(pipe, config, progress=False)
    after = kv_weights(pipe)
    for name, w in before.items():
        refined = refine_priors(w, stats.priors, influence_map(stats), config, None)
        kept = stats.priors[refined.kept]
        assert ((after[name] - w) @ kept.T).norm() <= 1e-5 * (w @ kept.T).norm(), name


@pytest.mark.parametrize("out", [12, 20])  # fewer outputs than inputs (SD's 320/640 layers) and more (1280)
def test_prior_augmentation_shifts_along_the_least_significant_direction_and_keeps_the_influential_copies(out):
    torch.manual_seed(0)
    d, n, copies = 16, AUGMENT_CHUNK + 40, 5  # two chunks of priors
    weight = torch.randn(out, d, dtype=torch.float64)
    priors = torch.randn(n, d, dtype=torch.float64)
    influence = torch.randn(d, d, dtype=torch.float64)
    config = erase.make_config("speed", concepts=["x"], augment=copies, prior_filter=False)
    refined = refine_priors(weight, priors, influence, config, torch.Generator().manual_seed(3))
    _, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    v = vh[-1]
    assert torch.allclose(refined.direction.abs(), v.abs())
    vectors = refined.vectors(priors)
    moved = vectors[n:] - priors[refined.source]  # each copy minus its source prior
    assert torch.allclose(moved, torch.outer(moved @ refined.direction, refined.direction), atol=1e-12)
    # W barely sees the shift: ‖W(c' − c)‖ = |s|·σ_min, the least W can respond to a shift of that size.
    assert torch.allclose((moved @ weight.T).norm(dim=1), refined.shift.abs() * sv[-1])
    # The copies kept are those whose Δ₀ influence reaches the mean over their chunk's copies (drawn again here).
    shifts = torch.randn(n, copies, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    all_copies = priors[:, None, :] + shifts[..., None] * refined.direction  # (n, copies, d)
    norms = (all_copies @ (weight @ influence).T).norm(dim=-1)
    chunk_means = torch.stack([norms[i : i + AUGMENT_CHUNK].mean() for i in range(0, n, AUGMENT_CHUNK)])
    keep = norms >= chunk_means[torch.arange(n) // AUGMENT_CHUNK][:, None]
    assert 0 < int(keep.sum()) < n * copies
    assert torch.allclose(vectors[n:], all_copies[keep])
    # The covariance formed from the shifts equals the mean outer product of the materialised vectors.
    assert torch.allclose(refined.covariance(priors), vectors.T @ vectors / len(vectors))


def test_many_concepts_in_one_run_with_batched_statistics():
    pipe = fresh_pipe()
    concepts = [f"{a} {b} {c}" for a in WORDS for b in WORDS for c in WORDS[:2]]  # 128 concepts
    preserve = ["a photo of", "in image"]
    config = erase.make_config(
        "speed", concepts=concepts, anchors=["photo"], preserve=preserve, encode_batch=64, threshold=1e-6
    )
    stats = speed_statistics(pipe, config)
    small = speed_statistics(pipe, erase.make_config("speed", concepts=concepts, anchors=["photo"],
                                                     preserve=preserve, encode_batch=7))  # fmt: skip
    assert len(stats.erased) == len(concepts) == 128
    assert torch.allclose(stats.erase, small.erase, atol=1e-9) and torch.allclose(stats.shift, small.shift, atol=1e-9)
    before = kv_weights(pipe)
    erase.run(pipe, config, progress=False)
    after = kv_weights(pipe)
    kept = torch.stack([encoded(pipe, p)[0][encoded(pipe, p)[1]] for p in preserve])
    for name, w in before.items():  # the IPF-kept subset at least: with two priors, the more influenced one
        assert (after[name] - w).norm() > 1e-3 * w.norm(), name
        change = ((after[name] - w) @ kept.T).norm(dim=0) / (w @ kept.T).norm(dim=0)
        assert float(change.min()) <= 1e-5, name


def test_preserve_prompts_naming_an_erased_concept_are_dropped_as_the_code_does():
    config = erase.make_config("speed", concepts=["Van Gogh", "dog"],
                               preserve=["a van gogh painting", "hotdog", "Dog", "cat", "cat", "vangogh"])  # fmt: skip
    assert config.prior_prompts() == ["hotdog", "cat", "vangogh"]  # whole words, any case, each once


def test_no_preserve_prompts_means_the_empty_prompts_tokens():
    pipe = fresh_pipe()
    stats = speed_statistics(pipe, erase.make_config("speed", concepts=["dog"]))
    same_rows(stats.priors, encoded(pipe, "")[0][1:])


# The released recipes, read from github:Ouxiang-Li/SPEED (train_erase_null.py:139-144 defaults, README commands,
# scripts/eval_few.sh, eval_multi.sh, eval_nudity.sh).
RECIPES = {
    "paper": {"anchors": [""], "augment": 10, "threshold": 0.1, "retain_scale": 1.0, "lamb": 0.0,
              "prior_filter": True, "token_choice": "last_word"},
    "paper-style": {"anchors": ["art"], "augment": 10, "threshold": 0.1, "retain_scale": 1.0, "lamb": 0.0,
                    "prior_filter": True},
    "paper-celebrity": {"anchors": ["person"], "augment": 10, "threshold": 1e-4, "retain_scale": 0.05, "lamb": 0.0,
                        "prior_filter": False},
    "paper-nudity": {"concepts": ["nudity"], "anchors": [""], "token_choice": "all", "augment": 10,
                     "threshold": 0.1, "retain_scale": 0.7, "lamb": 0.5, "preserve": []},
}  # fmt: skip


@pytest.mark.parametrize("preset", list(RECIPES))
def test_presets_are_the_released_recipes(preset):
    values = {} if preset == "paper-nudity" else {"concepts": ["Snoopy"]}
    config = erase.make_config("speed", preset=preset, **values)
    for name, value in RECIPES[preset].items():
        assert getattr(config, name) == value, name
    assert config.parameter_set() == "*.attn2.to_v.weight"  # the code's default --params V


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": []}, "concepts must be"),
        ({"concepts": ["   "]}, "concepts must be"),
        ({"concepts": ["dog", "cat", "dog"]}, r"distinct, got 'dog' twice"),
        ({"concepts": ["dog", "cat"], "anchors": ["a", "b", "c"]}, "one per concept"),
        ({"concepts": ["dog"], "preserve": ["cat", " "]}, "preserve prompts must be non-empty"),
        ({"concepts": ["dog"], "preserve": ["a dog"]}, "every preserve prompt names an erased concept"),
        ({"concepts": ["dog"], "token_choice": "eos"}, "token_choice"),
        ({"concepts": ["dog"], "augment": -1}, "augment must be"),
        ({"concepts": ["dog"], "threshold": 0.0}, "threshold must be"),
        ({"concepts": ["dog"], "retain_scale": 0.0}, "retain_scale must be"),
        ({"concepts": ["dog"], "lamb": -0.5}, "lamb must be"),
        ({"concepts": ["dog"], "encode_batch": 0}, "encode_batch must be"),
    ],
)
def test_bad_configs_are_refused_clearly(values, message):
    with pytest.raises(ValueError, match=message):
        erase.make_config("speed", **values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": ["\u200b"]}, "unknown tokens only"),  # not blank, but nothing the tokenizer knows
        ({"concepts": ["dog " * 20]}, "more than the tokenizer"),
        ({"concepts": ["dog"], "params": "xattn"}, "only cross-attention key/value"),
        # 121 contextual last-word vectors span all 32 dimensions: no null space is left for the edit.
        ({"concepts": ["van gogh"], "preserve": [f"{a} {b}" for a in WORDS + ["a", "of", "in"] for b in
                                                 WORDS + ["a", "of", "in"]], "threshold": 1e-12, "prior_filter": False,
          "augment": 0}, r"no null space .* span at most 27"),
    ],
)  # fmt: skip
def test_bad_inputs_fail_before_any_weight_moves(values, message):
    pipe = fresh_pipe()
    before = unet_state(pipe)
    with pytest.raises(ValueError, match=message):
        erase.run(pipe, erase.make_config("speed", **values), progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_a_concept_inside_the_priors_span_is_an_error_not_a_silent_no_op():
    eye = torch.eye(6, dtype=torch.float64)
    erased = (eye[0] + eye[1])[None]  # in the span of the priors e0, e1
    stats = SPEEDStatistics(concepts=["x"], erase=erased.T @ erased, shift=-erased.T @ erased, erased=erased,
                            owner=torch.zeros(1, dtype=torch.long), priors=eye[:2], invariants=eye[5:])  # fmt: skip
    config = erase.make_config("speed", concepts=["x"], augment=0, prior_filter=False)
    null = eye[:, 2:]  # the priors' null space
    with pytest.raises(ValueError, match=r"'x'\] lie in the span of the priors"):
        layer_update(torch.randn(4, 6, dtype=torch.float64), stats, config, null, "w")
    # Out of the span, the same call edits, and leaves the priors and the invariant alone.
    stats.erased = (eye[0] + eye[2])[None]
    stats.erase, stats.shift = stats.erased.T @ stats.erased, -stats.erased.T @ stats.erased
    delta = layer_update(torch.randn(4, 6, dtype=torch.float64), stats, config, null, "w")
    assert delta.norm() > 0 and (delta @ eye[:2].T).abs().max() < 1e-12 and (delta @ eye[5]).abs().max() < 1e-12
