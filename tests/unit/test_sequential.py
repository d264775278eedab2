"""Sequential requests: Delta chains (order, revert bit for bit), `canvas sequential`'s request chain and its
resumption, the SU / SR / rebound formulas and the errors for sequences that cannot run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import erase
from canvas import answers, sequential
from canvas.catalog import get
from canvas.cli import main
from erase import sequence
from erase.delta import Delta, fingerprint
from erase.sequence import DeltaChain, apply_sequence
from tests.unit.helpers import fresh_pipe, save_tiny, small_esd

TOY = get("toy")
FAST = {"steps": 2, "ddim_steps": 2, "lr": 1e-3}


def state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of the UNet and the text encoder, copied."""
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def chained():
    """Three ESD requests chained on a tiny pipeline: the pipeline, the chain, the deltas and the weights and
    fingerprint before and after each request."""
    pipe = fresh_pipe()
    chain, states, fingerprints = DeltaChain(pipe), [state(pipe)], [fingerprint(pipe)]
    for i, concept in enumerate(("van gogh", "cat", "dog")):
        chain.run(small_esd(concepts=[concept], seed=i, params="xattn"), progress=False)
        states.append(state(pipe))
        fingerprints.append(fingerprint(pipe))
    return pipe, chain, list(chain.deltas), states, fingerprints


def test_a_chain_leaves_the_bits_of_erasing_in_place_and_reverts_them_exactly(chained):
    pipe, chain, deltas, states, _ = chained
    in_place = fresh_pipe()  # the same three requests with plain erase.run, no chain
    for i, concept in enumerate(("van gogh", "cat", "dog")):
        erase.run(in_place, small_esd(concepts=[concept], seed=i, params="xattn"), progress=False)
    assert same(state(in_place), states[3]) and not same(states[3], states[2])
    assert chain.revert() is deltas[2]
    assert same(state(pipe), states[2]), "reverting the last restores the state before it bit for bit"
    chain.apply(deltas[2])
    assert same(state(pipe), states[3])
    chain.revert_all()
    assert same(state(pipe), states[0]) and len(chain) == 0
    assert not any(d.is_applied(pipe) for d in deltas)


def test_each_delta_records_the_state_before_it_and_stored_ones_replay(chained, tmp_path):
    _, _, deltas, states, fingerprints = chained
    for i, delta in enumerate(deltas):
        assert delta.metadata["base_fingerprint"] == fingerprints[i], "the base of request i is the state before it"
        assert delta.metadata["sequence"] == {"position": i + 1, "previous": [d.digest() for d in deltas[:i]]}
        delta.save(tmp_path / str(i))
    assert len(set(fingerprints)) == 4
    loaded = [Delta.load(tmp_path / str(i)) for i in range(3)]
    other = fresh_pipe()
    replay = apply_sequence(other, loaded)
    assert same(state(other), states[3]), "stored deltas applied in order rebuild the last state"
    replay.revert()
    assert same(state(other), states[2])
    replay.revert_all()
    assert same(state(other), states[0])


def test_deltas_out_of_order_and_reverts_of_what_is_not_applied_are_refused(chained):
    first, second, third = chained[2]
    fresh = DeltaChain(fresh_pipe())
    with pytest.raises(ValueError, match="made after 1 earlier deltas") as err:
        fresh.apply(second)  # on the base instead of on the first's state
    assert "\n" not in str(err.value) and "in the order they were made" in str(err.value)
    unrecorded = Delta(dict(second.tensors), {k: v for k, v in second.metadata.items() if k != "sequence"})
    with pytest.raises(ValueError, match="was not made on the state the 0 deltas before it leave") as err:
        fresh.apply(unrecorded)  # without its recorded order, the base fingerprint still refuses it
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nothing to revert"):
        fresh.revert()
    fresh.apply(first)
    with pytest.raises(ValueError, match="already applied"):
        fresh.apply(first)
    with pytest.raises(ValueError, match="made after 2 earlier deltas"):
        fresh.apply(third)  # skipping the second
    with pytest.raises(ValueError, match="is not applied in this chain"):
        fresh.revert(second)
    fresh.apply(second)
    with pytest.raises(ValueError, match="number 1 of the 2 applied; revert the later ones first") as err:
        fresh.revert(first)
    assert "\n" not in str(err.value)
    assert fresh.revert(second) is second and fresh.revert(first) is first


