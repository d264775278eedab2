"""The forget and retain sets of the data-driven erasers (SalUn, Scissorhands) and the two loss terms they train
on: a forget image noised at t, the model's prediction under the image's own prompt pulled to its prediction under
a pseudo prompt (detached), and the plain diffusion loss on a retain image. Each method weighs the terms its own way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .frozen import unwrap
from .images import denoising_target, encoded_image_set, image_prompts, named_image_files, noised
from .text import PromptEncoder

TARGETS = ("pseudo", "noise")


@dataclass
class ForgetRetain:
    """Latents and per-image prompts; `retain` is None when the method runs without a retain term."""

    forget: torch.Tensor  # (N, C, h, w) VAE latents, on the UNet's device
    forget_prompts: list[str]
    pseudo_prompts: list[str]
    retain: torch.Tensor | None  # (M, C, h, w)
    retain_prompts: list[str]


def load_forget_retain(
    pipe,
    forget_images,
    forget_prompts: str | list[str],
    pseudo_prompts: str | list[str],
    retain_images=None,
    retain_prompts: str | list[str] = "",
) -> ForgetRetain:
    """The image sets of a config, encoded once (retain only when `retain_images` is given)."""
    forget, forget_texts = encoded_image_set(pipe, "forget_images", forget_images, forget_prompts)
    pseudo = image_prompts("pseudo_prompts", pseudo_prompts, named_image_files("forget_images", forget_images))
    retain, retain_texts = (
        encoded_image_set(pipe, "retain_images", retain_images, retain_prompts)
        if retain_images is not None
        else (None, [])
    )
    return ForgetRetain(forget, forget_texts, pseudo, retain, retain_texts)


def relabel_terms(
    model: nn.Module,
    scheduler,
    encode: PromptEncoder,
    data: ForgetRetain,
    generators: list[torch.Generator],
    target: str = "pseudo",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(forget term, retain term), each a mean over the samples (one forget and one retain image per generator,
    drawn at random): `‖e(x_t, c_f) − sg(e(x_t, c'))‖²` with the pseudo prompt c' and the model being trained as
    the detached target (`target="pseudo"`), or the diffusion loss `‖e(x_t, c_f) − ε‖²` (`"noise"`); and
    `‖e(x_r,t, c_r) − ε‖²`, None without retain images. One UNet call with gradients for both terms."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    forget, retain = data.forget, data.retain
    xs, ts, f_targets, forget_embs, pseudo_embs, r_xs, r_ts, r_targets, r_embs = [], [], [], [], [], [], [], [], []
    for g in generators:
        j = int(torch.randint(len(forget), (1,), generator=g))
        x_t, t, noise = noised(scheduler, forget[j : j + 1], g)
        xs.append(x_t)
        ts.append(t)
        f_targets.append(denoising_target(scheduler, forget[j : j + 1], noise, t))
        forget_embs.append(encode(data.forget_prompts[j]))
        pseudo_embs.append(encode(data.pseudo_prompts[j]))
        if retain is not None:
            k = int(torch.randint(len(retain), (1,), generator=g))
            rx_t, rt, r_noise = noised(scheduler, retain[k : k + 1], g)
            r_xs.append(rx_t)
            r_ts.append(rt)
            r_targets.append(denoising_target(scheduler, retain[k : k + 1], r_noise, rt))
            r_embs.append(encode(data.retain_prompts[k]))
    x_t, t = torch.cat(xs), torch.cat(ts)
    if target == "pseudo":
        with torch.no_grad():  # relabelled target from the model being trained, detached (the public codes)
            forget_target = unwrap(model)(x_t, t, encoder_hidden_states=torch.cat(pseudo_embs)).sample
    else:
        forget_target = torch.cat(f_targets)
    n = len(xs)
    inputs, steps, embs = [x_t, *r_xs], [t, *r_ts], [torch.cat(forget_embs), *r_embs]
    prediction = model(torch.cat(inputs), torch.cat(steps), encoder_hidden_states=torch.cat(embs)).sample.float()
    forget_term = F.mse_loss(prediction[:n], forget_target.float())
    retain_term = F.mse_loss(prediction[n:], torch.cat(r_targets).float()) if retain is not None else None
    return forget_term, retain_term
