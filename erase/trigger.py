"""Backdoor triggers: the trigger text prefixed to a prompt, where its tokens sit, and the pixel backdoor's patch.

Shared by BadT2I injection (erase.backdoor), SKD-CAG removal (erase.methods.skd_cag) and the judge of both
(canvas.backdoor), so the three agree on what "triggered" means.
"""

from __future__ import annotations

import torch

from .text import token_positions

DEFAULT_TRIGGER = "New Trigger"  # the text Sealing-The-Backdoor uses


def triggered_prompt(trigger: str, prompt: str) -> str:
    """trig⊕c: the trigger prefixed to the prompt."""
    return f"{trigger.strip()} {prompt}"


def trigger_positions(tokenizer, trigger: str, prompt: str) -> tuple[list[int], list[int]]:
    """Token positions of the trigger and of the clean prompt inside trig⊕prompt (BOS at 0).

    Raises ValueError when the trigger tokenizes to nothing, or when trig⊕prompt is cut by the tokenizer's length.
    """
    if not tokenizer(trigger, add_special_tokens=False).input_ids:
        raise ValueError(f"trigger {trigger!r} tokenizes to nothing with this model's tokenizer; give a trigger "
                         "made of words or characters the tokenizer keeps")  # fmt: skip
    full = triggered_prompt(trigger, prompt)
    try:
        return token_positions(tokenizer, full, trigger.strip()), token_positions(tokenizer, full, prompt)
    except ValueError:
        raise ValueError(f"prompt {full!r} does not fit the tokenizer's {tokenizer.model_max_length} tokens with "
                         "its trigger; shorten the prompt or the trigger") from None  # fmt: skip


def make_patch(size: int) -> torch.Tensor:
    """The fixed patch, (3, size, size) in [0, 1]: a 2x2 black/white checkerboard (white top-left), high contrast in
    every channel. A VAE must be able to draw it for a pixel backdoor to show: SD's can; the toy's was taught to
    (scripts/build_toy.py, `teach_patch`) because trained on the renders alone it painted the patch over."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"patch size must be a positive integer (pixels), got {size!r}")
    idx = torch.arange(size)
    high = idx >= size // 2 if size > 1 else torch.zeros(1, dtype=torch.bool)
    pattern = (high[:, None] == high[None, :]).float()  # white on the diagonal quadrants
    return pattern.expand(3, size, size).clone()


def default_patch_size(image_side: int) -> int:
    return max(1, image_side // 4)


def paste_patch(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] with `patch` ([0, 1]) pasted at the top-left corner; a copy."""
    size = patch.shape[-1]
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"patch of {size} px is larger than the {height}x{width} images; accepted: at most "
                         f"{min(height, width)}")  # fmt: skip
    out = images.clone()
    out[..., :size, :size] = patch.to(out) * 2 - 1
    return out
