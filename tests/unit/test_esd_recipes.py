"""ESD against its released recipes: preset values, the timestep fed against x_t's real noise level, the
erase_from objective, the trained-model sampler and the trajectory pool, each checked against a DDIM run and
noise predictions computed here from the formulas on a tiny model."""

import copy
import itertools

import pytest
import torch
from torch import nn

import erase
from erase import train
from erase.context import RunContext
from erase.frozen import FrozenOriginal
from erase.methods import esd
from erase.params import select
from erase.text import PromptEncoder
from tests.unit.helpers import fresh_pipe, small_esd


def test_paper_preset_is_the_paper_era_code():
    """rohitgandikota/erasing, train-scripts/train-esd.py (2023), the code UnlearnCanvas ran."""
    cfg = erase.make_config("esd", preset="paper", concepts=["x"])
    assert cfg.steps == 1000  # --iterations default 1000
    assert cfg.lr == 1e-5  # --lr default 1e-5
    assert cfg.negative_guidance == 1.0  # --negative_guidance default 1
    assert cfg.start_guidance == 3.0  # --start_guidance default 3
    assert cfg.ddim_steps == 50  # --ddim_steps default 50 (ddim_eta = 0)
    assert cfg.sample_with == "trained"  # z = quick_sample_till_t(...) samples with `model`, the one being trained
    assert cfg.legacy_timestep_mapping  # t_enc ~ [0, 50), t_enc_ddpm ~ [t_enc/50·1000, (t_enc+1)/50·1000)
    assert cfg.batch_size == 1 and cfg.optimizer == "adam"  # torch.randn((1, 4, 64, 64)); torch.optim.Adam
    assert cfg.mixed_precision == "no"  # the CompVis model in fp32
    assert cfg.anchor == "empty" and cfg.erase_from is None  # e_0 - η·(e_p - e_0), e_0 = e(z, '')
    assert cfg.trajectory_pool == 0  # not in the code


def test_diffusers_code_preset_is_esd_sd_py():
    """rohitgandikota/erasing, esd_sd.py (2025), the authors' current diffusers code."""
    cfg = erase.make_config("esd", preset="diffusers-code", concepts=["x"])
    assert cfg.steps == 200  # --iterations default 200
    assert cfg.lr == 5e-5  # --lr default 5e-5
    assert cfg.negative_guidance == 2.0  # --negative_guidance default 2
    assert cfg.start_guidance == 3.0  # --guidance_scale default 3
    assert cfg.ddim_steps == 50  # --num_inference_steps default 50
    assert cfg.mixed_precision == "bf16"  # torch_dtype = torch.bfloat16
    assert cfg.sample_with == "frozen"  # pipe.unet = base_unet while sampling xt
    assert not cfg.legacy_timestep_mapping  # timesteps[run_till_timestep] for xt after run_till_timestep steps
    assert cfg.anchor == "concept"  # noise_pred_erase_from = noise_pred_erase when --erase_from is not given
    assert cfg.batch_size == 1 and cfg.optimizer == "adam"  # batchsize = 1; torch.optim.Adam


def test_toy_preset_is_ours_with_the_frozen_sampler():
    """Our own preset, measured on the toy (erase/methods/esd.py's comment)."""
    cfg = erase.make_config("esd", preset="toy", concepts=["x"])
    assert (cfg.steps, cfg.lr, cfg.negative_guidance, cfg.ddim_steps, cfg.start_guidance) == (250, 1.5e-3, 3.0, 25, 3.0)
    assert cfg.sample_with == "frozen" and not cfg.legacy_timestep_mapping and cfg.trajectory_pool == 0


# --- a reference DDIM run and recorders, independent of erase.sampling -------------------------------------------


