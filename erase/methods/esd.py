"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023).

Fine-tune the model so that, for the concept c, it predicts the negatively guided noise of the frozen original:
    target = e0(x_t, a) - η·(e0(x_t, c) - e0(x_t, ∅)),   loss = ‖e(x_t, s) - sg(target)‖²
x_t comes from a partial DDIM run (guidance `start_guidance` on s) stopped at a random step, by the frozen model
(the later code, default) or the model being trained (the paper-era code). s, the prompt x_t is generated from and
the model is conditioned on, is c, or `erase_from`; the anchor a is ∅ (the paper), `erase_from`, or c itself
(`anchor="concept"`, the 2025 code's default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..conditioning import sampling_unconditional
from ..config import TrainingConfig, concept_texts
from ..context import RunContext
from ..frozen import unwrap
from ..processes import process_state
from ..sampling import ddim_partial, ddim_scheduler, randn, sample_seed
from ..train import LossFn

SAMPLERS = ("frozen", "trained")
ANCHORS = ("empty", "concept")


@dataclass
class ESDConfig(TrainingConfig):
    """ESD's parameter sets are its variants: `params` "esd-x" (default), "esd-u" (the paper-era code's: no time
    embedding, no output layers), "esd-x-strict" or "esd-all" (erase.params)."""

    DEFAULT_PARAMS: ClassVar[str] = "esd-x"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper-era released code (train-scripts/train-esd.py, 2023; what UnlearnCanvas ran): 1000 iterations,
        # lr 1e-5, η 1, start guidance 3, DDIM 50 (eta 0), batch 1, Adam, fp32; x_t sampled by the model being
        # trained, and its timestep pairing (legacy_timestep_mapping). It samples 512 px; here the model's size.
        "paper": {"steps": 1000, "lr": 1e-5, "negative_guidance": 1.0, "start_guidance": 3.0, "ddim_steps": 50,
                  "sample_with": "trained", "legacy_timestep_mapping": True},
        # The authors' later diffusers code (esd_sd.py, 2025): 200 iterations, lr 5e-5, η 2, guidance 3, DDIM 50,
        # bf16, x_t sampled by the frozen model and fed its own DDIM timestep; without --erase_from it erases the
        # concept from itself (anchor e0(x_t, c)). It samples 1024 px even for SD v1.4; here the model's size.
        "diffusers-code": {"steps": 200, "lr": 5e-5, "negative_guidance": 2.0, "start_guidance": 3.0,
                           "ddim_steps": 50, "mixed_precision": "bf16", "sample_with": "frozen",
                           "anchor": "concept"},
        # The authors' SDXL script (esd_sdxl.py, 2025): as diffusers-code but lr 2e-4, η 1, start guidance 2 (esd-x;
        # they warn other variants are experimental). x_t's guidance uses the pipeline's zeroed negative
        # (force_zeros_for_empty_prompt), the target the encoded empty prompt, as there; 1024 px, the model's size.
        "paper-sdxl": {"steps": 200, "lr": 2e-4, "negative_guidance": 1.0, "start_guidance": 2.0, "ddim_steps": 50,
                       "mixed_precision": "bf16", "sample_with": "frozen", "anchor": "concept"},
        # Ours (1.5 M-parameter UNet; paper values move it too little), chosen by scripts/tune_toy.py on the tuning
        # targets only (docs/results/tuning/esd-*.md). Tuning means (not results): styles UA 100 / IRA 90 / CRA 96
        # (lr 3e-3 lost IRA: 62; 400 steps no better); objects at lr 7.5e-4 UA 98 / IRA 87 / CRA 100 (1.5e-3: IRA 74).
        # Results, held-out toy targets (docs/results/toy.md, mean UA / IRA / CRA): styles 100 / 91.7 / 94.2,
        # objects 91.2 / 89.1 / 99.9.
        "toy": {"steps": 250, "lr": 1.5e-3, "negative_guidance": 3.0, "ddim_steps": 25, "start_guidance": 3.0},
        "toy-object": {"steps": 250, "lr": 7.5e-4, "negative_guidance": 3.0, "ddim_steps": 25, "start_guidance": 3.0},
    }  # fmt: skip

    concepts: list[str] = field(default_factory=list)
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    sample_with: str = "frozen"
    erase_from: str | None = None
    anchor: str = "empty"  # the target's first term without erase_from: e0(x_t, ∅) or e0(x_t, c)
    # The paper-era pairing: t_enc ~ [0, n) counts DDIM steps from the clean end, x_t is left after the steps down
    # to index t_enc−1 (near DDPM step 20·(t_enc−2)+1 for n = 50), and the model is fed t ~ [t_enc/n·T,
    # (t_enc+1)/n·T). Off: x_t after k ~ [0, n) steps, fed the timestep it sits at.
    legacy_timestep_mapping: bool = False
    # Not in the papers (off in `paper`): x_t from a pool of frozen-model trajectories, n per refill (0: off),
    # every DDIM state of each handed out once, in random order. scripts/bench_esd.py, sd-shaped UNet, 1 thread:
    # 0.186 s per iteration against the authors' 1.412 at DDIM 50 (0.13x; 0.22x at DDIM 25). On held-out toy targets
    # (docs/results/esd-pool.md, 40 per refill, 2 training seeds) it trains 6x faster and erases as the default:
    # UA 100 / 95.5 vs 100 / 97.7 (Mosaic / Fishes), IRA and CRA within 0.9 of the default's range over seeds.
    trajectory_pool: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.concepts = concept_texts(self.concepts)
        if self.sample_with not in SAMPLERS:
            raise ValueError(f"sample_with {self.sample_with!r} is not one of {', '.join(SAMPLERS)}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor {self.anchor!r} is not one of {', '.join(ANCHORS)}")
        if not isinstance(self.ddim_steps, int) or self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be a positive integer, got {self.ddim_steps!r}")
        if self.trajectory_pool < 0:
            raise ValueError(f"trajectory_pool must be 0 (off) or a number of trajectories, got {self.trajectory_pool}")
        if self.trajectory_pool and self.sample_with != "frozen":
            raise ValueError(
                f"trajectory_pool needs sample_with='frozen', got {self.sample_with!r}: trajectories of the model "
                "being trained go stale as it trains"
            )
        if self.trajectory_pool and self.legacy_timestep_mapping:
            raise ValueError("trajectory_pool hands out every DDIM state once; it needs legacy_timestep_mapping off")


