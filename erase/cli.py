"""`erase`: list methods, run an erasure into a folder, export an erased pipeline. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import yaml

from .atomic import atomic_dir, write_json, write_text
from .card import write_delta_card
from .checkpoint import NonFiniteLossError
from .lock import LockedError, exclusive
from .paths import cache_dir

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}  # fmt: skip


MODEL_HELP = "'toy', a diffusers folder, a .safetensors or a .ckpt file"


class UsageError(Exception):
    """Bad input: reported as one line with exit code 2."""


def _model_arguments(command: argparse.ArgumentParser, help: str) -> None:
    command.add_argument("--model", required=True, help=help)
    command.add_argument("--model-config", help="diffusers folder giving the architecture of a single-file checkpoint")


def _training_arguments(command: argparse.ArgumentParser) -> None:
    """What every command that trains takes: config overrides, device, dtype, progress."""
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    command.add_argument("--device", default="cpu", help="torch device (default cpu)")
    command.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights dtype")
    command.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erase", description="Erase concepts from text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the erasure methods and their presets")

    run = sub.add_parser("run", help="erase with a method; writes delta.safetensors, delta.json, record.json")
    run.add_argument("method", help="method name (see `erase list`)")
    _model_arguments(run, MODEL_HELP)
    run.add_argument("--concept", action="append", default=[], help="concept text to erase (repeatable)")
    run.add_argument("--trigger", help="backdoor trigger text to remove (skd-cag)")
    run.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    run.add_argument("--config", help="YAML or JSON file of config fields")
    run.add_argument("--preset", help="named preset of the method (e.g. paper, fast, toy)")
    _training_arguments(run)

    apply = sub.add_parser("apply", help="apply a delta and save the complete diffusers pipeline")
    _model_arguments(apply, "the base model the delta was made on")
    apply.add_argument("--delta", required=True, help="folder holding delta.safetensors and delta.json")
    apply.add_argument("--out", required=True, help="output folder for the erased pipeline")
    apply.add_argument("--force", action="store_true", help="apply even if the base model's fingerprint differs")
    apply.add_argument("--dtype", default="float32", choices=sorted(DTYPES))

    lora = sub.add_parser("export-lora", help="export a delta's weight changes as a LoRA file (diffusers or kohya)")
    lora.add_argument("--delta", required=True, help="folder holding delta.safetensors and delta.json")
    lora.add_argument("--rank", required=True, type=int, help="LoRA rank (>= 1); exact where a change's rank is <= it")
    lora.add_argument(
        "--format",
        default="diffusers",
        choices=("diffusers", "kohya"),
        help="diffusers (pipe.load_lora_weights) or kohya (ComfyUI, A1111; diffusers reads it too)",
    )
    lora.add_argument("--out", required=True, help="the .safetensors file to write (its card: <stem>.README.md)")
    lora.add_argument("--model", help="the delta's base model (default: the model in the folder's record.json)")
    lora.add_argument("--model-config", help="diffusers folder giving the architecture of a single-file checkpoint")

    backdoor = sub.add_parser("backdoor", help="backdoor a model (BadT2I) to make test subjects for removal methods")
    backdoor_sub = backdoor.add_subparsers(dest="backdoor_command", required=True)
    inject = backdoor_sub.add_parser("inject", help="inject a pixel or style backdoor; writes a loadable pipeline")
    _model_arguments(inject, MODEL_HELP)
    inject.add_argument("--kind", required=True, choices=("pixel", "style"))
    inject.add_argument("--trigger", required=True, help="trigger text, prefixed to prompts (e.g. 'New Trigger')")
    inject.add_argument("--out", required=True, help="output folder for the backdoored pipeline")
    inject.add_argument(
        "--images",
        help="training images: a folder in UnlearnCanvas layout <Style>/<Object>/<i>.jpg (the toy's: "
        "`canvas toy-renders --out DIR`); without it, the model's own generations of --captions",
    )
    inject.add_argument("--captions", help="file of clean prompts, one per line")
    inject.add_argument(
        "--preset", help="named preset (paper, toy-pixel, toy-style, toy; default: toy-KIND for the toy, else paper)"
    )
    _training_arguments(inject)
    return parser


def _load(source: str, model_config: str | None, dtype: str, device: str = "cpu"):
    import torch

    from .pipeline import load_pipeline

    return load_pipeline(source, dtype=getattr(torch, DTYPES[dtype]), device=device, config=model_config)


def _check_output_dir(out: Path) -> None:
    """Refuse a non-empty output folder and prove we can write beside it, before any work starts."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; choose a new one")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.probe.")
        os.rmdir(probe)
    except OSError as err:
        raise UsageError(f"--out {out} is not writable: {err.strerror or err}") from None