def alphas_cumprod(pipe) -> torch.Tensor:
    """SD's scaled-linear schedule from its formula: betas = linspace(√β0, √β1, T)²."""
    c = pipe.scheduler.config
    assert c.beta_schedule == "scaled_linear" and not c.set_alpha_to_one and c.steps_offset == 1
    betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def reference_states(unet, pipe, noise, cond, guidance, n):
    """Every state of guided DDIM (eta 0) from `noise` on SD's leading schedule ([1, 1+T/n, ...] reversed):
    [(x after k steps, the DDPM timestep of its noise level)] for k = 0..n, with separate cond/uncond passes."""
    ac = alphas_cumprod(pipe)
    T = len(ac)
    c = T // n
    timesteps = [c * i + 1 for i in reversed(range(n))]
    empty = embed(pipe, "").expand_as(cond)
    x, states = noise.clone(), [(noise.clone(), timesteps[0])]
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            tt = torch.full((x.shape[0],), t)
            e_u = unet(x, tt, encoder_hidden_states=empty).sample
            e_c = unet(x, tt, encoder_hidden_states=cond).sample
            eps = e_u + guidance * (e_c - e_u)
            a_t, a_prev = ac[t].item(), ac[max(t - c, 0)].item()  # below step 0: alphas_cumprod[0]
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            states.append((x.clone(), timesteps[k + 1] if k + 1 < n else 0))
    return states


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


