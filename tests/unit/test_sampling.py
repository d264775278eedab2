"""erase.sampling.generate, the one generation path: per-image generators, scheduler swap, encoders, output types,
and its direct loop giving the plain pipeline call's images."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from erase import sampling
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
    assert calls == [PROMPTS[:2], [""], PROMPTS[2:], [""]], "each batch's prompts, the empty prompt once per batch"
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


def _pipeline_call(pipe, prompts, seeds, steps, guidance, eta=0.0, **text):
    """The reference: one plain diffusers call with a CPU generator per image, as images (N, H, W, 3) in [0, 1]."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    text = text or {"prompt": prompts}
    return pipe(**text, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=generators,
                output_type="np").images  # fmt: skip


@pytest.mark.parametrize(
    "scheduler, guidance, eta",
    [("ddim", 3.0, 0.0), ("ddim", 3.0, 0.7), ("ddim", 1.0, 0.0), ("euler", 5.0, 0.0)],
)  # eta > 0 draws step noise from the generators; guidance 1 skips the unconditional branch; Euler scales inputs
def test_the_direct_loop_gives_the_pipeline_calls_images(scheduler, guidance, eta):
    pipe = fresh_pipe()
    pipe.scheduler = (ddim_scheduler(SD_V1_DDIM) if scheduler == "ddim" else
                      EulerDiscreteScheduler.from_config(SD_V1_DDIM))  # fmt: skip
    assert sampling._direct(pipe), "the tiny pipeline must take the direct loop, else this compares a path to itself"
    args = {"steps": 4, "guidance": guidance, "eta": eta}
    ours = generate(pipe, PROMPTS, [1, 2, 3], **args, batch_size=3, output_type="np")
    reference = _pipeline_call(pipe, PROMPTS, [1, 2, 3], **args)
    assert np.abs(ours - reference).max() < 1e-5
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    ours = generate(pipe, PROMPTS, [1, 2, 3], **args, encoder=encoder, batch_size=3, output_type="np")
    reference = _pipeline_call(pipe, PROMPTS, [1, 2, 3], **args, prompt_embeds=encoder(PROMPTS),
                               negative_prompt_embeds=encoder([""] * 3))  # fmt: skip
    assert np.abs(ours - reference).max() < 1e-5


def test_a_pipeline_the_loop_does_not_cover_is_called_as_such():
    class Custom(StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs["generator"])
            return super().__call__(*args, **kwargs)

    calls = []
    pipe = Custom(**fresh_pipe().components)
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, PROMPTS, [1, 2, 3], **ARGS, batch_size=2, output_type="np")
    assert len(calls) == 2 and [len(g) for g in calls] == [2, 1]
    assert np.abs(images - _pipeline_call(fresh_pipe(), PROMPTS, [1, 2, 3], **ARGS)).max() < 1e-5
