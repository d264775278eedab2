"""`canvas sequential`: erasure requests T1..Tn arriving one after another, with one method.

Request i erases Ti from the model that carries requests 1..i-1 (an `erase.sequence.DeltaChain`), saves its Delta
under `out/requests/<i>_<Ti>/delta` (its base fingerprint is the state before it; its `sequence` metadata names the
Deltas before it), generates that state's answer set and scores it as a job erasing T1..Ti together would be scored
(`canvas.metrics`, group target "T1+...+Ti"): the UA of each target erased so far, IRA over the classes of their
kind not erased yet, CRA over the other kind. The targets are of one kind: IRA and CRA are defined against a
target's kind, and with a style and an object both erased, CRA over either kind would count an erased class as one
to retain. UnlearnCanvas's own sequential study erases styles one after another.

Resumable: request i is reused only when its key matches, the run key (`erase.runner.run_key`: config, base
fingerprint of the state before it, toolkit version) together with the digests of the Deltas before it, so a stored
request is proven to sit on the same earlier requests; otherwise it and every later request are redone. A request's
scores are kept while the evaluation (catalog, sampler, seeds, classifiers, the chain's Deltas) is unchanged.

UnlearnCanvas reports SU (unlearning under sequential requests, with the "rebound" of earlier targets) and SR (the
retainability left) without publishing a formula or script. What we compute, all in percent:
- UA[i][j], the UA of target Tj after request i (j <= i): the matrix in `sequence.md`.
- SU = mean over j = 1..n of UA[n][j]: how much of every requested target is still gone once all requests are
  served, the user-facing promise of a sequence (an earlier target that rebounds lowers it).
- SR = (IRA[n] + CRA[n]) / 2, with SR_IRA = IRA[n] and SR_CRA = CRA[n] beside it: what is kept after the last
  request; the mean of the two makes one number for a table, and both parts are reported.
- rebound[j] = UA[j][j] - UA[n][j] for each earlier target (j < n): its UA right after its own request minus its
  UA after the last; positive means the target came back. `mean_rebound` / `max_rebound` over the earlier targets.
- retain_drop = IRA[1] - IRA[n] and CRA[1] - CRA[n]: the retain collapse along the sequence (the base model is not
  scored here; `canvas bench` scores single requests against it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import erase
from canvas import answers, metrics
from canvas import catalog as catalogs
from canvas.bench import BenchConfig, job_config, resolve_targets
from canvas.judge import Judge, accuracy_scores
from erase import available_methods
from erase.atomic import write_json, write_text
from erase.delta import Delta, fingerprint
from erase.lock import exclusive
from erase.runner import run_key
from erase.sequence import DeltaChain

REQUEST_FILE, SCORES_FILE = "request.json", "scores.json"
RESULT_JSON, RESULT_MD = "sequence.json", "sequence.md"


@dataclass
class SequentialConfig:
    """One sequence of requests; `preset` None takes the bench's choice (`canvas.bench.job_preset`)."""

    method: str
    targets: list[str]
    out: str
    model: str = "toy"
    preset: str | None = None
    seeds: list[int] = field(default_factory=lambda: list(answers.SEEDS))
    batch_size: int = 32
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields of the method, for every request
    catalog: str | None = None  # default: "toy" for the toy model, else "unlearncanvas-50"
    sampler: str | None = None  # default: "toy" for the toy model, else "unlearncanvas"
    data: str | None = None  # dataset for data-driven methods (the toy renders its own)
    classifiers: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.catalog = self.catalog or ("toy" if self.model == "toy" else "unlearncanvas-50")
        self.sampler = self.sampler or ("toy" if self.model == "toy" else "unlearncanvas")
        if self.method not in available_methods():
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(available_methods())}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a mapping of {self.method} config fields, got {self.overrides!r}")
        self.targets = sequence_targets(catalogs.get(self.catalog), self.targets)
        self.bench_config()  # seeds, batch size, preset, sampler: checked as the bench checks them

    def bench_config(self) -> BenchConfig:
        """The bench config whose jobs are these requests: `job_config` builds each request's erasure from it."""
        return BenchConfig(
            methods=[self.method], targets=list(self.targets), out=self.out, model=self.model, catalog=self.catalog,
            sampler=self.sampler, seeds=self.seeds, data=self.data, classifiers=self.classifiers,
            presets={self.method: self.preset} if self.preset else {},
            overrides={self.method: dict(self.overrides)} if self.overrides else {},
            batch_size=self.batch_size, device=self.device,
        )  # fmt: skip