class Recorder(nn.Module):
    """The trained model as the loop sees it, recording every call; the outputs are leaves, so the loss's gradient
    on them gives back the target (MSE: grad = 2·(pred − target)/numel)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, x, t, encoder_hidden_states):
        sample = self.inner(x, t, encoder_hidden_states=encoder_hidden_states).sample.detach().requires_grad_()
        self.calls.append({"x": x, "t": t, "emb": encoder_hidden_states, "out": sample})
        return type("Out", (), {"sample": sample})()


class FrozenRecorder:
    """ctx.frozen that records the latents of every call (the first call of a draw starts at its noise)."""

    def __init__(self, frozen: FrozenOriginal):
        self.frozen, self.xs = frozen, []

    def __call__(self, model, x, t, **kwargs):
        self.xs.append(x)
        return self.frozen(model, x, t, **kwargs)


def context(pipe, config) -> RunContext:
    params = select(pipe.unet, config.parameter_set())
    frozen = FrozenRecorder(FrozenOriginal(pipe.unet, list(params)))
    return RunContext(pipe, config, params, frozen, PromptEncoder(pipe.tokenizer, pipe.text_encoder), local=True)


def perturb(pipe, config, factor: float = 1.3) -> None:
    """Move the trained weights, as training would."""
    with torch.no_grad():
        for p in select(pipe.unet, config.parameter_set()).values():
            p.mul_(factor)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def matching_state(states, x):
    """Index of the reference state x equals (to float noise between batched and separate passes)."""
    errors = [(s[0] - x).abs().max().item() for s in states]
    k = min(range(len(errors)), key=errors.__getitem__)
    assert errors[k] < 1e-4, f"x_t matches no state of the reference run (closest {errors[k]:.2e})"
    return k


# --- item tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_timestep_fed_follows_the_noise_level_of_x_t(legacy):
    n, draws, guidance = 10, 24, 3.0
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    config = small_esd(ddim_steps=n, legacy_timestep_mapping=legacy, start_guidance=guidance)
    ctx = context(pipe, config)
    loss_fn, model = esd.make_loss(ctx), Recorder(pipe.unet)
    noises, xs, fed = [], [], []
    for seed in range(draws):
        ctx.frozen.xs.clear()
        loss_fn(model, generators(1000 + seed))
        noises.append(ctx.frozen.xs[0][:1])  # the partial run's start (or, with no step run, x_t itself)
        xs.append(model.calls[-1]["x"])
        fed.append(int(model.calls[-1]["t"]))
    states = reference_states(original, pipe, torch.cat(noises), embed(pipe, "van gogh").expand(draws, -1, -1),
                              guidance, n)  # fmt: skip
    true = [states[matching_state([(s[0][i : i + 1], s[1]) for s in states], xs[i])][1] for i in range(draws)]
    assert len(set(true)) > 3, "the draws must cover several noise levels"
    corr = torch.corrcoef(torch.tensor([fed, true], dtype=torch.float64))[0, 1].item()
    assert corr > 0.9, f"timestep fed vs x_t's noise level: correlation {corr:.3f}"
    if legacy:  # the paper-era offset: t ~ [t_enc·T/n, (t_enc+1)·T/n) for x near step (t_enc−2)·T/n + 1
        assert all(f >= t for f, t in zip(fed, true))
    else:
        assert fed == true


def test_erase_from_target_is_the_official_objective():
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    eta, guidance = 1.7, 3.0
    config = small_esd(concepts=["van gogh"], erase_from="painting", negative_guidance=eta, ddim_steps=4,
                       start_guidance=guidance)  # fmt: skip
    ctx = context(pipe, config)
    perturb(pipe, config)  # the trained model differs from the frozen one the target must come from
    loss_fn, model = esd.make_loss(ctx), Recorder(pipe.unet)
    c, c_from, empty = embed(pipe, "van gogh"), embed(pipe, "painting"), embed(pipe, "")
    steps_seen = []
    for seed in range(4):
        ctx.frozen.xs.clear()
        loss = loss_fn(model, generators(seed))
        call = model.calls[-1]
        x_t, t, pred = call["x"], call["t"], call["out"]
        loss.backward()
        ours = pred - pred.grad * pred.numel() / 2
        with torch.no_grad():
            e = {k: original(x_t, t, encoder_hidden_states=v).sample for k, v in
                 {"from": c_from, "c": c, "empty": empty}.items()}  # fmt: skip
        expected = e["from"] - eta * (e["c"] - e["empty"])
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(call["emb"], c_from)  # the model is conditioned on c_from
        states = reference_states(original, pipe, ctx.frozen.xs[0][:1], c_from, guidance, 4)
        steps_seen.append(matching_state(states, x_t))  # x_t is generated from c_from
    assert max(steps_seen) > 0, "at least one draw must run DDIM steps"


@pytest.mark.parametrize("sampler", ["trained", "frozen"])
def test_x_t_follows_the_trained_weights_only_with_the_trained_sampler(sampler):
    pipe = fresh_pipe()
    config = small_esd(sample_with=sampler, ddim_steps=4)
    ctx = context(pipe, config)
    loss_fn, model = esd.make_loss(ctx), Recorder(pipe.unet)
    seeds = range(8)
    loss_fn(model, generators(*seeds))
    before = model.calls[-1]["x"]
    perturb(pipe, config)
    loss_fn(model, generators(*seeds))
    after = model.calls[-1]["x"]
    if sampler == "trained":
        assert not torch.allclose(before, after, atol=1e-4)  # the draws that run DDIM steps moved
    else:
        assert torch.equal(before, after)


def test_pool_hands_each_state_once_refills_and_matches_single_runs():
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    n, size, guidance = 4, 3, 3.0
    config = small_esd(concepts=["van gogh", "cat"], ddim_steps=n, trajectory_pool=size, start_guidance=guidance)
    ctx = context(pipe, config)
    perturb(pipe, config)  # pooled states come from the frozen model whatever the trained weights are
    pool = esd.make_pool(ctx)
    per_refill = n * size
    taken = [pool.take() for _ in range(2 * per_refill)]
    assert pool.refills == 2
    for a, b in itertools.combinations(taken, 2):
        assert not torch.equal(a.x, b.x), "a state was handed out twice"
    for refill in (taken[:per_refill], taken[per_refill:]):
        noises = {s.noise.data_ptr() for s in refill}
        assert len(noises) == size and sorted(s.step for s in refill) == sorted(list(range(n)) * size)
    first, second = ({s.noise.data_ptr() for s in r} for r in (taken[:per_refill], taken[per_refill:]))
    assert not first & second and not torch.equal(taken[0].noise, taken[per_refill].noise)
    assert [s.step for s in taken[:per_refill]] != sorted(s.step for s in taken[:per_refill]), "random order"
    for s in taken:
        prompt = embed(pipe, config.concepts[s.concept])
        x, level = reference_states(original, pipe, s.noise, prompt, guidance, n)[s.step]
        torch.testing.assert_close(s.x, x, rtol=0, atol=1e-4)
        assert s.t == level
        with torch.no_grad():  # the frozen predictions kept with the state, for the target
            tt = torch.tensor([s.t])
            torch.testing.assert_close(s.e_empty, original(s.x, tt, encoder_hidden_states=embed(pipe, "")).sample)
            torch.testing.assert_close(s.e_prompt, original(s.x, tt, encoder_hidden_states=prompt).sample)


@pytest.mark.parametrize("values", [{}, {"anchor": "concept"}, {"erase_from": "painting"}])
def test_pooled_loss_target_is_the_formula(values):
    """The target built from the predictions kept with pooled states equals the formula's frozen passes."""
    pipe = fresh_pipe()
    original = copy.deepcopy(pipe.unet)
    eta = 1.7
    config = small_esd(ddim_steps=3, trajectory_pool=2, negative_guidance=eta, **values)  # concept "van gogh"
    ctx = context(pipe, config)
    perturb(pipe, config)
    loss_fn, model = esd.make_loss(ctx), Recorder(pipe.unet)
    source = embed(pipe, values.get("erase_from", "van gogh"))
    for _ in range(4):  # 8 samples: a refill and a third
        loss = loss_fn(model, generators(0, 1))
        call = model.calls[-1]
        x_t, t, pred = call["x"], call["t"], call["out"]
        loss.backward()
        ours = pred - pred.grad * pred.numel() / 2
        torch.testing.assert_close(call["emb"], source.expand(2, -1, -1))
        with torch.no_grad():
            e = {k: original(x_t, t, encoder_hidden_states=embed(pipe, k).expand(2, -1, -1)).sample
                 for k in ("", "van gogh", "painting")}  # fmt: skip
        anchor = {"": e[""], "concept": e["van gogh"], "from": e["painting"]}
        kind = "from" if "erase_from" in values else values.get("anchor", "")
        expected = anchor[kind] - eta * (e["van gogh"] - e[""])
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)