def test_the_recorded_order_catches_what_the_fingerprint_cannot():
    """A request that changed nothing leaves the fingerprint as it was; the next one still names it as its
    predecessor, so it is refused on a model without it."""
    pipe = fresh_pipe()
    base = {"base_fingerprint": fingerprint(pipe)}
    nothing = Delta({}, {**base, "sequence": {"position": 1, "previous": []}})
    name, value = next(iter(pipe.unet.named_parameters()))
    value = value.detach().clone()
    order = {"position": 2, "previous": [nothing.digest()]}
    after = Delta({f"unet.{name}": value + 1}, {**base, "sequence": order})
    chain = DeltaChain(pipe)
    with pytest.raises(ValueError, match="made after 1 earlier deltas"):
        chain.apply(after)
    chain.apply(nothing)
    chain.apply(after)
    assert torch.equal(dict(pipe.unet.named_parameters())[name], value + 1)


# ---------------------------------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def fast_sampler(monkeypatch):
    monkeypatch.setitem(answers.PRESETS, "fast", answers.SamplerPreset("fast", steps=2, guidance=3.0))


def _config(model_dir, out, targets):
    return sequential.SequentialConfig(
        method="esd", targets=list(targets), out=str(out), model=str(model_dir), catalog="toy", sampler="fast",
        preset="paper", seeds=[188], batch_size=128, overrides=FAST,
    )  # fmt: skip


def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = sequence.run

    def counting_run(pipe, config, **kw):
        calls.append(config.concepts[0])
        return real(pipe, config, **kw)

    monkeypatch.setattr(sequence, "run", counting_run)
    return calls


def test_requests_chain_resume_and_redo_from_a_changed_one(tmp_path, model_dir, fast_sampler, monkeypatch):
    calls = _counting(monkeypatch)
    real_generate = answers.generate

    def killed_after_winter(pipe, items, cat, out_dir, *args, **kwargs):
        if "2_Winter" in str(out_dir):
            raise KeyboardInterrupt
        return real_generate(pipe, items, cat, out_dir, *args, **kwargs)

    monkeypatch.setattr(answers, "generate", killed_after_winter)
    with pytest.raises(KeyboardInterrupt):
        sequential.run_sequence(_config(model_dir, tmp_path, ["Sketch", "Winter", "Mosaic"]), progress=False)
    assert calls == ["Sketch style", "Winter style"]
    monkeypatch.setattr(answers, "generate", real_generate)
    first = sequential.run_sequence(_config(model_dir, tmp_path, ["Sketch", "Winter", "Mosaic"]), progress=False)
    assert calls == ["Sketch style", "Winter style", "Mosaic style"], "stored requests are not erased again"
    again = sequential.run_sequence(_config(model_dir, tmp_path, ["Sketch", "Winter", "Mosaic"]), progress=False)
    assert len(calls) == 3 and again["requests"] == first["requests"]

    # the chain: each stored Delta was made on the base plus the stored Deltas before it
    pipe = erase.load_pipeline(str(model_dir))
    folders = [sequential.request_dir(tmp_path, i, t) for i, t in enumerate(["Sketch", "Winter", "Mosaic"], 1)]
    for folder in folders:
        delta = Delta.load(folder / "delta")
        assert delta.metadata["base_fingerprint"] == fingerprint(pipe)
        delta.apply(pipe)
    rows = first["requests"]
    assert [list(r["UA"]) for r in rows] == [["Sketch"], ["Sketch", "Winter"], ["Sketch", "Winter", "Mosaic"]]
    assert [r["ira_terms"] for r in rows] == [len(TOY.styles) - k for k in (1, 2, 3)]
    assert all(r["cra_terms"] == len(TOY.objects) for r in rows)
    assert first["summary"] == sequential.summarize(rows, ["Sketch", "Winter", "Mosaic"])
    assert json.loads((tmp_path / "sequence.json").read_text())["summary"] == first["summary"]
    assert "| 1: Sketch | " in (tmp_path / "sequence.md").read_text()

    stored = {f.name: (f / "delta" / "delta.safetensors").read_bytes() for f in folders}
    changed = sequential.run_sequence(_config(model_dir, tmp_path, ["Sketch", "Bricks", "Mosaic"]), progress=False)
    assert calls[3:] == ["Bricks style", "Mosaic style"], "the changed request and every later one are redone"
    names = sorted(p.name for p in (tmp_path / "requests").iterdir())
    assert names == ["1_Sketch", "2_Bricks", "3_Mosaic"]
    assert (folders[0] / "delta" / "delta.safetensors").read_bytes() == stored["1_Sketch"]
    assert changed["requests"][0] == first["requests"][0]
    mosaic = Delta.load(sequential.request_dir(tmp_path, 3, "Mosaic") / "delta")
    bricks = Delta.load(sequential.request_dir(tmp_path, 2, "Bricks") / "delta")
    assert mosaic.metadata["sequence"]["previous"] == [Delta.load(folders[0] / "delta").digest(), bricks.digest()]