def sequence_targets(cat: catalogs.Catalog, targets: Any) -> list[str]:
    """The requests' targets in order: names (or keywords, `canvas.bench.resolve_targets`), two or more, each once,
    all styles or all objects, leaving at least one class of their kind for IRA."""
    if isinstance(targets, str) or not isinstance(targets, list):
        raise ValueError(f"targets must be a list of style or object names, got {targets!r}")
    names: list[str] = []
    for word in (w.strip() for spec in targets for w in str(spec).split(",") if w.strip()):
        for name in resolve_targets(cat, [word]):
            if name in names:
                raise ValueError(f"target {name!r} is requested twice; each target of a sequence is erased once")
            names.append(name)
    if len(names) < 2:
        raise ValueError(f"a sequence needs two or more distinct targets (T1,T2,...), got {names!r}")
    styles = [t for t in names if cat.is_style(t)]
    if styles and len(styles) < len(names):
        objects = [t for t in names if t not in styles]
        raise ValueError(f"the targets of a sequence must be of one kind (all styles or all objects), got styles "
                         f"{', '.join(styles)} and objects {', '.join(objects)}")  # fmt: skip
    kind, pool = ("style", cat.styles) if styles else ("object", cat.objects)
    if set(pool) <= set(names):
        raise ValueError(f"the sequence erases every {kind} of catalog {cat.name!r}: no {kind} is left for IRA")
    return names


def request_dir(out: Path, index: int, target: str) -> Path:
    return out / "requests" / f"{index}_{target}"


