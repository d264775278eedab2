"""FMN: the loss against the norm of separately captured attention probabilities, its decrease, and clear errors."""

import copy
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

import erase
from erase.attention import capture_cross_attention
from erase.images import encode_latents, image_size, load_images, noised
from erase.methods.fmn import make_loss
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe, unet_state


def write_images(folder, n: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


@dataclass
class Ctx:
    pipe: object
    config: object
    encode: PromptEncoder


# Positions by hand, in the tiny tokenizer's 16 padded tokens: "BOS a van gogh painting EOS pad…" and
# "BOS van gogh style EOS pad…". The pooler positions are those holding EOS's id (SHI-Labs/Forget-Me-Not
# src/train_attn.py:143-153 matches the id of <|endoftext|>): EOS and every pad when the pad token is EOS, else EOS.
CONCEPT = {"a van gogh painting": [2, 3], "van gogh style": [1, 2]}
EOS_AT = {"a van gogh painting": 5, "van gogh style": 4}


def expected_positions(prompt: str, pooler: bool, pad_is_eos: bool) -> list[int]:
    if not pooler:
        return CONCEPT[prompt]
    pooled = list(range(EOS_AT[prompt], 16)) if pad_is_eos else [EOS_AT[prompt]]
    return CONCEPT[prompt] + pooled


@pytest.mark.parametrize(("pooler", "pad_is_eos"), [(False, True), (True, True), (True, False)])
def test_loss_equals_norm_of_separately_captured_probabilities(tmp_path, pooler, pad_is_eos):
    pipe = fresh_pipe()
    if not pad_is_eos:  # a tokenizer that pads with another token, as SD 2's pads with "!"
        pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
        pipe.tokenizer.pad_token = "!"
        assert pipe.tokenizer.pad_token_id != pipe.tokenizer.eos_token_id
    folder = write_images(tmp_path / "refs")
    config = erase.make_config("fmn", concepts=["van gogh"], images=str(folder), pooler_positions=pooler,
                               prompts=["a {concept} painting", "{concept} style"])  # fmt: skip
    loss_fn = make_loss(Ctx(pipe, config, PromptEncoder(pipe.tokenizer, pipe.text_encoder)))
    seeds = [3, 11]
    loss = loss_fn(pipe.unet, [torch.Generator().manual_seed(s) for s in seeds])

    # By hand: the same draws, the UNet run again under capture, each sample's maps concatenated and normed.
    prompts = ["a van gogh painting", "van gogh style"]
    latents = encode_latents(pipe.vae, load_images(str(folder), image_size(pipe)))
    norms = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        prompt = prompts[int(torch.randint(2, (1,), generator=g))]
        image = int(torch.randint(latents.shape[0], (1,), generator=g))
        x_t, t, _ = noised(pipe.scheduler, latents[image : image + 1], g)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad(), capture_cross_attention(pipe.unet) as store:
            pipe.unet(x_t, t, encoder_hidden_states=pipe.text_encoder(ids)[0])
            maps = store.take()
        assert len(maps) == 4  # every attn2 layer of the tiny UNet
        positions = expected_positions(prompt, pooler, pad_is_eos)
        flat = torch.cat([a[:, :, :, positions].reshape(-1) for a in maps.values()])
        norms.append(flat.norm())
    assert torch.allclose(loss.detach(), torch.stack(norms).mean(), rtol=1e-5)
    assert loss.requires_grad  # the maps carry gradients to the weights


@pytest.mark.parametrize(("pooler", "factor"), [(False, 0.5), (True, 0.9)])
def test_loss_decreases_over_steps(tmp_path, pooler, factor):
    # With the pooler positions (EOS and 10 pads of 16 tokens) most of the attention sits on the loss's positions
    # and has only 4 others to move to, so it falls more slowly.
    folder = write_images(tmp_path / "refs")
    config = erase.make_config("fmn", concepts=["van gogh"], images=str(folder), prompts=["a {concept} painting"],
                               steps=12, lr=3e-3, pooler_positions=pooler)  # fmt: skip
    losses = erase.run(fresh_pipe(), config, progress=False).record["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3


def test_presets_are_the_published_recipes():
    def preset(name):
        return erase.make_config("fmn", preset=name, concepts=["x"], images=__file__)  # any existing file

    # SHI-Labs/Forget-Me-Not configs/attn.yaml: max_train_steps 35, learning_rate 2e-6, adam_weight_decay 0.01,
    # max_grad_norm 1, only_optimize_ca false, use_pooler true (src/train_attn.py uses torch.optim.AdamW).
    paper = preset("paper")
    assert (paper.steps, paper.lr, paper.optimizer, paper.weight_decay, paper.max_grad_norm) == (
        35, 2e-6, "adamw", 0.01, 1.0)  # fmt: skip
    assert paper.parameter_set() == "all" and paper.pooler_positions is True
    # UnlearnCanvas machine_unlearning/mu_forget_me_not_fgm/README.md: styles "--lr=2e-5 --max-steps 100 --only_xa",
    # objects "--lr=2e-5 --max-steps 100"; train_attn.py:185 use_pooler=True, :211-213 wd 0.01, clip 1,
    # :84-86 prompts "a {c} image" (object) / "an image in {c} Style" (style).
    for kind, params, prompt in (
        ("style", "xattn", "an image in {concept} Style"),
        ("object", "all", "a {concept} image"),
    ):
        config = preset(f"unlearncanvas-{kind}")
        assert (config.steps, config.lr, config.optimizer, config.weight_decay, config.max_grad_norm) == (
            100, 2e-5, "adamw", 0.01, 1.0)  # fmt: skip
        assert config.parameter_set() == params and config.pooler_positions is True and config.prompts == [prompt]
    # The toy style preset was chosen with the official loss's pooler positions (docs/results/tuning/fmn-style-toy.md)
    assert preset("toy").pooler_positions is True


def test_concept_absent_from_prompt_tokens_is_an_error(tmp_path):
    pipe = fresh_pipe()
    before = unet_state(pipe)
    config = erase.make_config("fmn", concepts=["van gogh"], images=str(write_images(tmp_path / "refs")),
                               prompts=["a photo of a cat"], steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="not among the tokens"):
        erase.run(pipe, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_missing_or_empty_images_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        erase.make_config("fmn", concepts=["van gogh"], images=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        erase.make_config("fmn", concepts=["van gogh"], images=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="images is required"):
        erase.make_config("fmn", concepts=["van gogh"])


def test_bad_concepts_and_prompts_are_refused(tmp_path):
    folder = str(write_images(tmp_path / "refs"))
    with pytest.raises(ValueError, match="concepts must be"):
        erase.make_config("fmn", concepts=[], images=folder)
    with pytest.raises(ValueError, match="prompts must be"):
        erase.make_config("fmn", concepts=["cat"], images=folder, prompts=[])


def test_bench_inputs_on_unlearncanvas_use_its_prompts(tmp_path):
    """UnlearnCanvas mu_forget_me_not_fgm/train_attn.py:84-86 trains on one prompt per kind; the toy catalog keeps
    every benchmark prompt (what its preset was measured with)."""
    from canvas.method_inputs import method_inputs
    from erase.catalog import get

    cat = get("unlearncanvas-50")
    assert method_inputs("fmn", cat, "Pop_Art", tmp_path)["prompts"] == ["an image in {concept} Style"]
    cats = method_inputs("fmn", cat, "Cats", tmp_path)
    assert cats["prompts"] == ["a {concept} image"] and cats["concepts"] == ["Cats"]
    assert len(cats["images"]) == 51  # 1.jpg of Cats in every theme (create_data_samples_for_unlearning.py)
    toy = get("toy")
    assert len(method_inputs("fmn", toy, "Pop_Art", tmp_path)["prompts"]) == len(toy.objects)
