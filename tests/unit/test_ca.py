"""CA: both losses equal their formulas computed by hand on fixed inputs; prompts, anchor-image cache, options."""

import numpy as np
import pytest
import torch
from PIL import Image

import erase
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.images import encode_latents, generate_images
from erase.methods import ca
from erase.params import select
from erase.paths import cache_dir
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe

ANCHOR, TARGET = "a painting of a cat", "a van gogh painting of a cat"


def small_ca(tmp_path, **overrides):
    values = {
        "concepts": ["van gogh painting"], "anchors": ["painting"], "anchor_prompts": [ANCHOR], "steps": 2,
        "lr": 1e-3, "num_anchor_images": 1, "sample_steps": 2, "cache_dir": str(tmp_path / "cache"), "batch_size": 1,
    }  # fmt: skip
    values.update(overrides)
    return erase.make_config("ca", **values)


def captured_loss(pipe, config):
    """The loss function CA hands to the training loop, captured instead of trained."""
    params = select(pipe.unet, config.parameter_set())
    ctx = RunContext(pipe, config, params, FrozenOriginal(pipe.unet, list(params)),
                     PromptEncoder(pipe.tokenizer, pipe.text_encoder), progress=False)  # fmt: skip
    return ca.make_loss(ctx)


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def fixed_draws(monkeypatch, count: int):
    """Make CA's noising return fixed (x_t, t, ε) triples, in order; returns them."""
    g = torch.Generator().manual_seed(123)
    draws = [(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([100 + 300 * i]), torch.randn(1, 4, 8, 8, generator=g))
             for i in range(count)]  # fmt: skip
    calls = iter(draws)
    monkeypatch.setattr(ca, "noised", lambda scheduler, latents, generator: next(calls))
    return draws


@pytest.mark.parametrize("loss", ["model", "noise"])
@pytest.mark.parametrize("prior", [False, True])
def test_loss_equals_formula_by_hand(tmp_path, monkeypatch, loss, prior):
    pipe = fresh_pipe()
    config = small_ca(tmp_path, loss=loss, prior_preservation=prior, prior_weight=0.7)
    loss_fn = captured_loss(pipe, config)
    draws = fixed_draws(monkeypatch, 2 if prior else 1)
    unet = pipe.unet
    unet.requires_grad_(False)
    key = next(p for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    key.requires_grad_(True)

    value = loss_fn(unet, [torch.Generator().manual_seed(0)])
    (grad,) = torch.autograd.grad(value, [key])

    (x_t, t, noise) = draws[0]
    prediction = unet(x_t, t, encoder_hidden_states=embed(pipe, TARGET)).sample
    if loss == "model":  # the model being trained, without gradient
        target = unet(x_t, t, encoder_hidden_states=embed(pipe, ANCHOR)).sample.detach()
    else:
        target = noise
    expected = ((prediction - target) ** 2).mean()
    if prior:
        px_t, pt, pnoise = draws[1]
        expected = (
            expected + 0.7 * ((unet(px_t, pt, encoder_hidden_states=embed(pipe, ANCHOR)).sample - pnoise) ** 2).mean()
        )
    (expected_grad,) = torch.autograd.grad(expected, [key])
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_target_prompts_and_pairing(tmp_path):
    config = small_ca(tmp_path, concepts=["grumpy cat"], anchors=["cat"], anchor_prompts=["A Cat on a mat", "a cat"])
    assert config.target_prompt("A Cat on a mat", 0) == "A grumpy cat on a mat"
    style = small_ca(tmp_path, concepts=["Van Gogh"], anchors=["painting"], prompt_mode="style",
                     anchor_prompts=["a painting of a cat"])  # fmt: skip
    # The official forms (diffusers/utils.py): r = 0 the first, r = 1 or 2 the second.
    assert [style.target_prompt("a painting of a cat", 0, r) for r in range(3)] == [
        "a painting of a cat, in the style of Van Gogh", "in Van Gogh's style, a painting of a cat",
        "in Van Gogh's style, a painting of a cat",
    ]  # fmt: skip
    spelled = small_ca(tmp_path, concepts=["Van Gogh"], anchors=["painting"], prompt_mode="style",
                       anchor_prompts=["a painting of a cat"], concept_form="{concept} Style")  # fmt: skip
    assert spelled.target_prompt("a painting of a cat", 0, 0) == "a painting of a cat, in the style of Van Gogh Style"
    two = small_ca(tmp_path, concepts=["van gogh", "monet"], anchors=["painting", "photo"],
                   anchor_prompts=["a painting", "a photo", "a photo of a painting"])  # fmt: skip
    assert two.pairs() == [[0], [1], [0, 1]]
    assert small_ca(tmp_path, anchor_prompts=None).prompts() == ["painting"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anchor_prompts": ["a photo of a dog"]}, "contains none of the anchors"),
        ({"anchors": ["a", "b"]}, "one per concept"),
        ({"anchors": []}, "anchors must be"),
        ({"concepts": [""]}, "concepts must be"),
        ({"loss": "l1"}, "loss 'l1'"),
        ({"prompt_mode": "append"}, "prompt_mode 'append'"),
        ({"params": "qkv"}, "parameter set 'qkv'"),
        ({"num_anchor_images": 0}, "num_anchor_images"),
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"style_forms": ["{prompt} by {artist}"]}, "may only use the fields"),
        ({"style_forms": ["{prompt} only"]}, "must contain {concept}"),
        ({"concept_form": "Style"}, "must contain {concept}"),
        ({"anchor_form": "{obj} in {style} style"}, "may only use the fields"),
        ({"resolution": 4}, "resolution must be"),
        ({"anchor_prompts": None, "anchor_catalog": "toy", "anchors": ["Van Gogh"]}, "not a theme or object"),
        ({"anchor_prompts": None, "anchor_catalog": "nope"}, "unknown catalog 'nope'"),
    ],
)
def test_bad_config_values_name_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_ca(tmp_path, **overrides)