def esd_target(
    frozen_noise,
    x_t: torch.Tensor,
    t: torch.Tensor,
    concept: torch.Tensor,
    empty: torch.Tensor,
    eta: float,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """`e0(x,a) − η·(e0(x,c) − e0(x,∅))` from one batched frozen call; a = `anchor` (None: ∅; `concept` itself:
    c, with no extra pass)."""
    embs = [empty, concept] + ([] if anchor is None or anchor is concept else [anchor])
    out = frozen_noise(torch.cat([x_t] * len(embs)), torch.cat([t] * len(embs)), torch.cat(embs)).chunk(len(embs))
    e_empty, e_concept = out[0], out[1]
    e_anchor = e_empty if anchor is None else e_concept if anchor is concept else out[2]
    # weights 1, −η, +η sum to 1: the same target for an ε-, v- or x0-model (each affine in ε at fixed x_t)
    return e_anchor - eta * (e_concept - e_empty)


def draw_steps(cfg: ESDConfig, g: torch.Generator, train_steps: int) -> tuple[int, int | None]:
    """How many DDIM steps to run from the noise and, with the paper-era pairing, the timestep to feed (None: the
    one x_t sits at)."""
    n = cfg.ddim_steps
    if not cfg.legacy_timestep_mapping:
        return int(torch.randint(n, (1,), generator=g)), None
    t_enc = int(torch.randint(n, (1,), generator=g))
    low, high = round(t_enc / n * train_steps), round((t_enc + 1) / n * train_steps)
    fed = int(torch.randint(low, max(high, low + 1), (1,), generator=g))
    # The paper-era sampler runs step indices n−1 down to t_enc−1 (all n for t_enc 0): n − t_enc + 1 steps.
    return min(n, n - t_enc + 1), fed


@dataclass(frozen=True)
class PoolState:
    """One state of a pooled trajectory: x after `step` DDIM steps from `noise`, at DDPM timestep `t`, with the
    frozen predictions its DDIM step computed, e0(x, ∅) and e0(x, prompt), which are also the target's."""

    x: torch.Tensor
    t: int
    step: int
    concept: int  # index into the config's concepts
    noise: torch.Tensor
    e_empty: torch.Tensor
    e_prompt: torch.Tensor  # the prompt x comes from: the concept, or erase_from


class TrajectoryPool:
    """Frozen-model DDIM states handed out at random, each once; when empty, `refill(g)` runs a new batch.

    With the frozen sampler x_t does not depend on training, so one batched run of n trajectories serves
    n·ddim_steps training samples instead of n, and the target's frozen passes come with it. Refill r is seeded by
    (seed, process, r), so a run is deterministic, and a resumed run `skip`s the states its finished steps took (one
    over several processes draws other, equally distributed, states than one process).
    """

    def __init__(self, refill: Callable[[torch.Generator], list[PoolState]], seed: int, process: int, per_refill: int):
        self._refill, self._seed, self._process, self._per_refill = refill, seed, process, per_refill
        self._states: list[PoolState] = []
        self.refills = 0

    def skip(self, count: int) -> None:
        """Move past the first `count` states, as if they had been taken: whole refills are never computed."""
        self.refills += count // self._per_refill
        for _ in range(count % self._per_refill):
            self.take()

    def take(self) -> PoolState:
        if not self._states:
            seed = sample_seed(self._seed, "esd-trajectory-pool", self._process, self.refills)
            g = torch.Generator().manual_seed(seed)
            states = self._refill(g)
            order = torch.randperm(len(states), generator=g).tolist()
            self._states = [states[i] for i in reversed(order)]  # popped from the end: order[0] first
            self.refills += 1
        return self._states.pop()


def latent_shape(unet) -> tuple[int, int, int]:
    return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def frozen_noise_fn(ctx: RunContext):
    """The original model's noise prediction as a `NoiseFn`."""
    unet = ctx.pipe.unet
    return lambda x, t, emb: ctx.frozen(unet, x, t, encoder_hidden_states=emb).sample


def sampling_prompt(ctx: RunContext, index: int) -> torch.Tensor:
    """The prompt x_t comes from and the model sees: `erase_from`, or concept `index` itself."""
    cfg: ESDConfig = ctx.config
    return ctx.encode(cfg.erase_from if cfg.erase_from is not None else cfg.concepts[index])


def make_pool(ctx: RunContext) -> TrajectoryPool | None:
    """The config's trajectory pool over the frozen model (None when `trajectory_pool` is 0)."""
    cfg: ESDConfig = ctx.config
    if not cfg.trajectory_pool:
        return None
    unet, n = ctx.pipe.unet, cfg.trajectory_pool
    scheduler = ddim_scheduler(ctx.pipe.scheduler.config, cfg.ddim_steps)
    empty, frozen_noise = ctx.encode(""), frozen_noise_fn(ctx)
    null = sampling_unconditional(ctx.pipe, empty)
    nulls = [] if null is empty else [null]  # SDXL: the sampler's zeroed negative needs its own pass

    def refill(g: torch.Generator) -> list[PoolState]:
        """n trajectories to the last DDIM step, batched, keeping every state with its frozen predictions."""
        picks = torch.randint(len(cfg.concepts), (n,), generator=g).tolist()
        noise = randn((n, *latent_shape(unet)), g, unet.device, unet.dtype)
        prompts = torch.cat([sampling_prompt(ctx, i) for i in picks])
        embs = torch.cat([e.expand_as(prompts) for e in [empty, *nulls]] + [prompts])
        parts = len(nulls) + 2
        x, states = noise * scheduler.init_noise_sigma, []
        with torch.no_grad():
            for k, t in enumerate(scheduler.timesteps):
                out = frozen_noise(torch.cat([x] * parts), t.expand(parts * n).to(x.device), embs).chunk(parts)
                e_empty, e_null, e_prompt = out[0], out[-2], out[-1]
                states += [PoolState(x[b : b + 1], int(t), k, picks[b], noise[b : b + 1], e_empty[b : b + 1],
                                     e_prompt[b : b + 1]) for b in range(n)]  # fmt: skip
                if k + 1 < cfg.ddim_steps:
                    x = scheduler.step(e_null + cfg.start_guidance * (e_prompt - e_null), t, x).prev_sample
        return states

    # One run over several processes: each its own pool, or they would all hand out the same states.
    process = 0 if ctx.local else ctx.accelerator.process_index if ctx.accelerator else process_state().process_index
    return TrajectoryPool(refill, cfg.seed, process, n * cfg.ddim_steps)


def make_loss(ctx: RunContext) -> LossFn:
    """The ESD loss for the training loop, with the embeddings, the DDIM schedule and any pool prepared once."""
    cfg: ESDConfig = ctx.config
    unet = ctx.pipe.unet
    device, dtype, shape = unet.device, unet.dtype, latent_shape(unet)
    empty = ctx.encode("")
    null = sampling_unconditional(ctx.pipe, empty)  # x_t's negative; the target's ∅ is `empty`
    scheduler = ddim_scheduler(ctx.pipe.scheduler.config, cfg.ddim_steps)
    train_steps = scheduler.config.num_train_timesteps
    frozen_noise = frozen_noise_fn(ctx)
    pool = make_pool(ctx)

    def anchor_of(concept: torch.Tensor, seen: torch.Tensor) -> torch.Tensor | None:
        """The target's first term: erase_from's, the concept's (`concept` itself: no extra pass) or ∅'s (None)."""
        if cfg.erase_from is not None:
            return seen
        return concept if cfg.anchor == "concept" else None

    def loss_fn(model, generators: list[torch.Generator]) -> torch.Tensor:
        if pool is not None:
            return pooled_loss(model, [pool.take() for _ in generators])

        def trained_noise(x, t, emb):
            with torch.no_grad():
                return unwrap(model)(x, t, encoder_hidden_states=emb).sample

        sampler = frozen_noise if cfg.sample_with == "frozen" else trained_noise
        xs, ts, indices = [], [], []
        for g in generators:
            index = int(torch.randint(len(cfg.concepts), (1,), generator=g))
            steps, fed = draw_steps(cfg, g, train_steps)
            noise = randn((1, *shape), g, device, dtype)
            x_t, t = ddim_partial(sampler, scheduler, noise, sampling_prompt(ctx, index), null, cfg.start_guidance,
                                  steps)  # fmt: skip
            xs.append(x_t)
            ts.append(t if fed is None else fed)
            indices.append(index)
        x_t, t = torch.cat(xs), torch.tensor(ts, device=device)
        concept = torch.cat([ctx.encode(cfg.concepts[i]) for i in indices])
        seen = torch.cat([sampling_prompt(ctx, i) for i in indices])
        target = esd_target(frozen_noise, x_t, t, concept, empty.expand_as(concept), cfg.negative_guidance,
                            anchor_of(concept, seen))  # fmt: skip
        prediction = model(x_t, t, encoder_hidden_states=seen).sample
        return F.mse_loss(prediction.float(), target.float())

    def pooled_loss(model, states: list[PoolState]) -> torch.Tensor:
        """The same loss on pooled states, whose e0(x, ∅) and e0(x, prompt) were computed with them."""
        x_t, t = torch.cat([s.x for s in states]), torch.tensor([s.t for s in states], device=device)
        e_empty, e_prompt = torch.cat([s.e_empty for s in states]), torch.cat([s.e_prompt for s in states])
        seen = torch.cat([sampling_prompt(ctx, s.concept) for s in states])
        if cfg.erase_from is not None:  # prompt = c_from: the concept's prediction is still needed
            e_concept = frozen_noise(x_t, t, torch.cat([ctx.encode(cfg.concepts[s.concept]) for s in states]))
            target = e_prompt - cfg.negative_guidance * (e_concept - e_empty)
        else:  # weights summing to 1, as in esd_target: no change for v-prediction
            anchor = e_prompt if cfg.anchor == "concept" else e_empty
            target = anchor - cfg.negative_guidance * (e_prompt - e_empty)
        prediction = model(x_t, t, encoder_hidden_states=seen).sample
        return F.mse_loss(prediction.float(), target.float())

    if pool is not None:
        loss_fn.resume = pool.skip  # a resumed run hands out the states after those its finished steps took
    return loss_fn
