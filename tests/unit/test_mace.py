"""MACE: each closed form against an independent solve (lstsq, UCE's closed form), the attention loss blind outside
the mask, the words around the target, masks (the toy's exact ones, attention-derived ones), many concepts, the
preserve cache, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import erase
from canvas import catalog, toy
from canvas.method_inputs import method_inputs
from erase.methods import mace
from erase.methods import mace_forms as forms
from erase.methods.uce import UCEStatistics, uce_update
from tests.unit.helpers import fresh_pipe, kv_weights, padded_vectors, write_images

PROMPTS = ["a photo of {concept}", "{concept} painting"]


def pair_rows(pipe, old: str, new: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = aligned = forms.aligned_positions(pipe.tokenizer(old).input_ids, pipe.tokenizer(new).input_ids,
                                             pipe.tokenizer.model_max_length)  # fmt: skip
    assert len(aligned[0]) == len(aligned[1])
    return padded_vectors(pipe, old)[a], padded_vectors(pipe, new)[b]


def all_rows(pipe, prompts) -> torch.Tensor:
    return torch.cat([padded_vectors(pipe, p) for p in prompts])


def ridge(w0, lam, rows, targets, kept, kept_targets, scale):
    """argmin_W λ‖W − w0‖² + Σ‖W c − y‖² + s Σ‖W p − y_p‖² by torch.linalg.lstsq on the stacked system."""
    dim = w0.shape[1]
    a = torch.cat([lam**0.5 * torch.eye(dim, dtype=torch.float64), rows, scale**0.5 * kept])
    y = torch.cat([lam**0.5 * w0.T, targets, scale**0.5 * kept_targets])
    return torch.linalg.lstsq(a, y, driver="gelsd").solution.T


def test_words_around_the_target():
    # old: BOS a photo of van gogh EOS; new: BOS a photo of dog EOS (T = 10): prefix 0-3, EOS, then padding; the
    # longer erased prompt's last positions pair with the mapped prompt's earlier padding, and the tails end together.
    old, new = [0, 1, 2, 3, 7, 8, 9], [0, 1, 2, 3, 5, 9]
    a, b = forms.aligned_positions(old, new, 10)
    assert a == [0, 1, 2, 3, 6, 7, 8, 9] and b == [0, 1, 2, 3, 5, 6, 7, 8]
    b2, a2 = forms.aligned_positions(new, old, 10)  # the other way round: the mapped prompt is the longer one
    assert (a2, b2) == (a, b)
    # a word after the concept is kept ("van gogh painting" -> "dog painting"), the concept's own tokens are not
    a, b = forms.aligned_positions([0, 7, 8, 4, 9], [0, 5, 4, 9], 6)
    assert a == [0, 3, 4, 5] and b == [0, 2, 3, 4]
    same = [0, 1, 2, 9]
    assert forms.aligned_positions(same, same, 6) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])


def test_refinement_equals_uce_closed_form_and_least_squares():
    pipe = fresh_pipe()
    pairs = [("a photo of van gogh", "a photo of dog"), ("van gogh painting", "dog painting"), ("a cat", "a dog")]
    keep = ["a dog", "a photo of a cat"]
    lam, scale = 0.5, 2.0
    erase_, shift = forms.refinement_statistics(pipe, pairs, batch=2)
    preserve = forms.gram(pipe, keep, batch=1)
    k = forms.refinement_matrix(erase_, shift, preserve, lam, scale)
    rows = [pair_rows(pipe, o, n) for o, n in pairs]
    c_old, c_new = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    kept = all_rows(pipe, keep)
    # UCE's closed form (W* = W + η_e W Σ(g − c)cᵀ B⁻¹) with guides = the mapped vectors, η_e = 1, η_p = s
    stats = UCEStatistics((c_new - c_old).T @ c_old, c_old.T @ c_old, kept.T @ kept)
    update = uce_update(stats, lam, 1.0, scale)
    for w in list(kv_weights(pipe).values())[:3]:
        ours = w @ k
        assert torch.allclose(ours, w + w @ update, atol=1e-9, rtol=1e-9)
        expected = ridge(w, lam, c_old, c_new @ w.T, kept, kept @ w.T, scale)
        assert torch.allclose(ours, expected, atol=1e-7, rtol=1e-6)


def random_loras(weights, count, rank=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64),
              torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64)) for w in weights]
            for _ in range(count)]  # fmt: skip


def test_fusion_equals_least_squares_over_every_lora():
    pipe = fresh_pipe()
    concepts = [["a photo of van gogh", "van gogh painting"], ["a cat", "a photo of a cat"], ["dog style"]]
    keep = ["a dog", "a photo"]
    weights = list(kv_weights(pipe).values())[:3]
    refined = [w + 0.01 * torch.randn_like(w) for w in weights]
    loras = random_loras(weights, len(concepts))
    grams = [forms.gram(pipe, prompts, batch=4) for prompts in concepts]
    preserve = forms.gram(pipe, keep, batch=4)
    for lam, scale in ((0.5, 1.0), (1e-3, 3.0)):  # λ = 0 is singular here: LayerNorm outputs with β = 0 span d − 1
        fusion = forms.Fusion(grams, preserve, lam, scale)
        kept = all_rows(pipe, keep)
        for m, (w0, wr) in enumerate(zip(weights, refined)):
            fused = fusion.fuse(wr, w0, [lora[m] for lora in loras])
            rows = [all_rows(pipe, prompts) for prompts in concepts]
            targets = [r @ (wr + lora[m][0] @ lora[m][1]).T for r, lora in zip(rows, loras)]
            expected = ridge(wr, lam, torch.cat(rows), torch.cat(targets), kept, kept @ w0.T, scale)
            assert torch.allclose(fused, expected, atol=1e-7, rtol=1e-6)


def test_the_run_is_refinement_then_fusion_when_the_loras_learn_nothing(tmp_path):
    """steps=0 leaves every LoRA at zero (up starts at 0), so the run's K/V must be the two ridge solves in a row."""
    images = write_images(tmp_path / "images", 2)
    pipe = fresh_pipe()
    before = kv_weights(pipe)
    values = {"concepts": ["van gogh", "cat"], "mappings": ["dog", "dog"], "kinds": ["style", "object"],
              "prompts": PROMPTS, "images": [str(images), str(images)], "masks": [None, None], "steps": 0,
              "refine_lam": 0.5, "fuse_lam": 2.0, "preserve": ["a dog"], "domain_preserve": ["a photo"],
              "domain_weight": 3.0, "refine_preserve_scale": 1.5, "fuse_preserve_scale": 0.5,
              "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    result = erase.run(pipe, erase.make_config("mace", **values), progress=False)
    pairs = [(t.format(concept=c), t.format(concept="dog")) for c in ("van gogh", "cat") for t in PROMPTS]
    rows = [pair_rows(pipe, o, n) for o, n in pairs]
    c_old, c_new = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    kept = torch.cat([all_rows(pipe, ["a dog"]), 3.0**0.5 * all_rows(pipe, ["a photo"])])  # P_prior + w·P_domain
    erased = all_rows(pipe, [t.format(concept=c) for c in ("van gogh", "cat") for t in PROMPTS])
    after = kv_weights(pipe)
    assert set(result.delta.tensors) == {f"unet.{n}" for n in before}
    for name, w0 in before.items():
        refined = ridge(w0, 0.5, c_old, c_new @ w0.T, kept, kept @ w0.T, 1.5)
        fused = ridge(refined, 2.0, erased, erased @ refined.T, kept, kept @ w0.T, 0.5)
        assert torch.allclose(after[name], fused, atol=1e-5, rtol=1e-4), name


def maps_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = {f"layer{q}": torch.rand(2, q, 6, generator=g).softmax(-1) for q in (16, 4)}
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1.0  # the top-left quarter
    return maps, mask


def test_attention_loss_sees_only_queries_inside_the_mask_and_the_concept_positions():
    maps, mask = maps_and_mask()
    positions = [1, 2, 5]

    def inside(q):
        return forms.layer_inside(mask, q)

    loss = forms.masked_attention_loss(maps, inside, positions)
    expected = 0.0
    for a in maps.values():  # the formula written out: Σ_layers sqrt(Σ over heads, inside queries, positions of a²)
        rows = [i for i in range(a.shape[1]) if inside(a.shape[1])[i]]
        expected += float(sum(a[h, i, k] ** 2 for h in range(2) for i in rows for k in positions)) ** 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    changed = {k: a.clone() for k, a in maps.items()}
    for a in changed.values():
        outside = ~inside(a.shape[1])
        a[:, outside] = torch.rand_like(a[:, outside])  # any attention outside the mask
        a[:, :, [0, 3, 4]] = 0.7  # and to positions that are not the concept's
    assert forms.masked_attention_loss(changed, inside, positions).item() == pytest.approx(loss.item(), rel=1e-6)
    changed["layer16"][:, 0, 1] += 0.5  # query 0 (top-left) is inside: the loss moves
    assert forms.masked_attention_loss(changed, inside, positions).item() != pytest.approx(loss.item(), rel=1e-6)
    whole = forms.masked_attention_loss(maps, lambda q: None, positions)  # a style: every query
    assert whole.item() == pytest.approx(sum(a[..., positions].pow(2).sum().sqrt().item() for a in maps.values()))


def test_layer_masks_are_nearest_resized_and_thresholded():
    mask = torch.zeros(8, 8)
    mask[:4, :4], mask[4:, 4:] = 1.0, 0.4  # a faint region below the 0.5 threshold
    inside = forms.layer_inside(mask, 16).reshape(4, 4)
    assert inside[:2, :2].all() and inside.sum() == 4
    assert forms.layer_inside(mask, 16, threshold=0.3).sum() == 8
    with pytest.raises(ValueError, match="square attention maps"):
        forms.layer_inside(mask, 12)


def test_attention_masks_follow_the_attention_to_the_concept():
    maps = {"l": torch.zeros(2, 16, 4), "m": torch.zeros(2, 4, 4)}
    maps["l"][:, 0, 2] = 1.0  # query 0 (top-left of the 4x4 map) attends to the concept's position 2
    maps["m"][:, 0, 2] = 1.0
    mask = forms.attention_mask(maps, [2], 8, threshold=0.5)
    assert mask[0, 0] == 1 and mask[7, 7] == 0 and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_toy_masks_are_the_rendered_objects():
    for obj in ("Cats", "Towers"):
        mask = toy.object_mask(obj, 3)
        pixels = np.asarray(toy.render("Pop_Art", obj, 3)).astype(float) / 255
        blue = np.array([0x10, 0x30, 0xC0]) / 255  # Pop Art paints the object flat blue
        is_blue = np.abs(pixels - blue).max(axis=-1) < 0.05
        assert mask[is_blue].min() > 0.5  # every object-blue pixel lies inside the mask
        assert is_blue[mask > 0.99].mean() > 0.5  # and most of the mask is object-blue (the rest: its black outline)
        assert np.abs(np.asarray(toy.mask_image(obj, 3)) / 255 - mask).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding
    with pytest.raises(ValueError, match="positive integer"):
        toy.object_mask("Cats", 0)


def test_bench_inputs_give_objects_their_masks_and_styles_the_whole_image(tmp_path):
    cat = catalog.get("toy")
    root = toy.export(tmp_path / "data", cat, indices=[1])
    obj = erase.make_config("mace", "toy", **method_inputs("mace", cat, "Cats", root))
    assert obj.kinds == ["object"] and len(obj.masks[0]) == len(obj.images[0]) == len(cat.themes)
    assert all(path.endswith("/Cats/1.png") for path in obj.masks[0])
    assert not any("Cats" in p for p in obj.domain_preserve) and len(obj.domain_preserve) == 77
    style = erase.make_config("mace", "toy", **method_inputs("mace", cat, "Pop_Art", root))
    assert style.kinds == ["style"] and style.masks == [None] and style.mappings == ["Photo"]
    uc = method_inputs("mace", catalog.get("unlearncanvas-50"), "Cats", root)
    assert "masks" not in uc and uc["mappings"] == [""]  # no segmenter: attention masks


def test_importance_sampling_concentrates_t_between_200_and_400():
    w = mace.importance_weights(1000)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[150:450].sum() > 0.95 and 290 <= int(w.argmax()) <= 310
    raw = 1 / (1 + np.exp(-0.05 * (250 - 200))) - 1 / (1 + np.exp(-0.05 * (250 - 400)))
    assert (w[250] / w[300]).item() == pytest.approx(raw / (1 / (1 + np.exp(-5)) - 1 / (1 + np.exp(5))))


def test_concept_positions_cover_every_occurrence_and_the_pooler():
    tok = fresh_pipe().tokenizer
    # BOS van gogh painting of van gogh EOS pad...: both occurrences, then EOS and every padding position
    positions = mace.concept_positions(tok, "van gogh painting of van gogh", "van gogh", pooler=True)
    assert positions == [1, 2, 5, 6] + list(range(7, 16))
    assert mace.concept_positions(tok, "van gogh painting", "van gogh", pooler=False) == [1, 2]
    with pytest.raises(ValueError, match="not among the tokens"):
        mace.concept_positions(tok, "a photo of a dog", "cat", pooler=False)

    class Empty:
        def __call__(self, text, **kwargs):
            return type("Ids", (), {"input_ids": []})()

    with pytest.raises(ValueError, match="tokenizes to nothing"):
        mace.concept_positions(Empty(), "x", "x", pooler=False)


def test_many_concepts_in_one_run_train_one_lora_each_and_use_the_preserve_cache(tmp_path, monkeypatch):
    images = write_images(tmp_path / "images", 2)
    masks = write_images(tmp_path / "masks", 2, seed=5)
    trained, grams = [], []
    train_lora, gram = mace.train_lora, forms.gram
    monkeypatch.setattr(mace, "train_lora", lambda ctx, i, c, m: trained.append(c.text) or train_lora(ctx, i, c, m))
    monkeypatch.setattr(
        forms, "gram", lambda pipe, prompts, batch: grams.append(list(prompts)) or gram(pipe, prompts, batch)
    )
    values = {"concepts": ["van gogh", "cat", "dog"], "kinds": ["style", "object", "object"], "mappings": "painting",
              "prompts": PROMPTS, "images": [str(images)] * 3, "masks": [None, str(masks), None], "steps": 2,
              "lr": 1e-2, "preserve": ["a photo", "in style"], "fuse_preserve_scale": 1.0, "fuse_lam": 1.0,
              "refine_lam": 1.0, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    first = erase.run(fresh_pipe(), erase.make_config("mace", **values), progress=False)
    assert trained == ["van gogh", "cat", "dog"] and ["a photo", "in style"] in grams
    grams.clear()
    again = erase.run(fresh_pipe(), erase.make_config("mace", **values), progress=False)
    assert ["a photo", "in style"] not in grams  # read from the cache
    assert again.delta.digest() == first.delta.digest()
    fewer = erase.run(fresh_pipe(), erase.make_config("mace", **{**values, "concepts": ["van gogh", "cat", "a"]}),
                      progress=False)  # fmt: skip
    assert fewer.delta.digest() != first.delta.digest()


BAD = [
    ({"concepts": []}, "concepts must be one or more non-empty texts"),
    ({"concepts": ["cat", "cat"]}, "concepts must be distinct, got 'cat' twice"),
    ({"kinds": ["thing"]}, "kinds must be among object, style"),
    ({"mappings": ["a", "b", "c"]}, "mappings must be one text for all concepts or one per concept"),
    ({"prompts": ["a photo"]}, "must contain {concept}"),
    ({"images": None}, "images is required"),
    ({"images": "{tmp}/nowhere"}, "does not exist"),
    ({"masks": "{tmp}/images/0.png"}, "1 masks for 2 images"),
    ({"kinds": ["style"], "masks": "{tmp}/images"}, "is a style, whose mask is the whole image"),
    ({"refine_lam": -1.0}, "refine_lam must be a number >= 0"),
    ({"timesteps": "late"}, "timesteps 'late' is not one of importance, uniform"),
    ({"mask_threshold": 1.0}, r"mask_threshold must be in \[0, 1\)"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_inputs_are_clear_errors(overrides, message, tmp_path):
    write_images(tmp_path / "images", 2)
    values = {"concepts": ["cat"], "prompts": PROMPTS, "images": "{tmp}/images", **overrides}
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        erase.make_config("mace", **values)


def test_bad_inputs_found_at_run_time_change_nothing(tmp_path):
    images = write_images(tmp_path / "images", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):
        Image.new("L", (16, 16)).save(empty / f"{i}.png")
    cases = [
        (
            {"prompts": ["a photo of a dog {concept}"], "concepts": ["painting"], "mappings": [""], "params": "xattn"},
            "MACE edits only cross-attention key/value weights",
        ),
        ({"prompts": ["a photo of {concept} " + "dog " * 20]}, "more than the tokenizer"),
        ({"masks": str(empty)}, "is empty"),
        ({"refine_lam": 0.0, "prompts": ["{concept} painting"]}, "MACE refinement: with λ=0 the system is singular"),
        ({"refine": False, "fuse_lam": 0.0, "prompts": ["{concept} painting"]}, "MACE fusion: with λ=0 the system"),
    ]
    for overrides, message in cases:
        pipe = fresh_pipe()
        before = kv_weights(pipe)
        config = erase.make_config("mace", **{"concepts": ["cat"], "prompts": PROMPTS, "images": str(images),
                                              "steps": 1, **overrides})  # fmt: skip
        with pytest.raises(ValueError, match=message):
            erase.run(pipe, config, progress=False)
        assert all(torch.equal(before[n], w) for n, w in kv_weights(pipe).items()), message


def test_each_concept_checkpoints_under_its_own_key(tmp_path):
    images = write_images(tmp_path / "images", 2)
    values = {"concepts": ["van gogh", "cat"], "kinds": "style", "prompts": PROMPTS, "images": str(images),
              "steps": 2, "lr": 1e-2, "checkpoint_every": 2}  # fmt: skip
    ckpt = tmp_path / "ckpt"
    first = erase.run(fresh_pipe(), erase.make_config("mace", **values), checkpoint_dir=ckpt, progress=False)
    assert (ckpt / "concept-0" / "state.json").is_file() and (ckpt / "concept-1" / "state.json").is_file()
    resumed = erase.run(fresh_pipe(), erase.make_config("mace", **values), checkpoint_dir=ckpt, progress=False)
    assert resumed.delta.digest() == first.delta.digest()  # both LoRAs read back at their last step
    with pytest.raises(ValueError, match="belongs to another run"):
        erase.run(fresh_pipe(), erase.make_config("mace", **{**values, "lr": 2e-2}), checkpoint_dir=ckpt,
                  progress=False)  # fmt: skip