def test_pool_feeds_the_loss_and_is_seeded():
    config = small_esd(ddim_steps=3, trajectory_pool=2, seed=5)

    def fed(cfg, calls=4):
        pipe = fresh_pipe()
        loss_fn, model = esd.make_loss(context(pipe, cfg)), Recorder(pipe.unet)
        for _ in range(calls):
            loss_fn(model, generators(0, 1))
        return [(c["x"], c["t"]) for c in model.calls]

    pool = esd.make_pool(context(fresh_pipe(), config))
    expected = [pool.take() for _ in range(8)]
    got = fed(config)
    for (x, t), pair in zip(got, zip(expected[::2], expected[1::2], strict=True), strict=True):
        assert torch.equal(x, torch.cat([s.x for s in pair])) and t.tolist() == [s.t for s in pair]
    again, other = fed(config), fed(small_esd(ddim_steps=3, trajectory_pool=2, seed=6))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(got, other))


@pytest.mark.parametrize(
    ("values", "message"),
    [({"trajectory_pool": 2, "sample_with": "trained"}, "sample_with='frozen'"),
     ({"trajectory_pool": 2, "legacy_timestep_mapping": True}, "legacy_timestep_mapping"),
     ({"trajectory_pool": -1}, "trajectory_pool"), ({"anchor": "cat"}, "anchor")],
)  # fmt: skip
def test_bad_pool_and_anchor_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        small_esd(**values)


@pytest.mark.parametrize("count", [0, 5, 12, 17])
def test_pool_skip_lands_where_taking_would(count):
    """3 trajectories x 4 steps = 12 states a refill: skipping within, at and past a refill."""
    config = small_esd(concepts=["van gogh", "cat"], ddim_steps=4, trajectory_pool=3)
    taking, skipping = (esd.make_pool(context(fresh_pipe(), config)) for _ in range(2))
    for _ in range(count):
        taking.take()
    skipping.skip(count)
    for _ in range(14):
        a, b = taking.take(), skipping.take()
        assert torch.equal(a.x, b.x) and a.t == b.t and a.concept == b.concept


def test_a_resumed_pooled_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    config = small_esd(steps=3, batch_size=2, ddim_steps=3, trajectory_pool=2)
    whole = erase.run(fresh_pipe(), config, progress=False).delta
    real = train.sample_seed
    train.sample_seed = lambda s, k, i: (_ for _ in ()).throw(KeyboardInterrupt) if k == 2 else real(s, k, i)
    try:
        with pytest.raises(KeyboardInterrupt):
            erase.run(fresh_pipe(), config, checkpoint_dir=tmp_path, progress=False)
    finally:
        train.sample_seed = real
    resumed = erase.run(fresh_pipe(), config, checkpoint_dir=tmp_path, progress=False)
    assert resumed.record["resumed_from_step"] == 2
    assert whole.digest() == resumed.delta.digest()
