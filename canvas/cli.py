"""`canvas`: the UnlearnCanvas benchmark from the command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from canvas.bench import BenchFailed
from erase.cli import FAILURES, USAGE_ERRORS, dispatch


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canvas", description="The UnlearnCanvas benchmark for concept erasure.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="erase -> answer set -> metrics for methods x targets, resumable")
    bench.add_argument("--model", help="'toy' (default), a diffusers folder, or a checkpoint")
    bench.add_argument("--methods", help="comma-separated method names")
    bench.add_argument("--targets", help="comma-separated styles / objects of the catalog and keywords: styles, "
                       "objects, all, tuning, held-out (the splits manifest's target splits), "
                       "e.g. held-out,Cats")  # fmt: skip
    bench.add_argument("--together", action="append", default=[], metavar="A,B,C",
                       help="a job that erases these targets at once (two or more of one kind; repeatable), scored "
                       "as the mean UA over them and IRA / CRA over the rest")  # fmt: skip
    bench.add_argument("--attacks", help="comma-separated attacks (canvas attack) run on each job's erased model: "
                       "adds pre-ASR / ASR columns")  # fmt: skip
    bench.add_argument("--attack-prompts", type=int, help="each attack tries the first N of a target's prompts "
                       "(default: all)")  # fmt: skip
    bench.add_argument("--out", help="output folder (rerun the same command to resume)")
    bench.add_argument("--config", help="YAML file with any of the bench fields (command-line values win)")
    bench.add_argument("--catalog", help="catalog name (default: toy for the toy model, else unlearncanvas-50)")
    bench.add_argument("--sampler", help="sampler preset (toy or unlearncanvas)")
    bench.add_argument("--data", help="dataset folder or parquet shards, for data-driven methods and FID (toy: none)")
    bench.add_argument("--fid-excludes-target", action="store_true", help="leave the target out of both FID sets")
    bench.add_argument("--classifiers", help="folder of the style/object classifier checkpoints (<kind>.pth)")
    bench.add_argument("--inception", help="local FID Inception-v3 weights (default: the classifier's features)")
    bench.add_argument("--inception-variant", choices=("tf2015", "torchvision"), help="which Inception the "
                       "weights are: tf2015 (default; the FID port of TF's 2015 Inception, pt_inception-2015-12-05) "
                       "or torchvision (UnlearnCanvas's FID: torchvision's ImageNet inception_v3; needs "
                       "torchvision)")  # fmt: skip
    bench.add_argument("--batch-size", type=int, help="images per generation batch (default 32)")
    bench.add_argument("--device", help="torch device (default cpu)")
    bench.add_argument("--no-progress", action="store_true")

    finer = sub.add_parser("finer", help="finer-scale unlearning: erase style-object combinations (Pop_Art:Cats), "
                           "score FU / FR on a reduced answer set, resumable")  # fmt: skip
    finer.add_argument("--methods", required=True, help="comma-separated method names")
    finer.add_argument("--targets", required=True, help="comma-separated combinations <Style>:<Object>")
    finer.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    finer.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder, or a checkpoint")
    finer.add_argument("--catalog", help="catalog name (default: toy for the toy model, else unlearncanvas-50)")
    finer.add_argument("--sampler", help="sampler preset (toy or unlearncanvas)")
    finer.add_argument("--data", help="dataset folder or parquet shards, for data-driven methods (toy: none)")
    finer.add_argument("--seeds", help="comma-separated answer-set seeds (default: the benchmark's five)")
    finer.add_argument("--other-cells", type=int, help="unrelated cells in each answer set (default 4)")
    finer.add_argument("--classifiers", help="folder of the style/object classifier checkpoints (<kind>.pth)")
    finer.add_argument("--batch-size", type=int, help="images per generation batch (default 32)")
    finer.add_argument("--device", help="torch device (default cpu)")
    finer.add_argument("--no-progress", action="store_true")

    answer = sub.add_parser("answers", help="generate an answer set (resumable, shardable)")
    answer.add_argument("--model", default="toy")
    answer.add_argument("--delta", help="folder of a Delta to apply first")
    answer.add_argument("--catalog", help="catalog name (default: toy for the toy model, else unlearncanvas-50)")
    answer.add_argument("--sampler", help="sampler preset (toy or unlearncanvas)")
    answer.add_argument("--out", required=True)
    answer.add_argument("--shard", help="i/n: this process's share (default: all, or one per accelerate process)")
    answer.add_argument("--batch-size", type=int, default=32)
    answer.add_argument("--device", default="cpu")

    bd = sub.add_parser("backdoor-eval", help="attack success and clean fidelity of a backdoored model, before and "
                        "after a removal delta; writes OUT/backdoor.json and OUT/grid.png")  # fmt: skip
    bd.add_argument("--model", required=True, help="the backdoored model (e.g. from `erase backdoor inject`)")
    bd.add_argument("--delta", help="folder of a removal Delta (e.g. from `erase run skd-cag`) to judge against it")
    bd.add_argument("--trigger", required=True, help="the backdoor's trigger text")
    bd.add_argument("--kind", required=True, choices=("pixel", "style"))
    bd.add_argument("--out", required=True, help="output folder")
    bd.add_argument("--target-style", help="style backdoor: the theme the trigger switches to (toy default: Sketch)")
    bd.add_argument("--patch-size", type=int, help="pixel backdoor: patch side in px (default: the model's "
                    "backdoor.json, else a quarter of the image side)")  # fmt: skip
    bd.add_argument("--threshold", type=float, help="pixel backdoor: normalised distance below which the patch "
                    "counts as present (default 0.5)")  # fmt: skip
    bd.add_argument("--seeds", help="comma-separated generation seeds (default 188)")
    bd.add_argument("--catalog", help="catalog name (default toy)")
    bd.add_argument("--sampler", help="sampler preset (default toy)")
    bd.add_argument("--batch-size", type=int, default=64)
    bd.add_argument("--device", default="cpu")

    renders = sub.add_parser(
        "toy-renders",
        help="write the toy data set (UnlearnCanvas layout), e.g. as the training "
        "images of `erase backdoor inject --model toy`",
    )
    renders.add_argument("--out", required=True, help="output folder: <Theme>/<Object>/<index>.jpg")
    renders.add_argument("--indices", default="1-4", help="image indices, a range a-b or a comma list (default 1-4)")

    attack = sub.add_parser("attack", help="does the erased target come back? one attack over a model (+ Delta) and "
                            "target: pre-ASR / ASR, attacked images; resumable")  # fmt: skip
    attack.add_argument("--attack", required=True, help="attack name (canvas.attacks.REGISTRY)")
    attack.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder, or a checkpoint")
    attack.add_argument("--delta", help="folder of the erasure Delta (none: attack the model itself, needs --target)")
    attack.add_argument("--target", help="the erased style or object (default: the one the Delta's record names)")
    attack.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    attack.add_argument("--preset", help="the attack's settings preset (default: toy on the toy, else paper)")
    attack.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    attack.add_argument("--seeds", help="comma-separated seeds of the attacked prompts (default 188)")
    attack.add_argument("--data", help="dataset folder or parquet shards: the target's images for attacks that "
                        "learn from them (toy: its renders)")  # fmt: skip
    attack.add_argument("--catalog", help="catalog name (default: toy for the toy model, else unlearncanvas-50)")
    attack.add_argument("--sampler", help="sampler preset (toy or unlearncanvas)")
    attack.add_argument("--classifiers", help="folder of the style/object classifier checkpoints (<kind>.pth)")
    attack.add_argument("--device", default="cpu")
    attack.add_argument("--no-progress", action="store_true")
    seq = sub.add_parser("sequential", help="erase targets one after another with one method; after each request "
                         "the UA of every target so far, IRA and CRA; SU / SR and rebound (resumable)")  # fmt: skip
    seq.add_argument("--method", required=True, help="the method serving every request")
    seq.add_argument("--targets", required=True, help="T1,T2,...: two or more distinct styles (or objects), in order")
    seq.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    seq.add_argument("--preset", help="the method's preset (default: the bench's choice for the targets' kind)")
    seq.add_argument("--seeds", help="comma-separated answer-set seeds (default: the benchmark's five)")
    seq.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder, or a checkpoint")
    seq.add_argument("--data", help="dataset folder or parquet shards, for data-driven methods (toy: none)")
    seq.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    seq.add_argument("--device", default="cpu")
    seq.add_argument("--no-progress", action="store_true")

    relearn = sub.add_parser("relearn", help="does the erased target come back after k fine-tuning steps? UA per k "
                             "on its images, on unrelated ones, beside the base learning a new toy style")  # fmt: skip
    relearn.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder, or a checkpoint")
    relearn.add_argument("--delta", required=True, help="folder of the erasure Delta")
    relearn.add_argument("--target", help="the erased style or object (default: the one the Delta's record names)")
    relearn.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    relearn.add_argument("--schedule", help="comma-separated, increasing cumulative steps (default: the preset's)")
    relearn.add_argument("--preset", help="relearning settings preset (default: toy on the toy, else paper)")
    relearn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    relearn.add_argument("--seeds", help="comma-separated seeds of the judged images (default 188,288)")
    relearn.add_argument("--data", help="dataset folder <Theme>/<Object>/<idx>.jpg (toy: its renders)")
    relearn.add_argument("--catalog", help="catalog name (default: toy for the toy model, else unlearncanvas-50)")
    relearn.add_argument("--classifiers", help="folder of the style/object classifier checkpoints (<kind>.pth)")
    relearn.add_argument("--device", default="cpu")
    relearn.add_argument("--no-progress", action="store_true")

    splits = sub.add_parser("splits", help="write the versioned split manifest")
    splits.add_argument("--out", required=True, help="path of the JSON manifest to write")
    return parser


def cmd_bench(args: argparse.Namespace) -> None:
    from canvas.bench import Bench, BenchConfig
    from canvas.report import markdown_table

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {args.config} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--config {args.config} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config} must hold a mapping of bench fields")
    cli = {
        "model": args.model, "methods": _csv(args.methods) or None, "targets": _csv(args.targets) or None,
        "together": args.together or None, "attacks": _csv(args.attacks) or None,
        "attack_prompts": args.attack_prompts,
        "out": args.out, "catalog": args.catalog, "sampler": args.sampler, "data": args.data,
        "batch_size": args.batch_size, "device": args.device, "classifiers": args.classifiers,
        "inception": args.inception, "inception_variant": args.inception_variant,
        "fid_excludes_target": True if args.fid_excludes_target else None,
    }  # fmt: skip
    values.update({k: v for k, v in cli.items() if v is not None})
    for key in ("methods", "out"):
        if not values.get(key):
            raise ValueError(f"--{key} is required (or set it in --config)")
    if not values.get("targets") and not values.get("together"):
        raise ValueError("--targets or --together is required (or set it in --config)")
    values.setdefault("targets", [])
    for key in ("methods", "targets", "attacks"):
        if isinstance(values.get(key), str):
            values[key] = _csv(values[key])
    try:
        config = BenchConfig(**values)
    except TypeError as err:
        raise ValueError(f"bad bench config: {err}") from None
    result = Bench(config, progress=not args.no_progress).run()
    if result is None:  # not the main process
        return
    if result["rows"]:
        print(markdown_table(result["rows"], fid_features=result["fid_features"]))
        print(f"report: {Path(config.out) / 'report.md'}")
    for failure in result["failed"]:
        print(f"FAILED {failure['method']} / {failure['target']}: {failure['error']}")
    if result["failed"]:
        jobs = len(result["rows"]) + len(result["failed"])
        raise BenchFailed(
            f"{len(result['failed'])} of {jobs} jobs failed (listed above; each job's error.json under "
            f"{Path(config.out) / 'jobs'}); finished jobs are in {Path(config.out) / 'report.json'}"
        )


def cmd_finer(args: argparse.Namespace) -> None:
    from canvas.finer import Finer, FinerConfig, markdown_table

    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in _csv(args.seeds)]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    values = {
        "methods": _csv(args.methods), "targets": _csv(args.targets), "out": args.out, "model": args.model,
        "catalog": args.catalog, "sampler": args.sampler, "data": args.data, "seeds": seeds,
        "other_cells": args.other_cells, "classifiers": args.classifiers, "batch_size": args.batch_size,
        "device": args.device,
    }  # fmt: skip
    config = FinerConfig(**{k: v for k, v in values.items() if v is not None})
    result = Finer(config, progress=not args.no_progress).run()
    print(markdown_table(result["rows"]))
    print(f"report: {Path(config.out) / 'report.md'}")
    for failure in result["failed"]:
        print(f"FAILED {failure['method']} / {failure['target']}: {failure['error']}")
    if result["failed"]:
        jobs = len(config.methods) * len(config.targets)
        raise BenchFailed(f"{len(result['failed'])} of {jobs} finer jobs failed (listed above; each job's "
                          f"error.json under {Path(config.out) / 'jobs'})")  # fmt: skip


def cmd_answers(args: argparse.Namespace) -> None:
    import erase
    from canvas import answers, catalog
    from erase.delta import Delta

    cat = catalog.get(args.catalog or ("toy" if args.model == "toy" else "unlearncanvas-50"))
    sampler = answers.preset(args.sampler or ("toy" if args.model == "toy" else "unlearncanvas"))
    shard = answers.parse_shard(args.shard) if args.shard else None
    delta = Delta.load(args.delta) if args.delta else None
    pipe = erase.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    out = answers.generate(
        pipe, answers.answer_items(cat), cat, args.out, sampler, batch_size=args.batch_size, shard=shard,
        apply=delta.applied if delta else None, manifest_extra={"model": args.model, "delta": args.delta},
        identity=answers.answer_identity(pipe, delta),
    )  # fmt: skip
    print(f"answer set -> {out}")


def cmd_backdoor_eval(args: argparse.Namespace) -> None:
    import erase
    from canvas import answers, catalog
    from canvas.backdoor import PATCH_THRESHOLD, RESULT_FILE, evaluate
    from erase.backdoor import read_info
    from erase.delta import Delta

    cat = catalog.get(args.catalog or "toy")
    sampler = answers.preset(args.sampler or "toy")
    info = read_info(args.model) if Path(args.model).is_dir() else {}
    target_style = args.target_style or ("Sketch" if args.kind == "style" and cat.name == "toy" else None)
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else [188]
    delta = Delta.load(args.delta) if args.delta else None
    if args.threshold is not None and not 0 <= args.threshold < float("inf"):
        raise ValueError(f"--threshold {args.threshold}: expected a finite distance >= 0 (default {PATCH_THRESHOLD})")
    out = Path(args.out)
    if (out / RESULT_FILE).exists():
        raise FileExistsError(f"{out / RESULT_FILE} exists; choose a new --out")
    pipe = erase.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(
        pipe, cat, trigger=args.trigger, kind=args.kind, delta=delta, seeds=seeds, sampler=sampler,
        patch_size=args.patch_size or info.get("patch_size"), target_style=target_style,
        threshold=PATCH_THRESHOLD if args.threshold is None else args.threshold, out=out, batch_size=args.batch_size,
        extra={"model": args.model, "delta": args.delta},
    )  # fmt: skip
    summary = ", ".join(f"{k} {result[k]:.3f}" for k in ("attack_success", "clean_style_acc", "clean_object_acc"))
    print(f"{summary} -> {out / RESULT_FILE}")


def cmd_attack(args: argparse.Namespace) -> None:
    import erase
    from canvas import answers, attack_suite, attacks, catalog, data, judge, metrics, toy
    from canvas import splits as manifest
    from erase.config import parse_assignments
    from erase.delta import Delta

    cat = catalog.get(args.catalog or ("toy" if args.model == "toy" else "unlearncanvas-50"))
    sampler = answers.preset(args.sampler or ("toy" if args.model == "toy" else "unlearncanvas"))
    attack = attack_suite.get(args.attack)
    base = attacks.settings_of(attack, args.preset, args.model)
    settings = attacks.settings_of(attack, args.preset, args.model, parse_assignments(type(base), args.set))
    if not args.delta and not args.target:
        raise ValueError("an attack on a model without a Delta needs the target to bring back (--target)")
    target = args.target or attacks.infer_target(cat, args.delta)
    metrics.target_kind(cat, target)
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else [answers.SEEDS[0]]
    delta = Delta.load(args.delta) if args.delta else None
    indices = manifest.load().forget_retain
    if args.data:
        images = attacks.target_images(cat, target, data.open_dataset(args.data, cat).load, indices)
    else:
        images = attacks.target_images(cat, target, toy.render, indices) if cat.name == "toy" else None
    pipe = erase.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    run = attacks.AttackRun(pipe, delta, cat, target, settings, sampler, Path(args.out), images,
                            progress=not args.no_progress)  # fmt: skip
    verdict = judge.Judge(cat, args.classifiers)
    summary = attacks.run_attack(run, attack, attacks.attack_items(cat, target, seeds), verdict)
    print(f"{attack.name} on {target}: pre-ASR {summary['pre_asr']:.1f}, ASR {summary['asr']:.1f} over "
          f"{summary['prompts']} prompts -> {Path(args.out) / attacks.RESULTS}")  # fmt: skip


def cmd_relearn(args: argparse.Namespace) -> None:
    import erase
    from canvas import attacks, catalog, judge, relearning
    from erase.config import parse_assignments
    from erase.delta import Delta
    from erase.relearn import Relearning

    cat = catalog.get(args.catalog or ("toy" if args.model == "toy" else "unlearncanvas-50"))
    preset = args.preset or ("toy" if args.model == "toy" else "paper")
    settings = Relearning.from_preset(preset, **parse_assignments(Relearning, args.set))
    schedule = [int(k) for k in _csv(args.schedule)] if args.schedule else settings.schedule
    settings = settings.with_schedule(schedule)
    target = args.target or attacks.infer_target(cat, args.delta)
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else relearning.EVAL_SEEDS
    delta = Delta.load(args.delta)
    pipe = erase.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    result = relearning.relearning_curves(
        pipe, delta, cat, target, settings.schedule, out=args.out, judge=judge.Judge(cat, args.classifiers),
        settings=settings, seeds=seeds, data_root=args.data, progress=not args.no_progress,
    )  # fmt: skip
    for curve, record in result["curves"].items():
        points = record.get("points", {})
        shown = ", ".join(f"k={k}: {100 * p['rate']:.1f}" for k, p in points.items())
        print(f"{curve}: {record['status']}; target rate {shown or '-'}")
    print(f"-> {Path(args.out) / relearning.RESULT}")


def cmd_toy_renders(args: argparse.Namespace) -> None:
    from canvas import toy
    from erase.catalog import get

    indices = _indices(args.indices)
    toy.export(args.out, get("toy"), indices=indices)
    print(f"wrote the toy renders (indices {args.indices}) -> {args.out}")


def _indices(text: str) -> list[int]:
    """`1-4` or `1,3,5` as a list of positive image indices."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-", 1))
            values = list(range(low, high + 1))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--indices {text!r}: expected positive indices as a range a-b or a comma list")
    return values


