"""`canvas bench`: jobs = methods x targets; each job erases, saves its Delta, generates its answer set and scores it.

Every stage leaves its result on disk (atomically), so a killed bench resumes at the first unfinished stage of each
job; a failing job records its error and the others go on. Under `accelerate launch` or `torchrun`, job i runs on
process i mod n (each job alone on its process), and the main process writes the report once all are done.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

import erase
from canvas import answers, attack_suite, data, fid, grids, inception, metrics, report, splits, toy, validation
from canvas import catalog as catalogs
from canvas.catalog import Catalog
from canvas.judge import Judge, current_feature_space, feature_space, score
from canvas.method_inputs import together_inputs
from canvas.metrics import TOGETHER, targets_of
from canvas.targets import TARGET_KEYWORDS, resolve_targets, together_target
from erase import available_methods, get_method, make_config
from erase.atomic import write_json
from erase.card import write_delta_card
from erase.delta import Delta, fingerprint
from erase.lock import exclusive
from erase.processes import process_state
from erase.runner import run_key


@dataclass
class BenchConfig:
    """What to run; every field can come from the command line or a YAML file."""

    methods: list[str]
    targets: list[str]
    out: str
    together: list[str] = field(default_factory=list)  # jobs erasing several targets at once: "A,B,C" each
    attacks: list[str] = field(default_factory=list)  # canvas.attacks names run on every single-target job
    attack_prompts: int | None = None  # the first N of a target's prompts each attack tries (None: all)
    model: str = "toy"
    catalog: str | None = None  # default: "toy" for the toy model, else "unlearncanvas-50"
    sampler: str | None = None  # default: "toy" for the toy model, else "unlearncanvas"
    seeds: list[int] = field(default_factory=lambda: list(answers.SEEDS))
    data: str | None = None  # dataset folder or parquet shards, for methods and FID; the toy renders its own
    presets: dict[str, str] = field(default_factory=dict)  # method -> preset name (default: see job_preset)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> config fields
    fid_excludes_target: bool = False
    classifiers: str | None = None  # folder of the style/object classifier checkpoints (toy: shipped)
    inception: str | None = None  # local FID Inception-v3 weights; default: classifier features (labelled)
    inception_variant: str | None = None  # tf2015 (default with --inception) or torchvision (canvas.inception)
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.catalog = self.catalog or ("toy" if self.model == "toy" else "unlearncanvas-50")
        self.sampler = self.sampler or ("toy" if self.model == "toy" else "unlearncanvas")
        cat = catalogs.get(self.catalog)
        if not self.methods:
            raise ValueError("no methods given; accepted: " + ", ".join(available_methods()))
        for method in self.methods:
            if method not in available_methods():
                raise ValueError(f"unknown method {method!r}; accepted: {', '.join(available_methods())}")
        if isinstance(self.targets, str) or not isinstance(self.targets, list):
            raise ValueError(f"targets must be a list of names or keywords ({', '.join(TARGET_KEYWORDS)}), "
                             f"got {self.targets!r}")  # fmt: skip
        if isinstance(self.together, str) or not isinstance(self.together, list):
            raise ValueError(f"together must be a list of comma-separated target groups, got {self.together!r}")
        self.together = [together_target(cat, group) for group in self.together]
        self.targets = resolve_targets(cat, self.targets) if self.targets or not self.together else []
        if isinstance(self.attacks, str) or not isinstance(self.attacks, list):
            raise ValueError(f"attacks must be a list of attack names, got {self.attacks!r}")
        for name in self.attacks:
            attack_suite.check_name(name)
        if self.attack_prompts is not None and (not _is_int(self.attack_prompts) or self.attack_prompts < 1):
            raise ValueError(f"attack_prompts must be a positive integer or None, got {self.attack_prompts!r}")
        answers.preset(self.sampler)
        if self.inception:
            self.inception_variant = inception.check_variant(self.inception_variant or inception.DEFAULT_VARIANT)
        elif self.inception_variant is not None:
            raise ValueError(f"inception_variant {self.inception_variant!r} needs Inception weights (--inception FILE)")
        if not isinstance(self.seeds, list) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("presets", "overrides"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not set(value) <= set(available_methods()):
                raise ValueError(f"{name} must map method names ({', '.join(available_methods())}) to values, "
                                 f"got {value!r}")  # fmt: skip
        for method, preset in self.presets.items():
            accepted = get_method(method).config_cls.PRESETS
            if preset not in accepted:
                raise ValueError(f"unknown preset {preset!r} for {method}; accepted: {', '.join(accepted)}")
        if not all(isinstance(v, dict) for v in self.overrides.values()):
            raise ValueError(f"overrides must map each method to a mapping of config fields, got {self.overrides!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BenchFailed(RuntimeError):
    """Some jobs of a bench failed (the others finished, and the report lists both)."""


def bench_identity(config: BenchConfig, base_fingerprint: str) -> dict[str, Any]:
    """What shapes every result of a bench folder: a folder is resumed only by a bench of the same identity."""
    return {
        "base_fingerprint": base_fingerprint, "catalog": config.catalog,
        "sampler": asdict(answers.preset(config.sampler)), "seeds": list(config.seeds), "data": config.data,
        "fid_excludes_target": config.fid_excludes_target, "classifiers": config.classifiers,
        "inception": config.inception, "inception_variant": config.inception_variant,
        "answer_version": answers.ANSWER_VERSION, "version": erase.__version__,
    }  # fmt: skip


def method_indices(roles: splits.Splits) -> list[int]:
    """Image indices data-driven methods read: forget/retain and FMN reference."""
    return sorted(set(roles.forget_retain) | set(roles.fmn_reference))


def bench_indices(roles: splits.Splits) -> list[int]:
    """Every image index the bench reads: the methods' and the FID reference set's."""
    return sorted(set(method_indices(roles)) | set(roles.fid_reference))


def open_data(config: BenchConfig, cat: Catalog) -> data.Dataset:
    """`--data` opened (folder layout or parquet shards) after checking it holds every image the bench reads, each
    theme x object at `bench_indices` (extra styles and indices are fine). The check reads the layout and captions,
    not the pixels, so it costs seconds; an undecodable image fails where it is read."""
    indices = bench_indices(splits.load())
    validation.validate(config.data, cat, indices, check_images=False, allow_extra=True, raise_on_error=True)
    return data.open_dataset(config.data, cat)


def job_preset(config: BenchConfig, method: str, kind: str, together: bool = False) -> str | None:
    """The preset a job uses: the bench's choice, else on the toy `toy-{kind}` or `toy` (for a job erasing several
    targets at once `toy-together-{kind}` or `toy-together` first), else the method's UnlearnCanvas preset of that
    kind, `unlearncanvas` or `paper`."""
    presets = get_method(method).config_cls.PRESETS
    if method in config.presets:
        return config.presets[method]
    toy = config.model == "toy"
    names = (f"toy-{kind}", "toy") if toy else (f"unlearncanvas-{kind}", "unlearncanvas", "paper")
    if toy and together:
        names = (f"toy-together-{kind}", "toy-together", *names)
    for name in names:
        if name in presets:
            return name
    return None


def job_config(config: BenchConfig, method: str, target: str):
    """The erasure config of one job: the method's inputs for the target (canvas.method_inputs; the bench's
    `overrides` win), on top of the job's preset. Methods that read images get the data set's files."""
    cat = catalogs.get(config.catalog)
    kind = metrics.target_kind(cat, target)
    data_root = Bench.data_root_of(config, cat) if get_method(method).reads_images else None
    values = together_inputs(method, cat, targets_of(target), data_root, config.overrides.get(method, {}))
    return make_config(method, job_preset(config, method, kind, TOGETHER in target), **values)


class Bench:
    """One bench run over `config`; `run()` executes this process's jobs and, on the main process, the report."""

    def __init__(self, config: BenchConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.catalog = catalogs.get(config.catalog)
        self.sampler = answers.preset(config.sampler)
        self.state = process_state()
        self.jobs = [(m, t) for m in config.methods for t in (*config.targets, *config.together)]

    def job_dir(self, method: str, target: str) -> Path:
        return self.out / "jobs" / f"{method}__{target}"

    def data_root(self) -> Path:
        return self.data_root_of(self.config, self.catalog)

    @staticmethod
    def data_root_of(config: BenchConfig, cat: Catalog) -> Path:
        """The folder `<Theme>/<Object>/<idx>.jpg` whose files data-driven methods read: a folder dataset's own root;
        for parquet shards, the images at `method_indices` written once under out/data/ (`data.as_folder`); on the
        toy without --data, its renders."""
        if not config.data:
            return Bench.toy_renders(config, cat)
        keys = [data.ItemKey(t, o, i) for t in cat.themes for o in cat.objects for i in method_indices(splits.load())]
        return data.as_folder(open_data(config, cat), keys, Path(config.out) / "data")

    def dataset(self) -> data.Dataset:
        """The dataset FID's real set is read from: --data, else the toy's renders."""
        if self.config.data:
            return open_data(self.config, self.catalog)
        return data.FolderDataset(self.toy_renders(self.config, self.catalog), self.catalog)

    @staticmethod
    def toy_renders(config: BenchConfig, cat: Catalog) -> Path:
        """The toy's renders at `bench_indices`, written on first use under out/data/toy."""
        if cat.name != "toy":
            raise ValueError("--data is required for a non-toy catalog: the UnlearnCanvas folder or parquet shards")
        indices = bench_indices(splits.load())
        root = Path(config.out) / "data" / "toy"
        if not (root / "done").is_file():
            toy.export(root, cat, indices=indices)
            (root / "done").write_text(json.dumps(indices))
        return root

    def load_base(self):
        pipe = erase.load_pipeline(self.config.model, device=self.config.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self) -> dict[str, Any] | None:
        """Validate everything that can be checked before the first job (the model loads, the classifiers match
        the catalog, --data holds what the jobs read, the manifest splits the targets, the folder is this bench's),
        then run the jobs."""
        with exclusive(self.out) if self.state.is_main_process else nullcontext():
            for target in (*self.config.targets, *self.config.together):  # a manifest without target splits fails
                splits.target_split(self.catalog, target)  # here, not after the jobs
            self.base_fingerprint = fingerprint(self.load_base())
            self.judge = Judge(  # loaded once
                self.catalog, self.config.classifiers, self.config.inception, self.config.inception_variant
            )
            if self.config.data:
                self.dataset()
            answers.claim(self.out, bench_identity(self.config, self.base_fingerprint))
            (self.out / "jobs").mkdir(parents=True, exist_ok=True)
            write_json(self.out / "bench.json", asdict(self.config))
            mine = [j for n, j in enumerate(self.jobs) if n % self.state.num_processes == self.state.process_index]
            for method, target in mine:
                self.run_job(method, target)
            self.state.wait_for_everyone()
            if not self.state.is_main_process:
                return None
            return self.write_report()

    def run_job(self, method: str, target: str) -> None:
        """Erase -> Delta -> answer set -> metrics, skipping stages already on disk; errors go to error.json."""
        job = self.job_dir(method, target)
        (job / "error.json").unlink(missing_ok=True)
        try:
            config = job_config(self.config, method, target)
            record_path = job / "delta" / "record.json"
            key = run_key(config, self.base_fingerprint)
            if record_path.is_file() and json.loads(record_path.read_text()).get("run_key") != key:
                # the stored erasure came from other inputs (e.g. changed overrides): redo the whole job
                print(f"job {method} / {target}: its stored stages came from other inputs; redoing it")
                shutil.rmtree(job)
                job.mkdir(parents=True)
            stages = StageClock(job / "stages.json")
            if (job / "metrics.json").is_file():
                self.attack_job(target, job, stages)
                return
            if not record_path.is_file():
                result = erase.run(self.load_base(), config, checkpoint_dir=job / "checkpoint" / key,
                                   progress=self.progress, local=self.state.num_processes > 1)  # fmt: skip
                result.delta.save(job / "delta")
                write_json(job / "delta" / "record.json", result.record)
                write_delta_card(job / "delta")
                stages.lap("erase")
            delta = Delta.load(job / "delta")
            if not (job / "answers" / answers.MANIFEST).is_file():
                items = answers.answer_items(self.catalog, self.config.seeds)
                answers.generate(
                    self.load_base(), items, self.catalog, job / "answers", self.sampler,
                    batch_size=self.config.batch_size, shard=(0, 1), apply=delta.applied, progress=self.progress,
                    manifest_extra={"model": self.config.model, "delta": str(job / "delta"), "method": method},
                    identity={"base_fingerprint": self.base_fingerprint, "delta": delta.digest()},
                )  # fmt: skip
                stages.lap("answers")
            self.score_job(method, target, job)
            stages.lap("scoring")
            self.attack_job(target, job, stages)
        except Exception as err:  # one failing job must not stop the others
            write_json(job / "error.json", {"method": method, "target": target, "error": f"{type(err).__name__}: "
                                             f"{err}", "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
            print(f"job {method} / {target} failed: {type(err).__name__}: {err}")

    def score_job(self, method: str, target: str, job: Path) -> None:
        judge = self.judge
        fid_indices = splits.load().fid_reference
        bank = judge.real_bank(self.out / "cache" / "real_features.npz", fid_indices, self.dataset())
        keep = fid.exclude_target(self.catalog, target) if self.config.fid_excludes_target else None
        result = score(judge, job / "answers", target, bank.stats(keep), keep)
        record = json.loads((job / "delta" / "record.json").read_text())
        config = record.get("config", {})
        row = report.target_row(
            method, result["scores"], result["FID"], metrics.efficiency(record), preset=config.get("preset"),
            steps=config.get("steps"), fid_features=judge.feature_space,
            split=splits.target_split(self.catalog, target),
        )  # fmt: skip
        write_json(job / "metrics.json", row)
        write_delta_card(job / "delta", row)  # the card now carries the job's scores

    def attack_job(self, target: str, job: Path, stages: StageClock) -> None:
        """The bench's attacks on a finished job's erased model (single targets only); each attack's failure is
        recorded in its folder and does not stop the others or fail the job's scores."""
        todo = [n for n in self.config.attacks if not attack_suite.finished(job / "attacks" / n, n)]
        if TOGETHER in target or not todo:
            return
        pipe, delta = self.load_base(), Delta.load(job / "delta")  # once: each attack leaves the base as it found it
        for name in todo:
            folder = job / "attacks" / name
            attack_suite.attack_job(pipe, delta, self.catalog, target, name, folder,
                               self.judge, self.sampler, model=self.config.model, seeds=self.config.seeds[:1],
                               prompts=self.config.attack_prompts,
                               load=self.dataset().load, data_root=self.data_root() if self.config.data else None,
                               progress=self.progress)  # fmt: skip
            stages.lap(f"attack:{name}")

    def base_images(self, items: list[answers.AnswerItem]) -> Path:
        """The unedited model's images of `items` (for before/after grids), generated once."""
        directory = self.out / "baseline"
        missing = [it for it in items if not (directory / it.filename).is_file()]
        if missing:
            answers.generate(self.load_base(), missing, self.catalog, directory, self.sampler,
                             batch_size=self.config.batch_size, shard=(0, 1), progress=False)  # fmt: skip
        return directory

    def grid(self, method: str, target: str) -> Path:
        """Before (top) / after (bottom) images of the target's prompts, seed = the first answer-set seed."""
        seed = self.config.seeds[0]
        items, labels = [], []
        for one in targets_of(target):  # each target erased together gets its own stretch of columns
            if self.catalog.is_style(one):
                items += [answers.AnswerItem(one, o, seed) for o in self.catalog.objects]
                labels += list(self.catalog.objects)
            else:
                items += [answers.AnswerItem(t, one, seed) for t in self.catalog.themes]
                labels += list(self.catalog.themes)
        before = self.base_images(items)
        after = self.job_dir(method, target) / "answers"
        rows = [[Image.open(d / it.filename).convert("RGB") for it in items] for d in (before, after)]
        canvas_image = grids.image_grid(rows, ["before", "after"], labels, f"{method}: {target}")
        path = self.out / "grids" / f"{method}__{target}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas_image.save(path)
        return path

    def stored_row(self, path: Path, target: str) -> dict[str, Any]:
        """A finished job's row as the report reads it: its split from the manifest in use (rows written before
        target splits have none) and its FID feature space under today's name."""
        row = json.loads(path.read_text())
        row.update(attack_suite.row_fields(path.parent / "attacks", self.config.attacks))
        row["split"] = splits.target_split(self.catalog, target)
        if "fid_features" in row:
            row["fid_features"] = current_feature_space(row["fid_features"])
        return row

    def write_report(self) -> dict[str, Any]:
        rows, failed = [], []
        for method, target in tqdm(self.jobs, desc="report", disable=not self.progress):
            job = self.job_dir(method, target)
            if (job / "metrics.json").is_file():
                rows.append(self.stored_row(job / "metrics.json", target))
                self.grid(method, target)
            else:
                error = job / "error.json"
                failed.append(json.loads(error.read_text()) if error.is_file() else {"method": method,
                              "target": target, "error": "not finished"})  # fmt: skip
        space = feature_space(self.catalog, self.config.inception, self.config.inception_variant)
        metadata = {
            "model": self.config.model, "catalog": self.catalog.name, "sampler": asdict(self.sampler),
            "seeds": self.config.seeds, "fid_features": space, "splits": splits.load().name,
            "fid_excludes_target": self.config.fid_excludes_target,
            "failed": [{k: f[k] for k in ("method", "target", "error")} for f in failed],
        }  # fmt: skip
        if rows:
            report.write_report(self.out, rows, metadata, fid_features=metadata["fid_features"])
        else:
            write_json(self.out / "report.json", {"rows": [], "table": [], "spread": report.SPREAD, **metadata})
        return {"rows": rows, **metadata}


class StageClock:
    """Wall seconds of a job's stages, added to `path` (JSON) as each ends, so a resumed job keeps the earlier ones."""

    def __init__(self, path: Path):
        self.path, self.started = path, time.perf_counter()
        self.seconds = json.loads(path.read_text()) if path.is_file() else {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.started
        self.started = now
        write_json(self.path, self.seconds)
