"""UCE: the closed form against an independent least-squares solution, identity without edits, preservation, the
two token choices, half precision, many concepts, and clear errors."""

import time

import pytest
import torch

import erase
from erase.methods.uce import UCEStatistics, token_vectors, uce_statistics, uce_update
from erase.params import select
from tests.unit.helpers import fresh_pipe, unet_state


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in select(pipe.unet, "kv").items()}


@torch.no_grad()
def encoded(pipe, prompt: str) -> tuple[torch.Tensor, int]:
    """Padded token vectors (T, d) in float64 and the index of the last word (BOS for an empty prompt)."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    last = len(tok(prompt).input_ids) - 2  # BOS w1 .. wn EOS -> index of wn
    return pipe.text_encoder(ids)[0][0].double(), max(last, 0)


def reference_vectors(pipe, concepts, guides, preserve, token_choice):
    """The token vectors by the two public codes' slicing, written out literally (one prompt at a time)."""
    erased, guide_rows, kept = [], [], []
    for concept, guide in zip(concepts, guides):
        c, a = encoded(pipe, concept)
        g, b = encoded(pipe, guide)
        if token_choice == "last_word":
            erased.append(c[a : a + 1])
            guide_rows.append(g[b : b + 1])
        else:
            far = max(a, b)
            erased.append(c[a : len(c) - max(0, far - a)])
            guide_rows.append(g[b : len(g) - max(0, far - b)])
    for prompt in preserve:
        p, j = encoded(pipe, prompt)
        kept.append(p[j : j + 1] if token_choice == "last_word" else p)
    dim = pipe.text_encoder.config.hidden_size
    cat = lambda rows: torch.cat(rows) if rows else torch.zeros(0, dim, dtype=torch.float64)  # noqa: E731
    return cat(erased), cat(guide_rows), cat(kept)


def lstsq_edit(weight, erased, guides, kept, lam, eta_e, eta_p):
    """argmin_W* λ‖W*−W‖² + η_e Σ‖W*c − W g‖² + η_p Σ‖W*c − W c‖², from the stacked system A·W*ᵀ = Y."""
    w = weight.double()
    dim = w.shape[1]
    a = torch.cat([lam**0.5 * torch.eye(dim, dtype=torch.float64), eta_e**0.5 * erased, eta_p**0.5 * kept])
    y = torch.cat([lam**0.5 * w.T, eta_e**0.5 * (guides @ w.T), eta_p**0.5 * (kept @ w.T)])
    return torch.linalg.lstsq(a, y, driver="gelsd").solution.T


@pytest.mark.parametrize("token_choice", ["last_word", "through_eos"])
def test_edit_equals_independent_least_squares(token_choice):
    pipe = fresh_pipe()
    before = kv_weights(pipe)
    concepts, guides, preserve = ["van gogh", "dog"], ["a painting of image style", ""], ["cat", "a photo of"]
    config = erase.make_config("uce", concepts=concepts, guides=guides, preserve=preserve, lam=0.5,
                               erase_scale=1.3, preserve_scale=0.7, token_choice=token_choice)  # fmt: skip
    erase.run(pipe, config, progress=False)
    after = kv_weights(pipe)
    erased, guide_rows, kept = reference_vectors(pipe, concepts, guides, preserve, token_choice)
    ours = token_vectors(pipe, config)
    assert all(torch.allclose(x.double(), y, atol=1e-6) for x, y in zip(ours, (erased, guide_rows, kept)))
    assert len(before) == 8  # to_k and to_v of the tiny UNet's four attn2 blocks (down, mid, two up)
    for name, weight in before.items():
        expected = lstsq_edit(weight, erased, guide_rows, kept, 0.5, 1.3, 0.7)
        got = after[name].double()
        assert (got - expected).norm() / expected.norm() < 1e-5, name
        change, expected_change = got - weight.double(), expected - weight.double()
        assert expected_change.norm() > 1e-3 * weight.norm()  # the edit is not trivially small
        assert (change - expected_change).norm() / expected_change.norm() < 1e-3, name


