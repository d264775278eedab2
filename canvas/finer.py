"""`canvas finer`: finer-scale unlearning, methods x style-object combinations (`Pop_Art:Cats`).

Each job erases one combination (inputs: canvas.method_inputs.combination_inputs), saves its Delta, generates a
REDUCED answer set (the style's row and the object's column of theme x object, plus a few unrelated cells, times the
seeds: canvas.combination.reduced_cells) and scores FU / FR (canvas.combination.finer_scores). As in `canvas bench`,
every stage is written atomically and reused only by a job of the same run key, a failing job leaves error.json and
the others go on, and one folder holds one base model, catalog, sampler and seed list. The unedited model's scores
on the same cells are the `none` rows, so a reader sees what the judge gives before any erasure.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

import erase
from canvas import answers, grids, splits
from canvas import catalog as catalogs
from canvas.bench import Bench, StageClock, _is_int
from canvas.combination import (
    OTHER_CELLS,
    Combination,
    finer_scores,
    other_cells,
    parse_combination,
    reduced_cells,
)
from canvas.judge import CHUNK, Judge, load_images
from canvas.method_inputs import combination_inputs
from erase import available_methods, get_method, make_config
from erase.atomic import save_image, write_json
from erase.delta import Delta, fingerprint
from erase.lock import exclusive
from erase.runner import run_key

BASE = "none"  # the method name of the unedited model's rows
COLUMNS = ("FU", "FR_style", "FR_object", "FR", "FR_other")


@dataclass
class FinerConfig:
    """What to run: `targets` are combination names `<Style>:<Object>`; the other fields as in BenchConfig."""

    methods: list[str]
    targets: list[str]
    out: str
    model: str = "toy"
    catalog: str | None = None  # default: "toy" for the toy model, else "unlearncanvas-50"
    sampler: str | None = None  # default: "toy" for the toy model, else "unlearncanvas"
    seeds: list[int] = field(default_factory=lambda: list(answers.SEEDS))
    data: str | None = None  # dataset folder or parquet shards for methods that read images; the toy renders its own
    presets: dict[str, str] = field(default_factory=dict)  # method -> preset (default: finer_preset)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> config fields
    other_cells: int = OTHER_CELLS  # unrelated cells in each answer set (general retain)
    classifiers: str | None = None
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.catalog = self.catalog or ("toy" if self.model == "toy" else "unlearncanvas-50")
        self.sampler = self.sampler or ("toy" if self.model == "toy" else "unlearncanvas")
        cat = catalogs.get(self.catalog)
        answers.preset(self.sampler)
        if not self.methods:
            raise ValueError("no methods given; accepted: " + ", ".join(available_methods()))
        for method in self.methods:
            get_method(method)  # unknown: one-line error listing the methods
        if isinstance(self.targets, str) or not isinstance(self.targets, list) or not self.targets:
            raise ValueError(f"targets must be a non-empty list of combinations <Style>:<Object>, got {self.targets!r}")
        self.targets = list(dict.fromkeys(parse_combination(cat, t).name for t in self.targets))
        if not isinstance(self.seeds, list) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        other_cells(cat, parse_combination(cat, self.targets[0]), self.other_cells)  # the count fits the catalog
        for name in ("presets", "overrides"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not set(value) <= set(available_methods()):
                raise ValueError(f"{name} must map method names ({', '.join(available_methods())}) to values, "
                                 f"got {value!r}")  # fmt: skip
        for method, preset in self.presets.items():
            if preset not in get_method(method).config_cls.PRESETS:
                raise ValueError(f"unknown preset {preset!r} for {method}; accepted: "
                                 f"{', '.join(get_method(method).config_cls.PRESETS)}")  # fmt: skip


def finer_preset(config: FinerConfig, method: str) -> str | None:
    """The preset of a finer job: the run's choice, else on the toy `toy-combination` or `toy`, else `paper` (the
    benchmark's presets are a style's or an object's recipe, and UnlearnCanvas released none for combinations);
    None when the method has none of them."""
    if method in config.presets:
        return config.presets[method]
    names = ("toy-combination", "toy") if config.model == "toy" else ("paper",)
    return next((name for name in names if name in get_method(method).config_cls.PRESETS), None)


def finer_items(config: FinerConfig, combo: Combination) -> list[answers.AnswerItem]:
    """The reduced answer set of a combination: its row and column and the unrelated cells, times the seeds, in the
    global (theme, object, seed) order that fixes batching."""
    cat = catalogs.get(config.catalog)
    return [answers.AnswerItem(t, o, int(s)) for t, o in reduced_cells(cat, combo, config.other_cells)
            for s in config.seeds]  # fmt: skip


def finer_identity(config: FinerConfig, base_fingerprint: str) -> dict[str, Any]:
    """What shapes every result of a finer folder: it is resumed only by a run of the same identity."""
    return {
        "kind": "finer", "base_fingerprint": base_fingerprint, "catalog": config.catalog,
        "sampler": asdict(answers.preset(config.sampler)), "seeds": list(config.seeds), "data": config.data,
        "classifiers": config.classifiers, "other_cells": config.other_cells,
        "answer_version": answers.ANSWER_VERSION, "version": erase.__version__,
    }  # fmt: skip


class Finer:
    """One finer-scale run over `config` (one process); `run()` returns {"rows", "failed", ...}."""

    def __init__(self, config: FinerConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.catalog = catalogs.get(config.catalog)
        self.sampler = answers.preset(config.sampler)
        self.combos = [parse_combination(self.catalog, t) for t in config.targets]
        self.jobs = [(m, c) for m in config.methods for c in self.combos]

    def job_dir(self, method: str, combo: Combination) -> Path:
        return self.out / "jobs" / f"{method}__{combo.style}__{combo.object}"

    def job_config(self, method: str, combo: Combination):
        data_root = Bench.data_root_of(self.config, self.catalog) if get_method(method).reads_images else None
        values = combination_inputs(method, self.catalog, combo, data_root, self.config.overrides.get(method, {}))
        return make_config(method, finer_preset(self.config, method), **values)

    def load_base(self):
        pipe = erase.load_pipeline(self.config.model, device=self.config.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self) -> dict[str, Any]:
        with exclusive(self.out):
            self.base_fingerprint = fingerprint(self.load_base())
            self.judge = Judge(self.catalog, self.config.classifiers)
            answers.claim(self.out, finer_identity(self.config, self.base_fingerprint))
            write_json(self.out / "finer.json", asdict(self.config))
            for method, combo in tqdm(self.jobs, desc="finer jobs", disable=not self.progress):
                self.run_job(method, combo)
            return self.write_report()

    def run_job(self, method: str, combo: Combination) -> None:
        """Erase -> Delta -> reduced answer set -> FU / FR, skipping stages on disk; errors go to error.json."""
        job = self.job_dir(method, combo)
        (job / "error.json").unlink(missing_ok=True)
        try:
            config = self.job_config(method, combo)
            record_path = job / "delta" / "record.json"
            key = run_key(config, self.base_fingerprint)
            if record_path.is_file() and json.loads(record_path.read_text()).get("run_key") != key:
                print(f"job {method} / {combo.name}: its stored stages came from other inputs; redoing it")
                shutil.rmtree(job)
            if (job / "metrics.json").is_file():
                return
            job.mkdir(parents=True, exist_ok=True)
            stages = StageClock(job / "stages.json")
            if not record_path.is_file():
                result = erase.run(self.load_base(), config, checkpoint_dir=job / "checkpoint" / key,
                                   progress=self.progress)  # fmt: skip
                result.delta.save(job / "delta")
                write_json(record_path, result.record)
                stages.lap("erase")
            delta = Delta.load(job / "delta")
            if not (job / "answers" / answers.MANIFEST).is_file():
                answers.generate(
                    self.load_base(), finer_items(self.config, combo), self.catalog, job / "answers", self.sampler,
                    batch_size=self.config.batch_size, shard=(0, 1), apply=delta.applied, progress=self.progress,
                    manifest_extra={"model": self.config.model, "delta": str(job / "delta"), "method": method},
                    identity={"base_fingerprint": self.base_fingerprint, "delta": delta.digest()},
                )  # fmt: skip
                stages.lap("answers")
            record = json.loads(record_path.read_text())
            row = self.row(method, combo, job / "answers", record.get("config", {}), record.get("wall_time_s"))
            write_json(job / "metrics.json", row)
            stages.lap("scoring")
        except Exception as err:  # one failing job must not stop the others
            job.mkdir(parents=True, exist_ok=True)
            write_json(job / "error.json", {"method": method, "target": combo.name, "error": f"{type(err).__name__}: "
                                             f"{err}", "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
            print(f"job {method} / {combo.name} failed: {type(err).__name__}: {err}")

    def row(self, method: str, combo: Combination, answer_dir: Path, config: dict, time_s: float | None) -> dict:
        """One table row of a job's answer set: FU / FR in percent, the image counts behind them, the preset and
        the erasure time."""
        items, paths, _ = answers.load_answer_set(answer_dir)
        return self.scored_row(method, combo, items, paths, config, time_s)

    def scored_row(self, method: str, combo: Combination, items: list[answers.AnswerItem], paths: list[Path],
                   config: dict, time_s: float | None) -> dict:  # fmt: skip
        style_preds, object_preds = [], []
        for start in range(0, len(paths), CHUNK):
            style, obj, _ = self.judge(load_images(paths[start : start + CHUNK]))
            style_preds.append(style.argmax(1))
            object_preds.append(obj.argmax(1))
        scores = finer_scores(self.catalog, combo, [it.theme for it in items], [it.object for it in items],
                              torch.cat(style_preds), torch.cat(object_preds))  # fmt: skip
        return {"method": method, "target": combo.name, "split": combination_split(self.catalog, combo),
                **scores.percent(), "counts": scores.counts, "preset": config.get("preset"),
                "steps": config.get("steps"), "time_s": time_s}  # fmt: skip

    def base_answers(self, combo: Combination) -> Path:
        """The unedited model's images of a combination's cells (shared by its jobs and grids), generated once."""
        directory = self.out / "baseline"
        missing = [it for it in finer_items(self.config, combo) if not (directory / it.filename).is_file()]
        if missing:
            answers.generate(self.load_base(), missing, self.catalog, directory, self.sampler,
                             batch_size=self.config.batch_size, shard=(0, 1), progress=False,
                             identity={"base_fingerprint": self.base_fingerprint, "delta": "none"})  # fmt: skip
        return directory

    def base_row(self, combo: Combination) -> dict:
        """The unedited model's row on the same cells and seeds."""
        items = finer_items(self.config, combo)
        directory = self.base_answers(combo)
        return self.scored_row(BASE, combo, items, [directory / it.filename for it in items], {}, None)

    def grid(self, method: str, combo: Combination) -> Path:
        """Before / after sheets of the style's row (every object) over the object's column (every theme), at the
        first seed, in one picture."""
        seed = self.config.seeds[0]
        before, after = self.base_answers(combo), self.job_dir(method, combo) / "answers"
        sheets = []
        for label, cells, labels in (
            (f"{combo.style} on every object", [(combo.style, o) for o in self.catalog.objects], self.catalog.objects),
            (f"{combo.object} in every theme", [(t, combo.object) for t in self.catalog.themes], self.catalog.themes),
        ):
            items = [answers.AnswerItem(t, o, seed) for t, o in cells]
            rows = [[Image.open(d / it.filename).convert("RGB") for it in items] for d in (before, after)]
            sheets.append(grids.image_grid(rows, ["before", "after"], labels, f"{method}: {combo.name}, {label}"))
        picture = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), "white")
        top = 0
        for sheet in sheets:
            picture.paste(sheet, (0, top))
            top += sheet.height
        return save_image(picture, self.out / "grids" / f"{method}__{combo.style}__{combo.object}.png")

    def write_report(self) -> dict[str, Any]:
        rows, failed = [self.base_row(c) for c in self.combos], []
        for method, combo in tqdm(self.jobs, desc="finer report", disable=not self.progress):
            job = self.job_dir(method, combo)
            if (job / "metrics.json").is_file():
                rows.append(json.loads((job / "metrics.json").read_text()))
                self.grid(method, combo)
            else:
                error = job / "error.json"
                failed.append(json.loads(error.read_text()) if error.is_file() else {"method": method,
                              "target": combo.name, "error": "not finished"})  # fmt: skip
        metadata = {"model": self.config.model, "catalog": self.catalog.name, "seeds": self.config.seeds,
                    "sampler": asdict(self.sampler), "other_cells": self.config.other_cells,
                    "failed": [{k: f[k] for k in ("method", "target", "error")} for f in failed]}  # fmt: skip
        write_json(self.out / "report.json", {"rows": rows, **metadata})
        (self.out / "report.md").write_text(markdown_table(rows) + "\n")
        return {"rows": rows, **metadata}


def combination_split(catalog, combo: Combination) -> str:
    """`held-out` when both the style and the object are held-out targets, else `tuning` (a preset may have been
    tuned on one of them)."""
    each = {splits.target_split(catalog, combo.style), splits.target_split(catalog, combo.object)}
    return splits.TUNING if splits.TUNING in each else splits.HELD_OUT


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per method x combination: FU / FR / FR_style / FR_object / FR_other in %, the erasure time."""
    head = ["method", "target", "split", *COLUMNS, "erase s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], row["target"], row["split"], *(_number(row.get(c)) for c in COLUMNS)]
        lines.append("| " + " | ".join([*cells, _number(row.get("time_s"))]) + " |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"