def request_key(config, state_fingerprint: str, previous: list[str]) -> str:
    """The identity of one request: its run key on the state before it, and the Deltas that made that state."""
    payload = {"run_key": run_key(config, state_fingerprint), "previous": list(previous)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stored(directory: Path, key: str) -> Delta | None:
    """The stored Delta of a complete request with this key (and the digest it was stored with), else None."""
    path = directory / REQUEST_FILE
    if not path.is_file() or not (directory / "delta" / "delta.json").is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != key:
        return None
    delta = Delta.load(directory / "delta")
    return delta if delta.digest() == stored.get("digest") else None


def _remove_from(out: Path, index: int) -> None:
    """Remove request `index` and every later one: they sit on a state that no longer exists."""
    folder = out / "requests"
    for path in folder.iterdir() if folder.is_dir() else ():
        number = path.name.partition("_")[0]
        if number.isdigit() and int(number) >= index:
            shutil.rmtree(path)


def run_sequence(config: SequentialConfig, progress: bool = True) -> dict[str, Any]:
    """Serve the requests in order (resuming what is stored), score each state, write `sequence.json` and
    `sequence.md` under `out` and return {"requests": per-request rows, "summary": SU / SR / rebound, ...}."""
    out = Path(config.out)
    cat, sampler = catalogs.get(config.catalog), answers.preset(config.sampler)
    bench = config.bench_config()
    with exclusive(out):
        pipe = erase.load_pipeline(config.model, device=config.device)
        pipe.set_progress_bar_config(disable=True)
        base = fingerprint(pipe)
        judge = Judge(cat, config.classifiers)
        evaluation = {"catalog": cat.name, "sampler": asdict(sampler), "seeds": list(config.seeds),
                      "classifiers": config.classifiers, "answer_version": answers.ANSWER_VERSION,
                      "base_fingerprint": base}  # fmt: skip
        chain, rows, redo = DeltaChain(pipe), [], False
        for index, target in enumerate(tqdm(config.targets, desc="requests", disable=not progress), 1):
            directory = request_dir(out, index, target)
            erasure = job_config(bench, config.method, target)
            key = request_key(erasure, fingerprint(pipe), chain.digests())
            stored = None if redo else _stored(directory, key)
            if stored is not None:
                chain.apply(stored)
            else:
                if not redo:
                    _remove_from(out, index)
                redo = True
                _serve(chain, erasure, directory, key, index, target, progress)
            erased = config.targets[:index]
            rows.append(_evaluate(pipe, chain, judge, directory, index, erased, evaluation, config, progress))
        summary = summarize(rows, config.targets)
        result = {"config": asdict(config), "base_fingerprint": base, "requests": rows, "summary": summary}
        write_json(out / RESULT_JSON, result)
        write_text(out / RESULT_MD, markdown(rows, config.targets, summary, config.method))
    return result


def _serve(chain: DeltaChain, erasure, directory: Path, key: str, index: int, target: str, progress: bool) -> None:
    """Erase `target` on top of the chain and store its Delta and record; `request.json` last, as the mark that
    the request is complete."""
    checkpoint = directory / "checkpoint"
    result = chain.run(erasure, checkpoint_dir=checkpoint / key, progress=progress, local=True)
    result.delta.save(directory / "delta")
    write_json(directory / "delta" / "record.json", result.record)
    stored = {"key": key, "digest": result.delta.digest(), "index": index, "target": target,
              "run_key": result.record["run_key"]}  # fmt: skip
    write_json(directory / REQUEST_FILE, {**stored, **result.record["sequence"]})
    shutil.rmtree(checkpoint, ignore_errors=True)  # the Delta is stored: training will not resume from it


def _evaluate(pipe, chain, judge, directory, index, erased, evaluation, config, progress) -> dict[str, Any]:
    """The scores of the state after request `index` (stored ones reused while the evaluation is unchanged)."""
    identity = {**evaluation, "deltas": chain.digests()}
    scores_path = directory / SCORES_FILE
    if scores_path.is_file():
        stored = json.loads(scores_path.read_text())
        if stored.get("evaluation") == identity:
            return stored
    answer_dir = directory / "answers"
    claimed = answer_dir / answers.IDENTITY
    expected = {"catalog": evaluation["catalog"], "sampler": evaluation["sampler"],
                "answer_version": answers.ANSWER_VERSION, **identity}  # fmt: skip
    if claimed.is_file() and json.loads(claimed.read_text()) != expected:
        shutil.rmtree(answer_dir)  # images of another state or protocol
    if not (answer_dir / answers.MANIFEST).is_file():
        items = answers.answer_items(judge.catalog, config.seeds)
        extra = {"model": config.model, "method": config.method}
        answers.generate(pipe, items, judge.catalog, answer_dir, answers.preset(config.sampler),
                         batch_size=config.batch_size, shard=(0, 1), progress=progress, identity=identity,
                         manifest_extra=extra)  # fmt: skip
    scores = accuracy_scores(judge, answer_dir, metrics.TOGETHER.join(erased))
    each = scores.ua_each or (scores.ua,)
    record = json.loads((directory / "delta" / "record.json").read_text())
    row = {
        "request": index, "target": erased[-1], "erased": list(erased),
        "UA": {t: 100.0 * ua for t, ua in zip(erased, each)}, "IRA": 100.0 * scores.ira, "CRA": 100.0 * scores.cra,
        "ira_terms": scores.ira_terms, "cra_terms": scores.cra_terms, "erase_time_s": record.get("wall_time_s"),
        "evaluation": identity,
    }  # fmt: skip
    write_json(scores_path, row)
    return row


def summarize(rows: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    """SU, SR and the rebound of each earlier target (module docstring) from the per-request rows, request i's row
    holding "UA" {Tj: UA after request i} for j <= i and its "IRA" / "CRA", in percent."""
    if len(rows) != len(targets) or len(targets) < 2:
        raise ValueError(f"{len(rows)} request rows for {len(targets)} targets; a summary needs one row per "
                         "request of a sequence of two or more")  # fmt: skip
    for index, row in enumerate(rows):
        if list(row["UA"]) != list(targets[: index + 1]):
            raise ValueError(f"request {index + 1}'s UA covers {list(row['UA'])}, expected {targets[: index + 1]}")
    last = rows[-1]
    rebound = {t: rows[j]["UA"][t] - last["UA"][t] for j, t in enumerate(targets[:-1])}
    return {
        "SU": sum(last["UA"].values()) / len(targets),
        "SR": (last["IRA"] + last["CRA"]) / 2,
        "SR_IRA": last["IRA"],
        "SR_CRA": last["CRA"],
        "UA_own": {t: rows[j]["UA"][t] for j, t in enumerate(targets)},
        "rebound": rebound,
        "mean_rebound": sum(rebound.values()) / len(rebound),
        "max_rebound": max(rebound.values()),
        "retain_drop": {"IRA": rows[0]["IRA"] - last["IRA"], "CRA": rows[0]["CRA"] - last["CRA"]},
    }


def markdown(rows: list[dict[str, Any]], targets: list[str], summary: dict[str, Any], method: str) -> str:
    """The requests x targets UA matrix with IRA / CRA per request, then SU / SR and the rebounds."""
    header = ["after request", *(f"UA {t}" for t in targets), "IRA", "CRA"]
    lines = [f"# {method}: sequential requests {', '.join(targets)}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]  # fmt: skip
    for row in rows:
        cells = [f"{row['request']}: {row['target']}"]
        cells += [f"{row['UA'][t]:.1f}" if t in row["UA"] else "-" for t in targets]
        lines.append("| " + " | ".join([*cells, f"{row['IRA']:.1f}", f"{row['CRA']:.1f}"]) + " |")
    rebounds = ", ".join(f"{t} {v:+.1f}" for t, v in summary["rebound"].items())
    lines += ["", f"SU {summary['SU']:.1f} (mean UA over every target after the last request); SR {summary['SR']:.1f} "
              f"(IRA {summary['SR_IRA']:.1f}, CRA {summary['SR_CRA']:.1f} after the last request)",
              f"Rebound (UA after its own request minus after the last): {rebounds}", ""]  # fmt: skip
    return "\n".join(lines)