def test_no_erased_tokens_leave_weights_unchanged():
    pipe = fresh_pipe()
    config = erase.make_config("uce", concepts=["dog"], preserve=["cat", "van gogh"])
    stats = uce_statistics(pipe, config)
    empty = UCEStatistics.zeros(stats.erase.shape[0])
    empty.preserve, empty.preserve_tokens = stats.preserve, stats.preserve_tokens  # only preserved statistics
    update = uce_update(empty, lam=0.5, erase_scale=1.0, preserve_scale=1.0)
    assert torch.count_nonzero(update) == 0
    before = unet_state(pipe)
    result = erase.run(pipe, erase.make_config("uce", concepts=["dog"], preserve=["cat"], erase_scale=0.0),
                       progress=False)  # fmt: skip
    assert not result.delta.tensors
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_preserving_a_concept_shrinks_the_change_of_its_output():
    def output_change(preserve):
        pipe = fresh_pipe()
        before = kv_weights(pipe)
        erase.run(pipe, erase.make_config("uce", concepts=["dog"], guides=["painting"], preserve=preserve),
                  progress=False)  # fmt: skip
        cat, last = encoded(pipe, "cat")
        c = cat[last].float()
        return sum(float(((p.detach() - before[n]) @ c).norm()) for n, p in select(pipe.unet, "kv").items())

    free, preserved = output_change([]), output_change(["cat"])
    assert free > 0
    assert preserved < 0.5 * free


def test_token_choices_differ_and_through_eos_uses_more_tokens():
    pipe = fresh_pipe()
    short = token_vectors(pipe, erase.make_config("uce", concepts=["van gogh"], token_choice="last_word"))
    long = token_vectors(pipe, erase.make_config("uce", concepts=["van gogh"], token_choice="through_eos"))
    length = pipe.tokenizer.model_max_length
    assert short[0].shape[0] == 1
    assert long[0].shape[0] == length - 2  # "van gogh": last word at 2, through EOS and padding; guide '' at BOS


