"""Tiny Stable-Diffusion-shaped pipelines built in code, for tests and benchmarks (no network, no weights)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .sampling import SD_V1_DDIM

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def word_tokenizer(
    words: list[str] | tuple[str, ...], model_max_length: int = 16, pad_token: str = "<|endoftext|>"
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every lowercase letter, digit and punctuation mark, plus the
    given words whole; unknown words split into characters, so any prompt tokenizes. SD 1.x pads with the end
    token, SD 2.x's OpenCLIP tokenizer with "!" (`pad_token`)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-_"
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        if not word.isalnum():
            raise ValueError(f"tokenizer words must be alphanumeric, got {word!r}")
        # Merge left to right: ((a b) c) ... then the final piece with its end-of-word marker.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            if pair not in merges:
                merges.append(pair)
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def clip_text_encoder(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int | None = None,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder sized to `tokenizer` (MLP width 2x hidden), as small models use;
    with `projection_dim`, the projected kind SDXL's second encoder is (its pooled output feeds the UNet).
    `hidden_act`: OpenAI CLIP's quick_gelu (SD 1.x), or OpenCLIP's gelu (SD 2.x)."""
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act=hidden_act,
            **extra,
        )
    )


TINY_WORDS = ("a", "photo", "of", "cat", "dog", "style", "van", "gogh", "painting", "in", "image")


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def tiny_pipeline(seed: int = 0, words: tuple[str, ...] = TINY_WORDS, sample_size: int = 8) -> StableDiffusionPipeline:
    """A randomly initialised pipeline with SD's structure (attn1/attn2 transformer blocks, KL VAE, CLIP text
    encoder) at toy size, deterministic for `seed`."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32)
    scheduler = DDIMScheduler(**SD_V1_DDIM)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SD 2.x (stabilityai/stable-diffusion-2-1, 768 px) samples with DDIM on SD v1's noise schedule and predicts v.
SD2_DDIM = {**SD_V1_DDIM, "prediction_type": "v_prediction", "timestep_spacing": "leading"}


def tiny_sd2_pipeline(seed: int = 0, words: tuple[str, ...] = TINY_WORDS) -> StableDiffusionPipeline:
    """A randomly initialised pipeline with SD 2.x's structure at toy size, deterministic for `seed`: linear
    projections in and out of the transformer blocks, a head count per block (SD2's attention_head_dim list),
    attention upcast, a CLIP text encoder with OpenCLIP's gelu and "!" padding (diffusers loads SD2's OpenCLIP as
    CLIPTextModel), and DDIM with SD2's settings and prediction_type "v_prediction"."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words, pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, hidden_act="gelu")
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD2_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_shaped_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """`tiny_pipeline` with SD v1's UNet layout (4 levels, 2 layers, cross-attention in 3) at a fifth of its width:
    big enough that compute, not Python, dominates a step (for benchmarks)."""
    pipe = tiny_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] = TINY_WORDS) -> StableDiffusionXLPipeline:
    """A randomly initialised pipeline with SDXL's structure at toy size: two CLIP text encoders (widths 16 and 32,
    the second projected; one tokenizer pads with the end token, the other with "!", as SDXL's do), a 48-d
    cross-attention context (their penultimate states side by side), linear projections, several transformer layers
    per block and the "text_time" added conditions (pooled text embedding and six time ids); deterministic for
    `seed`."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = word_tokenizer(words), word_tokenizer(words, pad_token="!")  # pads as SDXL's pair do
    text_encoder = clip_text_encoder(tokenizer, hidden_size=16)
    text_encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=24)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=16 + 32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 24,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**SD_V1_DDIM)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def sdxl_shaped_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """`tiny_sdxl_pipeline` with SDXL base's UNet layout (3 levels, 2 layers, 1 / 2 / 10 transformer layers, linear
    projections, text_time conditions) at a fifth of its width: for benchmarks of the SDXL code paths."""
    pipe = tiny_sdxl_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(64, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), cross_attention_dim=48,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=6 * 32 + 24,
    )  # fmt: skip
    return pipe