def cmd_sequential(args: argparse.Namespace) -> None:
    from canvas.sequential import RESULT_MD, SequentialConfig, markdown, run_sequence

    try:
        seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 188,288") from None
    extra = {"seeds": seeds} if seeds else {}
    config = SequentialConfig(
        method=args.method, targets=_csv(args.targets), out=args.out, model=args.model, preset=args.preset,
        data=args.data, batch_size=args.batch_size, device=args.device, **extra,
    )  # fmt: skip
    result = run_sequence(config, progress=not args.no_progress)
    print(markdown(result["requests"], config.targets, result["summary"], config.method))
    print(f"report: {Path(config.out) / RESULT_MD}")


def cmd_splits(args: argparse.Namespace) -> None:
    from canvas.splits import write_manifest

    if Path(args.out).is_dir():
        raise ValueError(
            f"--out {args.out} is a folder; give the path of the manifest file to write (e.g. splits.json)"
        )
    print(f"wrote {write_manifest(args.out)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "bench": cmd_bench,
        "finer": cmd_finer,
        "answers": cmd_answers,
        "splits": cmd_splits,
        "backdoor-eval": cmd_backdoor_eval,
        "toy-renders": cmd_toy_renders,
        "attack": cmd_attack,
        "sequential": cmd_sequential,
        "relearn": cmd_relearn,
    }[args.command]
    return dispatch("canvas", handler, args, USAGE_ERRORS, (*FAILURES, BenchFailed))


if __name__ == "__main__":
    sys.exit(main())
