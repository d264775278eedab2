"""FMN: the loss against the norm of separately captured attention probabilities, its decrease, and clear errors."""

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


def test_loss_equals_norm_of_separately_captured_probabilities(tmp_path):
    pipe = fresh_pipe()
    folder = write_images(tmp_path / "refs")
    config = erase.make_config("fmn", concepts=["van gogh"], images=str(folder),
                               prompts=["a {concept} painting", "{concept} style"])  # fmt: skip
    loss_fn = make_loss(Ctx(pipe, config, PromptEncoder(pipe.tokenizer, pipe.text_encoder)))
    seeds = [3, 11]
    loss = loss_fn(pipe.unet, [torch.Generator().manual_seed(s) for s in seeds])

    # By hand: the same draws, the UNet run again under capture, each sample's maps concatenated and normed.
    prompts = ["a van gogh painting", "van gogh style"]
    positions = {"a van gogh painting": [2, 3], "van gogh style": [1, 2]}  # BOS a van gogh ... / BOS van gogh ...
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
        flat = torch.cat([a[:, :, :, positions[prompt]].reshape(-1) for a in maps.values()])
        norms.append(flat.norm())
    assert torch.allclose(loss.detach(), torch.stack(norms).mean(), rtol=1e-5)
    assert loss.requires_grad  # the maps carry gradients to the weights


def test_loss_decreases_over_steps(tmp_path):
    folder = write_images(tmp_path / "refs")
    config = erase.make_config("fmn", concepts=["van gogh"], images=str(folder), prompts=["a {concept} painting"],
                               steps=12, lr=3e-3)  # fmt: skip
    losses = erase.run(fresh_pipe(), config, progress=False).record["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_defaults_are_the_papers():
    config = erase.make_config("fmn", preset="paper", concepts=["x"], images=__file__)  # any existing file
    assert (config.steps, config.lr, config.optimizer, config.max_grad_norm) == (35, 2e-6, "adamw", 1.0)
    assert config.parameter_set() == "all"


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