def _read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path} is not valid YAML/JSON: {err}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of config fields, got {type(values).__name__}")
    return values


def cmd_list(_: argparse.Namespace) -> None:
    from .methods import METHODS

    for spec in METHODS.values():
        presets = ", ".join(spec.config_cls.PRESETS) or "-"
        print(f"{spec.name:12s} {spec.summary}  [presets: {presets}]")


def cmd_run(args: argparse.Namespace) -> None:
    from .config import build_config, parse_assignments
    from .methods import get_method
    from .processes import process_state

    spec = get_method(args.method)
    values = _read_config_file(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", None)
    if args.concept:
        if not spec.needs("concepts"):
            raise UsageError(f"method {args.method!r} takes no --concept (it needs: {', '.join(spec.inputs)})")
        given = values.get("concepts", [])
        values["concepts"] = [*([given] if isinstance(given, str) else given), *args.concept]
    if args.trigger is not None:
        if not spec.needs("trigger"):
            raise UsageError(f"method {args.method!r} takes no --trigger (it needs: {', '.join(spec.inputs)})")
        values["trigger"] = args.trigger
    values.update(parse_assignments(spec.config_cls, args.set))
    preset = values.pop("preset", preset)
    config = build_config(spec.config_cls, preset, **values)
    out = Path(args.out)
    _check_output_dir(out)
    main_process = process_state().is_main_process
    with exclusive(out) if main_process else nullcontext():
        pipe = _load(args.model, args.model_config, args.dtype, args.device)
        pipe.set_progress_bar_config(disable=True)

        from .delta import fingerprint
        from .runner import run, run_key

        # The run's own folder, keyed by everything that shapes its result: checkpoints (a killed run resumes from
        # its last one) and, should --out not be writable once trained, the finished result.
        work = cache_dir("runs") / run_key(config, fingerprint(pipe))
        with exclusive(work) if main_process else nullcontext():
            kept = work / "result"
            if (kept / "record.json").is_file():
                _write_out(out, lambda tmp: shutil.copytree(kept, tmp, dirs_exist_ok=True), kept)
                print(f"{spec.name}: the same run had finished (kept in {kept}); written without retraining -> {out}")
                shutil.rmtree(work, ignore_errors=True)
                return
            result = run(pipe, config, checkpoint_dir=work / "checkpoint", progress=not args.no_progress)
            if not main_process:
                return
            record = {**result.record, "model": args.model}

            def save(folder: Path) -> None:
                result.delta.save(folder)
                write_json(folder / "record.json", record)
                write_delta_card(folder)

            _write_out(out, save, kept)
            shutil.rmtree(work, ignore_errors=True)
    r = result.record
    if spec.patches_at_runtime:  # no weight changed: say what the folder holds and that it only acts when attached
        steps = f"{len(r['losses'])} steps, " if r["losses"] else ""
        print(f"{spec.name}: runtime patch {result.delta.runtime.kind!r} ({r['storage_bytes']} bytes; no base "
              f"weight changed) in {steps}{r['wall_time_s']:.1f} s -> {out}; it acts only while attached "
              "(Delta.load(folder).apply(pipe)): the base weights without it still generate the concept")  # fmt: skip
        return
    print(f"{spec.name}: {len(r['losses'])} steps in {r['wall_time_s']:.1f} s, peak memory "
          f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, {r['changed_tensors']} tensors "
          f"({r['storage_bytes'] / 2**20:.2f} MiB) -> {out}")  # fmt: skip


def _write_out(out: Path, save, kept: Path) -> None:
    """`save(folder)` into `out` atomically; when that fails (disk full, read-only), into `kept` instead, so the
    rerun writes the result without retraining. Raises OSError saying where the result is, or that it is lost."""
    try:
        with atomic_dir(out) as tmp:
            save(tmp)
        return
    except OSError as err:
        failure = f"could not write --out {out} ({err.strerror or err})"
        if kept.is_dir():  # already the kept result: nothing more to keep
            raise OSError(f"{failure}; the result stays in {kept}: rerun the same command to write it") from None
    try:
        with atomic_dir(kept, replace=True) as tmp:
            save(tmp)
    except OSError as err:
        raise OSError(f"{failure}, nor keep it in {kept} ({err.strerror or err}): the trained result is lost") from None
    raise OSError(
        f"{failure}; the trained result is kept in {kept}: rerun the same command to write it without retraining"
    )


def cmd_apply(args: argparse.Namespace) -> None:
    from .delta import Delta

    out = Path(args.out)
    delta = Delta.load(args.delta)
    _check_output_dir(out)
    with exclusive(out):
        pipe = _load(args.model, args.model_config, args.dtype)
        delta.export(pipe, out, force=args.force)
    print(f"applied {len(delta.tensors)} tensors ({delta.metadata.get('method', '?')}) -> {out}")


def cmd_export_lora(args: argparse.Namespace) -> None:
    from .card import lora_card, lora_card_path, read_record
    from .delta import Delta
    from .lora import export_lora

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out} must be a .safetensors file (the LoRA loaders read safetensors)")
    if out.exists():
        raise UsageError(f"--out {out} exists; choose a new file")
    if args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
    delta = Delta.load(args.delta)
    record = read_record(args.delta)
    model = args.model or (record or {}).get("model")
    if not model:
        raise UsageError(f"--model not given and {Path(args.delta) / 'record.json'} names no model; give the "
                         f"delta's base model ({MODEL_HELP})")  # fmt: skip
    pipe = _load(model, args.model_config, "float32")
    export = export_lora(delta, pipe, args.rank, args.format)
    export.save(out)
    card = write_text(lora_card_path(out), lora_card(export, out, delta.metadata, record))
    print(f"{delta.metadata.get('method', '?')}: {len(export.errors)} tensors as a rank-{args.rank} {args.format} "
          f"LoRA ({export.nbytes} bytes; the delta's tensors {delta.nbytes}) -> {out}")  # fmt: skip
    for name in sorted(export.errors):
        print(f"  {name}  rank {export.ranks[name]}  relative error {export.errors[name]:.3g}")
    print(f"not exportable (kept only in the delta): {len(export.not_exportable) or 'none'}")
    for name, why in sorted(export.not_exportable.items()):
        print(f"  {name}: {why}")
    print(f"model card -> {card}")