def test_a_request_with_another_key_is_redone_with_all_later(tmp_path, model_dir, fast_sampler, monkeypatch):
    calls = _counting(monkeypatch)
    targets = ["Sketch", "Winter"]
    sequential.run_sequence(_config(model_dir, tmp_path, targets), progress=False)
    path = sequential.request_dir(tmp_path, 1, "Sketch") / sequential.REQUEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "key": "0" * 16}))  # e.g. another toolkit version
    sequential.run_sequence(_config(model_dir, tmp_path, targets), progress=False)
    assert calls == ["Sketch style", "Winter style"] * 2
    shutil.rmtree(sequential.request_dir(tmp_path, 2, "Winter") / "answers")  # a lost answer set: regenerated only
    sequential.run_sequence(_config(model_dir, tmp_path, targets), progress=False)
    assert len(calls) == 4
    delta_dir = sequential.request_dir(tmp_path, 1, "Sketch") / "delta"
    altered = Delta.load(delta_dir)
    altered.tensors = {k: v + 1 for k, v in altered.tensors.items()}
    altered.save(delta_dir)  # a stored Delta that is not the one its request made
    sequential.run_sequence(_config(model_dir, tmp_path, targets), progress=False)
    assert calls[4:] == ["Sketch style", "Winter style"]


# ---------------------------------------------------------------------------------------------------- the summary


def test_summary_formulas_on_a_hand_made_table():
    targets = ["A", "B", "C"]
    rows = [
        {"request": 1, "target": "A", "UA": {"A": 90.0}, "IRA": 80.0, "CRA": 70.0},
        {"request": 2, "target": "B", "UA": {"A": 60.0, "B": 100.0}, "IRA": 75.0, "CRA": 65.0},
        {"request": 3, "target": "C", "UA": {"A": 50.0, "B": 95.0, "C": 80.0}, "IRA": 60.0, "CRA": 40.0},
    ]
    s = sequential.summarize(rows, targets)
    assert s["SU"] == pytest.approx((50 + 95 + 80) / 3)
    assert s["SR"] == pytest.approx((60 + 40) / 2) and (s["SR_IRA"], s["SR_CRA"]) == (60.0, 40.0)
    assert s["rebound"] == pytest.approx({"A": 90 - 50, "B": 100 - 95}) and "C" not in s["rebound"]
    assert s["mean_rebound"] == pytest.approx(22.5) and s["max_rebound"] == pytest.approx(40)
    assert s["UA_own"] == {"A": 90.0, "B": 100.0, "C": 80.0}
    assert s["retain_drop"] == pytest.approx({"IRA": 20.0, "CRA": 30.0})
    table = sequential.markdown(rows, targets, s, "uce").splitlines()
    assert "| 1: A | 90.0 | - | - | 80.0 | 70.0 |" in table and "| 3: C | 50.0 | 95.0 | 80.0 | 60.0 | 40.0 |" in table
    with pytest.raises(ValueError, match="request 2's UA covers"):
        sequential.summarize([rows[0], {**rows[1], "UA": {"B": 1.0}}, rows[2]], targets)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("method", "targets", "fragment"),
    [
        ("uce", ["Sketch"], "two or more distinct targets"),
        ("uce", ["Sketch", "Winter", "Sketch"], "target 'Sketch' is requested twice"),
        ("uce", ["Sketch", "Nope"], "unknown target 'Nope'"),
        ("uce", ["Sketch", "Cats"], "must be of one kind (all styles or all objects), got styles Sketch and objects"),
        ("uce", ["styles"], "erases every style of catalog 'toy'"),
        ("nope", ["Sketch", "Winter"], "unknown method 'nope'"),
    ],
)
def test_sequences_that_cannot_run_are_one_line_errors(method, targets, fragment, tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        sequential.SequentialConfig(method=method, targets=targets, out=str(tmp_path))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    code = main(["sequential", "--method", method, "--targets", ",".join(targets), "--out", str(tmp_path / "o")])
    message = capsys.readouterr().err.strip()
    assert code == 2 and fragment in message and "\n" not in message and message.startswith("canvas sequential:")
    assert not (tmp_path / "o").exists()
