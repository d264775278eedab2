"""erase.sampling.generate, the one generation path: per-image generators, scheduler swap, encoders, output types."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from erase.sampling import SD_V1_DDIM, ddim_scheduler, generate
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe

PROMPTS = ["a cat", "a dog", "a photo of cat"]
ARGS = {"steps": 3, "guidance": 3.0}


def test_each_image_follows_its_own_seed_and_output_types_agree():
    pipe = fresh_pipe()
    pt = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, batch_size=2)
    assert pt.shape == (3, 3, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert torch.equal(pt, generate(pipe, PROMPTS, [1, 2, 3], **ARGS, batch_size=2)), "same seeds, same pixels"
    other = generate(pipe, PROMPTS, [1, 2, 4], **ARGS, batch_size=2)
    assert torch.equal(other[:2], pt[:2]) and not torch.equal(other[2], pt[2]), "a seed changes only its own image"
    arrays = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, batch_size=2, output_type="np")
    assert isinstance(arrays, np.ndarray) and np.array_equal(arrays, pt.permute(0, 2, 3, 1).numpy())
    pictures = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, batch_size=2, output_type="pil")
    assert [p.size for p in pictures] == [(16, 16)] * 3
    assert np.array_equal(np.asarray(pictures[2]), (arrays[2] * 255).round().astype(np.uint8))


def test_the_scheduler_is_swapped_for_the_call_only():
    pipe = fresh_pipe()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    own = pipe.scheduler
    ddim = ddim_scheduler(own.config)
    with_ddim = generate(pipe, PROMPTS[:1], [5], **ARGS, scheduler=ddim)
    assert pipe.scheduler is own
    assert not torch.equal(with_ddim, generate(pipe, PROMPTS[:1], [5], **ARGS)), "the scheduler was not used"
    pipe.scheduler = ddim
    assert torch.equal(with_ddim, generate(pipe, PROMPTS[:1], [5], **ARGS))

    def broken(*args, **kwargs):
        raise RuntimeError("mid-sampling failure")

    pipe.scheduler = own
    ddim.step = broken
    with pytest.raises(RuntimeError, match="mid-sampling"):
        generate(pipe, PROMPTS[:1], [5], **ARGS, scheduler=ddim)
    assert pipe.scheduler is own, "restored after a failure too"


def test_an_encoder_gives_the_text_embeddings():
    pipe = fresh_pipe()
    calls = []
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)

    def counting(prompts):
        calls.append(list(prompts))
        return encoder(prompts)

    images = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, encoder=counting, batch_size=2)
    assert calls == [PROMPTS[:2], ["", ""], PROMPTS[2:], [""]]
    zeroed = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, encoder=lambda p: encoder(p) * 0, batch_size=2)
    assert images.shape == zeroed.shape and not torch.equal(images, zeroed), "the encoder's embeddings were not used"


def test_bad_arguments():
    pipe = fresh_pipe()
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate(pipe, PROMPTS[:2], [1], **ARGS)
    with pytest.raises(ValueError, match="output_type 'latent'"):
        generate(pipe, PROMPTS[:1], [1], **ARGS, output_type="latent")
    assert ddim_scheduler(SD_V1_DDIM).config.clip_sample is False
    assert len(ddim_scheduler(SD_V1_DDIM, 7).timesteps) == 7
