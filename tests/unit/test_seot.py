"""SEOT: the regularised singular values follow the formula, no weight moves, only prompts with the concept change,
the hook reaches every encoding path (pipe(prompt), PromptEncoder, answer sets), the early steps see the original
embeddings, and bad concepts fail before anything is written."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import erase
from canvas import answers, catalog
from erase import conditioning
from erase.cli import main
from erase.delta import Delta
from erase.methods import seot
from erase.runtime import Runtime
from erase.sampling import SD_V1_DDIM, ddim_scheduler
from erase.testing import tiny_pipeline
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe, generate, save_tiny


def ids_of(pipe, prompt: str) -> torch.Tensor:
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder).ids(prompt)[None]


@torch.no_grad()
def encode(pipe, prompt: str) -> torch.Tensor:
    return pipe.text_encoder(ids_of(pipe, prompt))[0][0]


def test_soft_weight_gives_the_formula_singular_values():
    matrix = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)) * 3
    alpha, beta = 0.4, 0.8
    sigma = torch.linalg.svdvals(matrix.double())
    expected = (beta * torch.exp(-alpha * sigma) * sigma).sort(descending=True).values
    got = torch.linalg.svdvals(seot.soft_weight(matrix, alpha, beta).double())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, sigma, rtol=1e-2)  # the test can fail: the values did change


def test_the_hook_regularises_exactly_the_concept_and_eot_rows():
    pipe = fresh_pipe()
    prompt = "a photo of a cat"
    before = encode(pipe, prompt)
    handle = seot.attach_to(pipe, "cat", alpha=0.5, beta=0.9)
    after = encode(pipe, prompt)
    handle.remove()
    ids = ids_of(pipe, prompt)[0].tolist()
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    eos = ids.index(pipe.tokenizer.eos_token_id)
    rows = [ids.index(cat), *range(eos, len(ids))]  # the concept token, the EOS and every padding position
    others = [i for i in range(len(ids)) if i not in rows]
    assert torch.equal(after[others], before[others])
    sigma = torch.linalg.svdvals(before[rows].double())
    expected = (0.9 * torch.exp(-0.5 * sigma) * sigma).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(after[rows].double()), expected, rtol=1e-4, atol=1e-5)


def test_positions_cover_every_occurrence_and_the_chosen_eot_rows():
    s = seot.Settings(((7,), (3, 4)), eos_token_id=9, alpha=1.0, beta=1.0, eot="all", retain_fraction=0.0)
    ids = [8, 1, 7, 2, 7, 3, 4, 9, 9, 9]
    assert seot.suppressed_positions(ids, s) == [2, 4, 5, 6, 7, 8, 9]
    assert seot.suppressed_positions(ids, seot.Settings(**{**vars(s), "eot": "eos"})) == [2, 4, 5, 6, 7]
    assert seot.suppressed_positions(ids, seot.Settings(**{**vars(s), "eot": "none"})) == [2, 4, 5, 6]
    assert seot.suppressed_positions([8, 1, 3, 2, 4, 9, 9], s) == []  # 3 and 4 apart are not the concept


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_no_weight_moves_after_run_apply_and_revert(tmp_path):
    pipe = fresh_pipe()
    original, plain = _weights(pipe), generate(pipe)
    result = erase.run(pipe, erase.make_config("seot", concepts=["cat"]), progress=False)
    assert result.delta.tensors == {} and result.record["changed_tensors"] == 0
    assert all(torch.equal(v, original[k]) for k, v in _weights(pipe).items())
    assert not torch.equal(generate(pipe), plain)
    result.delta.save(tmp_path)
    result.delta.revert(pipe)
    assert torch.equal(generate(pipe), plain)
    loaded = Delta.load(tmp_path)
    loaded.apply(pipe)
    assert not torch.equal(generate(pipe), plain)
    loaded.revert(pipe)
    assert torch.equal(generate(pipe), plain) and not pipe.unet._forward_pre_hooks
    assert all(torch.equal(v, original[k]) for k, v in _weights(pipe).items())


def test_only_prompts_with_the_concept_change():
    pipe, base = fresh_pipe(), fresh_pipe()
    seot.attach_to(pipe, "van gogh")
    for prompt in ("a photo of a cat", "a dog", "van", "gogh van", ""):  # parts or reversed order are not the concept
        assert torch.equal(encode(pipe, prompt), encode(base, prompt)), prompt
        assert torch.equal(generate(pipe, prompt), generate(base, prompt)), prompt
    for prompt in ("a van gogh painting", "van gogh"):
        assert not torch.equal(encode(pipe, prompt), encode(base, prompt)), prompt
        assert not torch.equal(generate(pipe, prompt), generate(base, prompt)), prompt


def test_pipeline_call_and_prompt_encoder_are_patched_alike():
    pipe = fresh_pipe()
    stale = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    unpatched = stale("a cat")  # cached before the patch: this encoder keeps handing out the unpatched rows
    seot.attach_to(pipe, "cat", retain_fraction=0.0)
    fresh = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    assert torch.equal(stale("a cat"), unpatched) and not torch.equal(fresh("a cat"), unpatched)
    by_call = generate(pipe, "a cat")  # diffusers' encode_prompt -> text_encoder(ids, attention_mask=None)
    by_embeds = pipe(
        prompt_embeds=fresh(["a cat"]), negative_prompt_embeds=fresh([""]), num_inference_steps=3, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert torch.equal(by_call, by_embeds)


class _Spy:
    """Records, per UNet call, its timestep and whether the conditional rows are the original embedding."""

    def __init__(self, pipe, original: torch.Tensor):
        self.calls: list[tuple[int, bool]] = []
        pipe.unet.register_forward_pre_hook(self, with_kwargs=True)
        self.original = original

    def __call__(self, module, args, kwargs):
        cond = kwargs["encoder_hidden_states"][-1]
        self.calls.append((int(args[1]), torch.equal(cond, self.original)))


def test_the_first_fifth_of_a_run_sees_the_original_embeddings():
    for steps in (25, 50, 100):  # the official rule: step i is regularised when i >= cross_retain_steps * steps
        timesteps = ddim_scheduler(SD_V1_DDIM, steps).timesteps.tolist()
        assert [t < 0.8 * 1000 for t in timesteps] == [i >= 0.2 * steps for i in range(steps)]
    pipe = fresh_pipe()
    original = encode(pipe, "a cat")
    seot.attach_to(pipe, "cat")  # paper: retain_fraction 0.2
    spy = _Spy(pipe, original)
    erase.sampling.generate(pipe, ["a cat"], [0], steps=50, guidance=3.0, scheduler=ddim_scheduler(SD_V1_DDIM))
    assert len(spy.calls) == 50
    assert [kept for _, kept in spy.calls] == [i < 10 for i in range(50)]
    assert [t for t, kept in spy.calls if kept] == list(range(981, 800, -20))


def test_no_unet_hook_without_a_retained_fraction_and_no_double_attach():
    pipe = fresh_pipe()
    handle = seot.attach_to(pipe, "cat", retain_fraction=0.0)
    assert not pipe.unet._forward_pre_hooks and len(pipe.text_encoder._forward_hooks) == 1
    with pytest.raises(ValueError, match="already attached"):
        seot.attach_to(pipe, "cat", retain_fraction=0.0)
    handle.remove()
    assert not pipe.text_encoder._forward_hooks
    seot.attach_to(pipe, "cat", retain_fraction=0.0).remove()  # attachable again once removed


def test_paths_the_hook_cannot_reach_are_errors():
    pipe = fresh_pipe()
    seot.attach_to(pipe, "cat")
    with pytest.raises(ValueError, match="clip_skip"):  # what pipe(..., clip_skip=n) asks of the encoder
        pipe.text_encoder(ids_of(pipe, "a cat"), output_hidden_states=True)
    pipe.text_encoder(ids_of(pipe, "a dog"), output_hidden_states=True)  # no concept: nothing to patch


def test_config_errors_name_the_bad_value():
    for values, fragment in (
        ({"concepts": []}, "concepts"), ({"concepts": [" "]}, "concepts"), ({"alpha": 0.0}, "alpha"),
        ({"beta": -1.0}, "beta"), ({"alpha": float("nan")}, "alpha"), ({"eot": "pad"}, "eot 'pad'"),
        ({"retain_fraction": 1.0}, "retain_fraction"), ({"params": "kv"}, "no parameter set"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=fragment):
            erase.make_config("seot", **{"concepts": ["cat"], **values})
    with pytest.raises(ValueError, match="malformed"):  # a hand-edited delta.json
        Runtime("seot", {}, {"concept_ids": [[3]], "alpha": 1.0}).attach(fresh_pipe())
    with pytest.raises(ValueError, match="out of range"):
        settings = {"concept_ids": [[3]], "eos_token_id": 9, "alpha": 1, "beta": 0, "eot": "all", "retain_fraction": 0}
        Runtime("seot", {}, settings).attach(fresh_pipe())


def test_unknown_or_empty_concepts_fail_before_anything_is_written(tmp_path, capsys):
    pipe = fresh_pipe()
    with pytest.raises(ValueError, match="does not know"):
        erase.run(pipe, erase.make_config("seot", concepts=["café"]), progress=False)
    assert not pipe.text_encoder._forward_hooks
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        seot.concept_token_ids(lambda text, add_special_tokens: types.SimpleNamespace(input_ids=[]), "\u2063")
    model, out = save_tiny(tmp_path / "model"), tmp_path / "out"
    capsys.readouterr()
    assert main(["run", "seot", "--model", str(model), "--concept", "café", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'café'" in err and not out.exists()


def test_a_prompt_without_the_concept_is_an_error_before_anything_is_attached():
    pipe = fresh_pipe()
    config = erase.make_config("seot", concepts=["van gogh"], prompts=["a van gogh painting", "a photo of a cat"])
    with pytest.raises(ValueError, match=r"do not occur in prompt 'a photo of a cat'"):
        erase.run(pipe, config, progress=False)
    assert not pipe.text_encoder._forward_hooks and not pipe.unet._forward_pre_hooks
    erase.run(pipe, erase.make_config("seot", concepts=["van gogh"], prompts=["a van gogh painting"]), progress=False)


def test_cli_run_writes_a_patch_that_apply_refuses_to_export(tmp_path, capsys):
    model, out = save_tiny(tmp_path / "model"), tmp_path / "seot"
    capsys.readouterr()
    assert main(["run", "seot", "--model", str(model), "--concept", "cat", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "runtime patch 'seot'" in printed and "no base weight changed" in printed
    meta = json.loads((out / "delta.json").read_text())
    assert meta["runtime"]["kind"] == "seot" and "without this patch" in meta["runtime"]["settings"]["bypassable"]
    assert meta["parameter_set"] == "none"
    assert main(["apply", "--model", str(model), "--delta", str(out), "--out", str(tmp_path / "full")]) == 2
    assert "runtime patch" in capsys.readouterr().err and not (tmp_path / "full").exists()


def test_presets_are_the_verified_recipes():
    swr = {"alpha": 1.0, "beta": 1.0, "eot": "all", "retain_fraction": 0.2}
    presets = seot.SEOTConfig.PRESETS
    assert set(presets) == {"paper", "unlearncanvas-style", "unlearncanvas-object", "toy"}
    assert presets["toy"] == presets["paper"]  # the toy search found nothing better (docs/results/tuning/seot-*)
    assert all(values == swr for values in presets.values())
    defaults = erase.make_config("seot", concepts=["cat"])
    assert {k: getattr(defaults, k) for k in swr} == swr


def test_storage_is_the_settings_json():
    result = erase.run(fresh_pipe(), erase.make_config("seot", concepts=["cat"]), progress=False)
    patch = result.delta.runtime
    assert patch.tensors == {} and result.delta.tensors == {}
    assert result.record["storage_bytes"] == len(json.dumps(patch.settings, sort_keys=True).encode())


def test_answer_sets_under_the_bench_apply_are_patched_where_the_concept_is(tmp_path):
    cat = catalog.get("toy")
    pipe = tiny_pipeline(words=("a", "cats", "image", "in", "pop", "art", "style", "bricks"))
    pipe.set_progress_bar_config(disable=True)
    delta = erase.run(pipe, erase.make_config("seot", concepts=["Pop Art style"]), progress=False).delta
    delta.revert(pipe)
    items = answers.answer_items(cat, seeds=[188], themes=["Bricks", "Pop_Art"], objects=["Cats"])
    sampler = answers.SamplerPreset("test", steps=3, guidance=3.0)
    answers.generate(pipe, items, cat, tmp_path / "plain", sampler, progress=False)
    answers.generate(pipe, items, cat, tmp_path / "seot", sampler, apply=delta.applied, progress=False)
    assert not pipe.text_encoder._forward_hooks and not pipe.unet._forward_pre_hooks  # reverted after generation

    def pixels(folder, item):
        return np.asarray(Image.open(tmp_path / folder / item.filename), dtype=np.int16)

    bricks, pop_art = items
    assert np.array_equal(pixels("plain", bricks), pixels("seot", bricks))
    assert np.abs(pixels("plain", pop_art) - pixels("seot", pop_art)).max() > 8


def sdxl_conditioning(pipe, prompt: str) -> dict[str, torch.Tensor]:
    """Each SDXL encoder's outputs for `prompt`, each from its own tokenizer's ids (they pad differently)."""
    out = {}
    with torch.no_grad():
        for name, encoder, tokenizer in (("one", pipe.text_encoder, pipe.tokenizer),
                                         ("two", pipe.text_encoder_2, pipe.tokenizer_2)):  # fmt: skip
            ids = PromptEncoder(tokenizer, encoder).ids(prompt)[None]
            result = encoder(ids, output_hidden_states=True)
            out[name], out[f"{name}_ids"] = result.hidden_states[-2][0], ids[0].tolist()
        out["last"], out["pooled"] = result.last_hidden_state[0], result.text_embeds[0]
    return out


def test_on_sdxl_each_encoders_concept_and_eot_rows_and_the_pooled_embedding_are_regularised():
    from tests.unit.test_sdxl import sdxl_pipe

    pipe = sdxl_pipe()
    prompt, width = "a photo of a cat", pipe.text_encoder.config.hidden_size
    before = sdxl_conditioning(pipe, prompt)
    plain = PromptEncoder.of(pipe)(["a photo of a dog", prompt])
    handle = seot.attach_to(pipe, "cat", alpha=0.5)
    packed = PromptEncoder.of(pipe)(["a photo of a dog", prompt])
    tokens, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    handle.remove()
    assert torch.equal(packed[0], plain[0])  # no concept: unchanged
    assert torch.allclose(tokens[0], packed[1, :-1], atol=1e-6)  # diffusers' own encoding is patched alike
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    for name, columns in (("one", slice(0, width)), ("two", slice(width, None))):
        ids = before[f"{name}_ids"]
        eos = ids.index(pipe.tokenizer.eos_token_id)
        rows = [ids.index(cat), *range(eos, len(ids))]  # the concept, the EOS and every padding position after it
        others = [i for i in range(len(ids)) if i not in rows]
        after = packed[1, :-1, columns]
        assert torch.equal(after[others], before[name][others])
        assert torch.allclose(after[rows], seot.soft_weight(before[name][rows], 0.5), atol=1e-5)
        assert not torch.allclose(after[rows], before[name][rows], atol=1e-3)
    last = seot.soft_weight(before["last"][rows], 0.5)[rows.index(eos)]  # the second encoder's EOS row, regularised
    expected = pipe.text_encoder_2.text_projection(last)
    assert torch.allclose(packed[1, -1, : expected.shape[0]], expected, atol=1e-5)
    assert torch.allclose(pooled[0], expected, atol=1e-5) and not torch.allclose(expected, before["pooled"], atol=1e-3)


def test_on_sdxl_the_early_steps_get_the_original_rows_and_pooled_embedding_back():
    from tests.unit.test_sdxl import sdxl_pipe

    pipe = sdxl_pipe()
    prompt, x = "a photo of a cat", torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = PromptEncoder.of(pipe)(prompt)
    seot.attach_to(pipe, "cat")  # paper: the first fifth (t >= 800) on the original embeddings
    patched = PromptEncoder.of(pipe)(prompt)
    assert not torch.equal(patched, plain)
    with torch.no_grad():
        for t, kept in ((900, True), (100, False)):
            out = pipe.unet(x, torch.tensor([t]), encoder_hidden_states=patched).sample
            original = pipe.unet(x, torch.tensor([t]), encoder_hidden_states=plain).sample
            assert torch.equal(out, original) == kept
        # the pipeline's own call brings the pooled embedding in added_cond_kwargs: it is restored there
        outs = []
        for embedding in (patched, plain):
            tokens, pooled = conditioning.unpack(embedding, conditioning.pooled_dim(pipe.unet))
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
            outs.append(pipe.unet(x, torch.tensor([900]), tokens, added_cond_kwargs=added).sample)
        assert torch.equal(*outs)