def test_many_concepts_batched_statistics_match_and_are_fast():
    pipe = fresh_pipe()
    words = ["cat", "dog", "van", "gogh", "painting", "photo", "style", "image"]
    concepts = [f"{a} {b} {c}" for a in words for b in words for c in words[:4]]  # 256 concepts
    config = erase.make_config("uce", concepts=concepts, preserve=words, encode_batch=64, token_choice="through_eos")
    start = time.perf_counter()
    stats = uce_statistics(pipe, config)
    elapsed = time.perf_counter() - start
    small = uce_statistics(pipe, erase.make_config("uce", concepts=concepts, preserve=words, encode_batch=7,
                                                   token_choice="through_eos"))  # fmt: skip
    assert stats.erase_tokens == small.erase_tokens > len(concepts)
    for a, b in ((stats.shift, small.shift), (stats.erase, small.erase), (stats.preserve, small.preserve)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
    assert elapsed < 10.0


def test_half_precision_model_is_solved_in_fp32_and_keeps_its_dtype():
    pipe = fresh_pipe()
    pipe.unet.half()
    reference = fresh_pipe()
    reference.unet.half().float()  # the same fp16-rounded weights, in fp32
    config = dict(concepts=["van gogh"], guides=["painting"], preserve=["cat"])
    erase.run(pipe, erase.make_config("uce", **config), progress=False)
    erase.run(reference, erase.make_config("uce", **config), progress=False)
    for (name, p), q in zip(select(pipe.unet, "kv").items(), select(reference.unet, "kv").values()):
        assert p.dtype == torch.float16, name
        assert torch.equal(p, q.detach().half()), name  # fp32 arithmetic, one rounding at the end


def test_params_may_narrow_the_edit_to_some_layers():
    pipe = fresh_pipe()
    before = unet_state(pipe)
    result = erase.run(pipe, erase.make_config("uce", concepts=["van gogh"], params="*attn2.to_v.weight"),
                       progress=False)  # fmt: skip
    assert result.delta.tensors and all(".attn2.to_v." in k for k in result.delta.tensors)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items() if ".to_v." not in k)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": []}, "concepts must be"),
        ({"concepts": ["   "]}, "concepts must be"),
        ({"concepts": ["dog", "cat"], "guides": ["a", "b", "c"]}, "one per concept"),
        ({"concepts": ["dog"], "preserve_scale": None}, "needs preserved prompts"),
        ({"concepts": ["dog"], "augment": ["art by"]}, "must contain"),
        ({"concepts": ["dog"], "augment": ["{concept} by {artist}"]}, "may only use the fields"),
        ({"concepts": ["dog"], "preserve_template": "A {obj} image"}, "may only use the fields"),
        ({"concepts": ["dog"], "prepend_empty": True}, "needs token_choice 'through_eos'"),
        ({"concepts": ["dog"], "catalog": "nope"}, "unknown catalog 'nope'"),
        ({"concepts": ["Van Gogh painting"], "catalog": "unlearncanvas-50"}, "not a theme or object of catalog"),
        ({"concepts": ["dog"], "lam": -1.0}, "lam must be"),
        ({"concepts": ["dog"], "erase_scale": float("nan")}, "erase_scale must be"),
        ({"concepts": ["dog"], "token_choice": "eos"}, "token_choice"),
    ],
)
def test_bad_configs_are_refused_clearly(values, message):
    with pytest.raises(ValueError, match=message):
        erase.make_config("uce", **values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"concepts": ["dog " * 20]}, "more than the tokenizer"),  # truncated: its last word is lost
        ({"concepts": ["dog"], "preserve": [""]}, "no word token"),  # last_word of an empty prompt: nothing to keep
        ({"concepts": ["dog"], "lam": 0.0}, "singular"),  # λ = 0 and one token vector: no unique solution
        ({"concepts": ["dog"], "params": "xattn"}, "only cross-attention key/value"),
    ],
)
def test_bad_inputs_fail_before_any_weight_moves(values, message):
    pipe = fresh_pipe()
    before = unet_state(pipe)
    with pytest.raises(ValueError, match=message):
        erase.run(pipe, erase.make_config("uce", **values), progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_empty_preserve_prompt_is_allowed_with_through_eos():
    pipe = fresh_pipe()  # the older code preserves every token of '' (BOS, EOS, padding)
    result = erase.run(pipe, erase.make_config("uce", concepts=["dog"], preserve=[""], token_choice="through_eos"),
                       progress=False)  # fmt: skip
    assert result.delta.tensors and result.record["losses"] == []


# The authors' values, read from their code (README commands and train_erase.py of UnlearnCanvas's
# mu_unified_concept_editing_uce; the older official train-scripts/train_erase.py).
RECIPES = {
    "paper": {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0, "token_choice": "last_word", "guides": [""]},
    "paper-art": {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0, "token_choice": "last_word",
                  "guides": ["art"]},
    "original-code": {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": None, "token_choice": "through_eos",
                      "prepend_empty": True, "augment": [], "catalog": None},
    "unlearncanvas-style": {"lam": 1.0, "erase_scale": 0.05, "preserve_scale": None,
                            "guides": ["An image in Photo style"], "token_choice": "through_eos",
                            "prepend_empty": True, "catalog": "unlearncanvas-50",
                            "augment": ["image in {concept} Style", "art by {concept}", "artwork by {concept}",
                                        "picture by {concept}", "style of {concept}"]},
    "unlearncanvas-object": {"lam": 10.0, "erase_scale": 0.01, "preserve_scale": None,
                             "guides": ["A Elephant image"], "token_choice": "through_eos",
                             "prepend_empty": True, "catalog": "unlearncanvas-50",
                             "augment": ["image of {concept}", "photo of {concept}", "portrait of {concept}",
                                         "picture of {concept}", "painting of {concept}"]},
}  # fmt: skip


@pytest.mark.parametrize("preset", list(RECIPES))
def test_presets_are_the_recipes_they_are_named_after(preset):
    config = erase.make_config("uce", preset=preset, concepts=["Van_Gogh"])
    for name, value in RECIPES[preset].items():
        assert getattr(config, name) == value, name
    assert config.parameter_set() == "kv"  # both codes edit to_k and to_v (with_to_k=True)


def their_retain_texts(styles, objects, target: str) -> list[str]:
    """UnlearnCanvas's preserve list, written as their script builds it: "" then, over the themes (the styles and
    Seed_Images, alphabetical) but the target, "Seed_Images" read as Photo, every object but the target."""
    texts = [""]
    for theme in sorted([*styles, "Seed_Images"]):
        if theme == target:
            continue
        for obj in objects:
            if obj != target:
                texts.append(f"A {obj} image in {'Photo' if theme == 'Seed_Images' else theme} style")
    return texts


@pytest.mark.parametrize(("concept", "target", "count"), [("Van Gogh style", "Van_Gogh", 1001), ("cats", "Cats", 970)])
def test_unlearncanvas_preserve_set_and_erased_prompts_are_theirs(concept, target, count):
    from erase.catalog import UNLEARNCANVAS_50_STYLES, UNLEARNCANVAS_OBJECTS

    style = target == "Van_Gogh"
    config = erase.make_config("uce", preset=f"unlearncanvas-{'style' if style else 'object'}", concepts=[concept])
    expected = their_retain_texts(UNLEARNCANVAS_50_STYLES, UNLEARNCANVAS_OBJECTS, target)
    assert config.preserve_prompts() == expected and len(expected) == count
    assert config.effective_preserve_scale() == max(0.1, 1 / count) == 0.1
    templates = RECIPES[config.preset]["augment"]
    guide = config.guides[0]
    assert config.erase_pairs() == [(target, guide)] + [(t.replace("{concept}", target), guide) for t in templates]


def test_original_code_always_preserves_the_empty_prompt_first():
    config = erase.make_config("uce", preset="original-code", concepts=["van gogh"], preserve=["monet", "cat"])
    assert config.preserve_prompts() == ["", "monet", "cat"]
    assert config.effective_preserve_scale() == max(0.1, 1 / 3)
    alone = erase.make_config("uce", preset="original-code", concepts=["van gogh"])  # retain = [''] alone
    assert alone.preserve_prompts() == [""] and alone.effective_preserve_scale() == 1.0


def toy_word_pipe():
    """A tiny pipeline whose tokenizer knows the toy catalog's words (style names split at `_`) and the recipes'."""
    from erase.catalog import TOY_OBJECTS, TOY_STYLES
    from erase.testing import tiny_pipeline

    words = {w.lower() for name in TOY_STYLES + TOY_OBJECTS for w in name.split("_")}
    words |= {"a", "an", "image", "in", "style", "photo", "elephant", "art", "by", "artwork", "picture", "of",
              "portrait", "painting"}  # fmt: skip
    pipe = tiny_pipeline(0, words=tuple(sorted(words)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("target", ["Pop_Art", "Cats"])
def test_unlearncanvas_recipe_equals_their_closed_form_on_a_tiny_model(target):
    """W* = (λW + η_e Σ W g cᵀ + η_p Σ W p pᵀ)(λI + η_e Σ c cᵀ + η_p Σ p pᵀ)⁻¹, built as their code builds it: one
    (erased, guide) pair at a time with the older code's spans, every token of each preserved prompt."""
    from erase.catalog import TOY_OBJECTS, TOY_STYLES

    style = target == "Pop_Art"
    kind = "style" if style else "object"
    pipe = toy_word_pipe()
    before = kv_weights(pipe)
    config = erase.make_config("uce", preset=f"unlearncanvas-{kind}", catalog="toy",
                               concepts=["Pop Art style" if style else "Cats"])  # fmt: skip
    erase.run(pipe, config, progress=False)
    after = kv_weights(pipe)

    lam, eta_e, guide = (1.0, 0.05, "An image in Photo style") if style else (10.0, 0.01, "A Elephant image")
    templates = RECIPES[f"unlearncanvas-{kind}"]["augment"]
    erased_texts = [target] + [t.replace("{concept}", target) for t in templates]
    retain = their_retain_texts(TOY_STYLES, TOY_OBJECTS, target)
    eta_p = max(0.1, 1 / len(retain))
    erased, guides, kept = reference_vectors(pipe, erased_texts, [guide] * len(erased_texts), retain, "through_eos")
    assert kept.shape[0] == len(retain) * pipe.tokenizer.model_max_length
    for name, weight in before.items():
        w = weight.double()
        mat1 = lam * w + eta_e * (guides @ w.T).T @ erased + eta_p * (kept @ w.T).T @ kept
        mat2 = lam * torch.eye(w.shape[1], dtype=torch.float64) + eta_e * erased.T @ erased + eta_p * kept.T @ kept
        expected = mat1 @ torch.linalg.inv(mat2)
        change, expected_change = after[name].double() - w, expected - w
        assert expected_change.norm() > 1e-4 * w.norm(), name  # the edit is not trivially small
        assert (change - expected_change).norm() / expected_change.norm() < 1e-3, name
