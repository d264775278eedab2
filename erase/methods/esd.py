"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023).

Fine-tune the model so that, for the concept c, it predicts the negatively guided noise of the frozen original:
    target = e0(x_t, u) - η·(e0(x_t, c) - e0(x_t, u)),   loss = ‖e(x_t, c) - sg(target)‖²
with u = ∅ (or `erase_from`). x_t comes from a partial DDIM run (guidance `start_guidance` on c) stopped at a
random step, by the frozen model (later code, default) or the model being trained (original paper code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..config import TrainingConfig, texts
from ..context import RunContext
from ..frozen import unwrap
from ..sampling import ddim_partial, ddim_scheduler, randn
from ..train import LossFn

SAMPLERS = ("frozen", "trained")


@dataclass
class ESDConfig(TrainingConfig):
    """ESD's parameter sets are its variants: `params` "esd-x" (default), "esd-u", "esd-x-strict" or "esd-all"
    (aliases in erase.params)."""

    DEFAULT_PARAMS: ClassVar[str] = "esd-x"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper: 1000 iterations, lr 1e-5, η 1, batch 1, Adam.
        "paper": {"steps": 1000, "lr": 1e-5, "negative_guidance": 1.0},
        # The authors' later code: 200 iterations, lr 5e-5, η 2, bf16.
        "fast": {"steps": 200, "lr": 5e-5, "negative_guidance": 2.0, "mixed_precision": "bf16"},
        # Measured on the toy (1.5 M-parameter UNet; paper values move it too little), scripts/tune_toy.py on
        # Pop_Art: UA 94 / IRA 88 in 49 s. 200 steps at lr 1e-3 (η 2 or 4) left UA under 40; 300 at 2e-3 IRA 76.
        "toy": {"steps": 250, "lr": 1.5e-3, "negative_guidance": 3.0, "ddim_steps": 25, "start_guidance": 3.0},
    }

    concepts: list[str] = field(default_factory=list)
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    sample_with: str = "frozen"
    erase_from: str | None = None
    legacy_timestep_mapping: bool = False  # the public code's t = [k/n·1000, (k+1)/n·1000) for x_t after k steps

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = texts("concepts", self.concepts)
        if self.sample_with not in SAMPLERS:
            raise ValueError(f"sample_with {self.sample_with!r} is not one of {', '.join(SAMPLERS)}")
        if not isinstance(self.ddim_steps, int) or self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be a positive integer, got {self.ddim_steps!r}")


def esd_target(
    frozen_noise, x_t: torch.Tensor, t: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor, eta: float
) -> torch.Tensor:
    """`e0(x,u) − η·(e0(x,c) − e0(x,u))` from one batched frozen call."""
    both = frozen_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([anchor, concept]))
    e_anchor, e_concept = both.chunk(2)
    return e_anchor - eta * (e_concept - e_anchor)


def make_loss(ctx: RunContext) -> LossFn:
    """The ESD loss for the training loop, with the anchor embeddings and the DDIM schedule prepared once."""
    cfg: ESDConfig = ctx.config
    unet = ctx.pipe.unet
    device, dtype = unet.device, unet.dtype
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    empty = ctx.encode("")
    anchor = ctx.encode(cfg.erase_from) if cfg.erase_from is not None else empty
    scheduler = ddim_scheduler(ctx.pipe.scheduler.config, cfg.ddim_steps)
    train_steps = scheduler.config.num_train_timesteps

    def frozen_noise(x, t, emb):
        return ctx.frozen(unet, x, t, encoder_hidden_states=emb).sample

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        def trained_noise(x, t, emb):
            with torch.no_grad():
                return unwrap(model)(x, t, encoder_hidden_states=emb).sample

        sampler = frozen_noise if cfg.sample_with == "frozen" else trained_noise
        xs, ts, concepts = [], [], []
        for g in generators:
            concept = ctx.encode(cfg.concepts[int(torch.randint(len(cfg.concepts), (1,), generator=g))])
            stop = int(torch.randint(cfg.ddim_steps, (1,), generator=g))
            noise = randn((1, *shape), g, device, dtype)
            x_t, t = ddim_partial(sampler, scheduler, noise, concept, empty, cfg.start_guidance, stop)
            if cfg.legacy_timestep_mapping:
                low, high = round(stop / cfg.ddim_steps * train_steps), round((stop + 1) / cfg.ddim_steps * train_steps)
                t = int(torch.randint(low, max(high, low + 1), (1,), generator=g))
            xs.append(x_t)
            ts.append(t)
            concepts.append(concept)
        x_t = torch.cat(xs)
        t = torch.tensor(ts, device=device)
        concept = torch.cat(concepts)
        target = esd_target(frozen_noise, x_t, t, concept, anchor.expand_as(concept), cfg.negative_guidance)
        prediction = model(x_t, t, encoder_hidden_states=concept).sample
        return F.mse_loss(prediction.float(), target.float())

    return loss_fn
