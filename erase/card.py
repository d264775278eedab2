"""Model cards: a Hugging Face style README.md (YAML front matter, then Markdown) for a saved Delta and for an
exported LoRA, so a shared erasure says what it was made from, how, at what cost and, once benchmarked, how well.

The card is written by `erase run` and `erase export-lora` (and rewritten by `canvas bench` with the job's metrics),
not by `Delta.save`: the card's training figures live in the run record, which `Delta.save` never sees, and
`Delta.save` also writes the internal copies (caches, sequences) where a README would be noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text

CARD_FILE = "README.md"
PRIMARY_METRICS = ("UA", "IRA", "CRA", "FID")


def lora_card_path(lora_file: str | Path) -> Path:
    """`erased.safetensors` -> `erased.README.md`, beside it (a folder may hold several exports)."""
    lora_file = Path(lora_file)
    return lora_file.with_name(f"{lora_file.stem}.{CARD_FILE}")


def concepts_of(config: Mapping[str, Any]) -> list[str]:
    """What the erasure removed, as its config names it: the concepts, else a backdoor trigger, else the prompts
    of the forget set (data-driven methods)."""
    for key in ("concepts", "trigger", "forget_prompts"):
        value = config.get(key)
        if value:
            return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return []


def _front_matter(method: str, extra_tags: tuple[str, ...]) -> str:
    data = {"library_name": "diffusers", "tags": ["concept-erasure", "erasekit", method, *extra_tags]}
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def _figure(value: Any, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _record_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    losses = record.get("losses") or []
    memory = record.get("peak_memory_bytes")
    kind = f" ({record['memory_kind']})" if record.get("memory_kind") else ""
    return [
        ("steps", _figure(len(losses) if losses else record.get("config", {}).get("steps"))),
        ("wall time", _figure(record.get("wall_time_s"), " s")),
        ("peak memory", "-" if memory is None else f"{memory / 2**30:.3f} GiB{kind}"),
        ("final loss", _figure(losses[-1] if losses else None)),
        ("device", _figure(record.get("device"))),
        ("dtype", _figure(record.get("dtype"))),
        ("torch threads", _figure(record.get("torch_threads"))),
        ("storage", _figure(record.get("storage_bytes"), " bytes")),
    ]


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The benchmark's scores, UA / IRA / CRA / FID first, then every other number it reported."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    numbers |= {k: metrics[k] for k in PRIMARY_METRICS if k in metrics}  # a missing FID is reported as "-"
    order = [k for k in PRIMARY_METRICS if k in numbers] + [k for k in numbers if k not in PRIMARY_METRICS]
    return [(k, _figure(numbers[k])) for k in order]


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _body(
    metadata: Mapping[str, Any], record: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None
) -> list[str]:
    """The sections a Delta card and a LoRA card share: base, erasure, training record, metrics."""
    config = metadata.get("config") or {}
    method = str(metadata.get("method", "unknown"))
    concepts = concepts_of(config)
    parts = ["## Base model\n\n"]
    parts.append(f"- fingerprint: `{metadata.get('base_fingerprint', 'unknown')}`\n")
    for component, value in (metadata.get("component_fingerprints") or {}).items():
        parts.append(f"- {component} fingerprint: `{value}`\n")
    if record and record.get("model"):
        parts.append(f"- model: `{record['model']}`\n")
    parts.append("\n## Erasure\n\n")
    parts.append(f"- method: `{method}`\n- preset: `{config.get('preset') or 'none'}`\n")
    parts.append("- concepts: " + (", ".join(f"`{c}`" for c in concepts) or "-") + "\n")
    if metadata.get("parameter_set"):
        parts.append(f"- parameter set: `{metadata['parameter_set']}`\n")
    versions = metadata.get("versions") or {}
    if versions:
        parts.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    parts.append("\n<details><summary>config</summary>\n\n```json\n")
    parts.append(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```\n\n</details>\n")
    if record:
        parts.append("\n## Training record\n\n" + _table(_record_rows(record)))
    if metrics:
        where = f" on target `{metrics['target']}`" if metrics.get("target") else ""
        parts.append(f"\n## Benchmark metrics{where}\n\nAs the benchmark reported them (UA, IRA, CRA in %).\n\n")
        parts.append(_table(_metric_rows(metrics), ("metric", "value")))
    return parts


def delta_card(
    metadata: Mapping[str, Any], record: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None
) -> str:
    """The README.md of a Delta folder: the erasure, its run record and (when scored) its benchmark metrics."""
    method = str(metadata.get("method", "unknown"))
    concepts = ", ".join(concepts_of(metadata.get("config") or {})) or "its target"
    head = [_front_matter(method, ()), f"\n# {method}: {concepts} erased\n\n"]
    head.append("An erasekit Delta: the new values of exactly the tensors the erasure changed.\n\n")
    head.append("```python\nimport erase\n\npipe = erase.load_pipeline(BASE)  # the base model below\n"
                "erase.Delta.load(FOLDER).apply(pipe)  # refuses another base\n```\n\n")  # fmt: skip
    return "".join(head + _body(metadata, record, metrics))


def lora_card(
    export,
    lora_file: str | Path,
    metadata: Mapping[str, Any],
    record: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """The README of an exported LoRA (`export` an erase.lora.LoraExport): the Delta card's sections plus the
    rank, the format and each tensor's relative error, and what could not be exported."""
    method = str(metadata.get("method", "unknown"))
    concepts = ", ".join(concepts_of(metadata.get("config") or {})) or "its target"
    name = Path(lora_file).name
    head = [_front_matter(method, ("lora",)), f"\n# {method}: {concepts} erased (LoRA, rank {export.rank})\n\n"]
    head.append(f"The weight changes of an erasekit Delta as rank-{export.rank} LoRA factors in the "
                f"`{export.format}` layout (truncated SVD of each change).\n\n")  # fmt: skip
    if export.format == "diffusers":
        head.append(f'```python\npipe.load_lora_weights("{name}")  # on the base model below\n```\n\n')
    else:
        head.append(f"Load `{name}` as a LoRA in ComfyUI or A1111 (strength 1), or with "
                    f'`pipe.load_lora_weights("{name}")` in diffusers, on the base model below.\n\n')  # fmt: skip
    rows = [(n, f"{export.ranks[n]} / {export.errors[n]:.3g}") for n in sorted(export.errors)]
    tail = ["\n## LoRA factors\n\nRelative error ||dW - B A|| / ||dW|| (Frobenius) of each tensor.\n\n"]
    tail.append(_table(rows, ("tensor", "rank / relative error")))
    if export.not_exportable:
        tail.append("\n## Not exportable\n\nThese changes have no LoRA form and stay only in the Delta, so the LoRA "
                    "alone is not the whole erasure:\n\n")  # fmt: skip
        tail += [f"- `{n}`: {why}\n" for n, why in sorted(export.not_exportable.items())]
    else:
        tail.append("\nEvery tensor the erasure changed is in the LoRA.\n")
    return "".join(head + _body(metadata, record, metrics) + tail)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """A Delta folder's record.json, or None where there is none."""
    path = Path(folder) / "record.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_delta_card(folder: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """(Re)write `folder/README.md` from its delta.json, record.json and `metrics`, atomically."""
    folder = Path(folder)
    metadata = json.loads((folder / "delta.json").read_text())
    return write_text(folder / CARD_FILE, delta_card(metadata, read_record(folder), metrics))