def test_parameter_groups():
    base = {"concepts": ["x"], "anchors": ["y"]}
    assert erase.make_config("ca", **base).parameter_set() == "kv"
    pipe = fresh_pipe()
    for group, named in (("attention", "xattn"), ("full", "all"), ("kv", "kv")):  # the code's group names
        config = erase.make_config("ca", params=group, **base)
        assert set(select(pipe.unet, config.parameter_set())) == set(select(pipe.unet, named))


def test_anchor_images_are_generated_once_and_reused(tmp_path, monkeypatch):
    config = small_ca(tmp_path, num_anchor_images=3, anchor_prompts=[ANCHOR, "a painting of a dog"])
    first = erase.run(fresh_pipe(), config, progress=False)
    assert len(list((tmp_path / "cache").glob("*.png"))) == 3
    monkeypatch.setattr(type(fresh_pipe()), "__call__", lambda *a, **k: pytest.fail("anchor images regenerated"))
    again = erase.run(fresh_pipe(), config, progress=False)
    assert all(torch.equal(first.delta.tensors[k], again.delta.tensors[k]) for k in first.delta.tensors)
    assert set(first.delta.tensors) <= {f"unet.{n}" for n in select(fresh_pipe().unet, "kv")}


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path))
    assert cache_dir("ca") == tmp_path / "ca"
    assert cache_dir("ca", str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv("ERASEKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("ca") == tmp_path / "xdg" / "erasekit" / "ca"


@pytest.mark.parametrize("preset", list(ca.CAConfig.PRESETS))
def test_presets_build(preset, tmp_path):
    captions = tmp_path / "painting.txt"
    captions.write_text("a painting of a house\n\nOil Painting of a lake\n")
    files = {"anchor_prompts_file": str(captions)} if preset in ca.CAPTION_FILES else {}
    target = {"concepts": ["Cats"], "anchors": ["Fishes"]} if preset.endswith("object") else {
        "concepts": ["Van Gogh"], "anchors": ["Photo"]}  # fmt: skip
    config = erase.make_config("ca", preset=preset, **target, **files)
    assert config.preset == preset and config.lr > 0
    if files:
        assert config.prompts() == ["a painting of a house", "Oil Painting of a lake"]


def test_scaled_lr_is_the_official_scale_lr():
    # base lr × per-GPU batch × GPUs × accumulation; our batch_size is that product; × 2 with prior preservation.
    for per_gpu, gpus, accumulation in ((4, 1, 1), (4, 2, 1), (2, 2, 2), (8, 1, 1)):
        whole = per_gpu * gpus * accumulation
        assert ca.scaled_lr(2e-6, whole) == pytest.approx(2e-6 * per_gpu * gpus * accumulation, rel=1e-12)
        assert ca.scaled_lr(2e-6, whole, True) == pytest.approx(2 * 2e-6 * per_gpu * gpus * accumulation, rel=1e-12)
    assert ca.scaled_lr(2e-6, 4) == pytest.approx(8e-6) and ca.scaled_lr(2e-6, 8) == pytest.approx(1.6e-5)


# The authors' values: diffusers/README.md + train.py + utils.py (paper) and UnlearnCanvas's mu_concept_ablation_ca
# style_script.py / class_script.py / configs / train.py / src/finetune_data.py.
UC_FORMS = [
    "{prompt}, in the style of {concept} {concept}", "{prompt}, in the style of {concept}",
    "{concept} {concept} inspired painting, {prompt}", "{concept} inspired painting, {prompt}",
    "in {concept} {concept}'s style, {prompt}", "in {concept}'s style, {prompt}",
]  # fmt: skip
RECIPES = {
    # 2 GPUs x batch 4, 100 steps, lr 2e-6 x 4 x 2.
    "paper": {"steps": 100, "batch_size": 8, "lr": 2e-6 * 4 * 2, "optimizer": "adamw", "weight_decay": 1e-2,
              "loss": "model", "num_anchor_images": 1000, "prior_preservation": False, "hflip": True,
              "style_forms": ["{prompt}, in the style of {concept}", "in {concept}'s style, {prompt}",
                              "in {concept}'s style, {prompt}"], "concept_form": "{concept}"},
    # one GPU (--gpus 0,) x batch 4, lr 2e-6 x 4.
    "unlearncanvas-style": {"steps": 1000, "batch_size": 4, "lr": 2e-6 * 4, "optimizer": "adamw",
                            "weight_decay": 1e-2, "loss": "model", "prior_preservation": False,
                            "prompt_mode": "style", "style_forms": UC_FORMS, "concept_form": "{concept} Style",
                            "num_anchor_images": 200, "resolution": 256, "hflip": True},
    "unlearncanvas-object": {"steps": 2000, "batch_size": 4, "lr": 2e-6 * 4, "optimizer": "adamw",
                             "weight_decay": 1e-2, "loss": "model", "prior_preservation": False,
                             "prompt_mode": "style", "style_forms": UC_FORMS,
                             "concept_form": "An image of {concept}", "num_anchor_images": 80, "resolution": None,
                             "hflip": True},
}  # fmt: skip


@pytest.mark.parametrize("preset", list(RECIPES))
def test_presets_are_the_recipes_they_are_named_after(preset, tmp_path):
    (tmp_path / "Cats.txt").write_text("a photo of a cat\n")
    config = erase.make_config("ca", preset=preset, concepts=["Cats"], anchors=["cat"],
                               anchor_prompts_file=str(tmp_path / "{concept}.txt"))  # fmt: skip
    for name, value in RECIPES[preset].items():
        assert getattr(config, name) == (pytest.approx(value) if name == "lr" else value), name
    assert config.parameter_set() == "kv"  # --parameter_group cross-attn / freeze_model crossattn-kv
    assert config.prompts() == ["a photo of a cat"]  # {concept} in the path: their per-object caption files
    if preset == "paper":  # as many samples as the README's one-GPU command (200 steps x batch 4)
        assert config.steps * config.batch_size == 200 * 4


def test_authors_caption_files_are_required_and_named():
    with pytest.raises(ValueError, match="painting.txt"):
        erase.make_config("ca", preset="unlearncanvas-style", concepts=["Van Gogh"], anchors=["Photo"])
    with pytest.raises(FileNotFoundError, match="sd_prompt_Cats.txt"):
        erase.make_config("ca", preset="unlearncanvas-object", concepts=["Cats"], anchors=["Dogs"],
                          anchor_prompts_file="nowhere/sd_prompt_{concept}.txt")  # fmt: skip


def test_toy_trains_on_captions_that_are_not_the_benchmark_prompts():
    from canvas.method_inputs import method_inputs
    from erase.catalog import get

    cat = get("toy")
    benchmark = set(cat.prompts())
    for target, preset in (("Pop_Art", "toy"), ("Cats", "toy-object")):  # the bench's presets of each kind
        config = erase.make_config("ca", preset=preset, **method_inputs("ca", cat, target, None))
        anchors = config.prompts()
        targets = [config.target_prompt(p, 0) for p in anchors]
        assert anchors and not benchmark & set(anchors) and not benchmark & set(targets)
        words = "Pop Art" if target == "Pop_Art" else "Cats"
        assert all(words in t for t in targets)
    photo = erase.make_config("ca", preset="toy", concepts=["Pop Art"])
    assert set(photo.prompts()) == {"An image in Photo style."}  # the toy preset's form
    tuned = erase.make_config("ca", preset="toy", concepts=["Pop Art"], anchor_form="Photo style image of {object}")
    assert tuned.prompts()[0] == f"Photo style image of {cat.objects[0]}"


def test_hflip_draws_the_flipped_images_and_resolution_sets_the_latent_size(tmp_path, monkeypatch):
    pipe = fresh_pipe()
    config = small_ca(tmp_path, hflip=True, resolution=32, num_anchor_images=2)
    seen = []
    real_noised = ca.noised
    monkeypatch.setattr(ca, "noised", lambda scheduler, x0, g: (seen.append(x0), real_noised(scheduler, x0, g))[1])
    loss_fn = captured_loss(pipe, config)
    loss_fn(pipe.unet, [torch.Generator().manual_seed(i) for i in range(16)])
    images = generate_images(pipe, [ANCHOR] * 2, [0, 1], steps=config.sample_steps, guidance=config.sample_guidance,
                             cache_dir=cache_dir("ca", config.cache_dir))  # fmt: skip
    arrays = [np.asarray(im.resize((32, 32), Image.BICUBIC), dtype=np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (2, 3, 32, 32)
    references = {"straight": encode_latents(pipe.vae, pixels), "flipped": encode_latents(pipe.vae, pixels.flip(-1))}
    assert seen and all(x0.shape[-1] == 32 // pipe.vae_scale_factor for x0 in seen)

    def kind(x0: torch.Tensor) -> str:
        return next(k for k, ref in references.items() for j in range(2) if torch.allclose(x0[0], ref[j], atol=1e-5))

    kinds = {kind(x0) for x0 in seen}
    assert kinds == {"straight", "flipped"}