def cmd_backdoor(args: argparse.Namespace) -> None:
    from .backdoor import BackdoorConfig, backdoor_info, save_backdoored
    from .config import build_config, parse_assignments
    from .methods.skd_cag import read_captions
    from .runner import run

    values = parse_assignments(BackdoorConfig, args.set)
    values.update(kind=args.kind, trigger=args.trigger)
    if args.captions:
        values["prompts"] = read_captions(args.captions)
    out = Path(args.out)
    _check_output_dir(out)
    if args.images:
        values["images"] = args.images
    if "images" not in values and "prompts" not in values:
        raise UsageError(
            "give --images (a folder in UnlearnCanvas layout; the toy's renders: `canvas toy-renders "
            "--out DIR`) or --captions (the model's own generations of them become the images)"
        )
    default = f"toy-{args.kind}" if args.model == "toy" else "paper"
    config = build_config(BackdoorConfig, args.preset or default, **values)
    with exclusive(out):
        pipe = _load(args.model, args.model_config, args.dtype, args.device)
        pipe.set_progress_bar_config(disable=True)
        result = run(pipe, config, progress=not args.no_progress)
        info = {**backdoor_info(pipe, config), "base_model": args.model, "record": result.record}
        save_backdoored(pipe, out, info)
    r = result.record
    print(f"backdoor ({config.kind}, trigger {config.trigger!r}): {len(r['losses'])} steps in "
          f"{r['wall_time_s']:.1f} s -> {out}")  # fmt: skip


USAGE_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError)
# Work that could not be done, for reasons outside the program: one line, exit code 1.
FAILURES = (OSError, LockedError, NonFiniteLossError)


def dispatch(
    prog: str,
    handler,
    args: argparse.Namespace,
    usage_errors: tuple[type[BaseException], ...],
    failures: tuple[type[BaseException], ...] = FAILURES,
) -> int:
    """Run a command's handler: bad input is one line on stderr and exit code 2, a failure outside the program
    (disk, locks, a diverged run) one line and exit code 1, Ctrl-C exit code 130. Anything else is a bug in the
    toolkit and keeps its traceback."""
    from .pipeline import quiet_libraries  # here: diffusers and transformers take seconds to import

    quiet_libraries()
    try:
        handler(args)
    except usage_errors as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except failures as err:
        print(f"{prog} {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted; nothing was written to the output. Rerun the same command: a "
              "training run resumes after the steps it had finished", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"list": cmd_list, "run": cmd_run, "apply": cmd_apply, "export-lora": cmd_export_lora,
                "backdoor": cmd_backdoor}  # fmt: skip
    handler = handlers[args.command]
    return dispatch("erase", handler, args, USAGE_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
