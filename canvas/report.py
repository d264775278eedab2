"""Benchmark report: per-target rows -> the paper's table as JSON, CSV and Markdown, plus a UA-vs-retain plot.

Rows are `{"method", "target", "kind", "split", "UA", "IRA", "CRA", "FID", "time_s", "memory_gb", "storage_gb"}`
with UA / IRA / CRA in percent, built by `target_row` from the metrics' fractions; `split` is the target's split in
the splits manifest (`held-out` or `tuning`, canvas.splits.target_split). `aggregate` gives the paper's per-method
table, once over held-out targets (the result) and once over tuning targets (marked "tuning — not a result"; never
mixed into the held-out figures): per kind, the mean of UA / IRA / CRA over the targets with, beside it, the minimum
and the spread, the population standard deviation (`SPREAD`). FID figures of different feature spaces are not
comparable, so every written format names the FID column with its space (`fid_column`: `FID[inception-tf2015]`).
Every file is written to a temporary name and renamed, so a bench killed mid-write never leaves a half report that a
resumed run would trust.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canvas import attacks
from canvas.metrics import KINDS, TOGETHER, Efficiency, UnlearningScores, targets_of
from canvas.splits import HELD_OUT, TARGET_SPLITS, TUNING
from erase.atomic import write_text

ROW_KEYS = ("method", "target", "kind", "split", "UA", "IRA", "CRA", "FID", "time_s", "memory_gb", "storage_gb")
NUMERIC_KEYS = ROW_KEYS[4:]
SCORE_KEYS = ("UA", "IRA", "CRA")  # per kind: mean, `_min` and `_std` over the targets
COST_KEYS = ("FID", "time_s", "memory_gb", "storage_gb")  # means over all of a method's targets of the split
TABLE_KEYS = (
    "method",
    "split",
    *(f"{kind}_{key}{stat}" for kind in KINDS for key in SCORE_KEYS for stat in ("", "_min", "_std")),
    *COST_KEYS,
    "n_style",
    "n_object",
)
SPREAD = "std: the population standard deviation over the targets (divides by n; 0 for a single target)"
SPLIT_LABELS = {HELD_OUT: "held-out", TUNING: "tuning — not a result"}
MISSING = "-"
_Fmt = Callable[[Any], str]


def target_row(
    method: str,
    scores: UnlearningScores,
    fid_value: float | None = None,
    cost: Efficiency | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One per-target row of the report: UA / IRA / CRA in percent (the core keeps fractions), FID, cost.

    `memory_kind` is added when the record says how memory was measured, since CPU peak RSS and GPU peak allocation
    are not comparable."""
    cost = cost or Efficiency(None, None, None)
    row = {"method": method, "target": scores.target, "kind": scores.kind, **scores.percent()}
    if scores.ua_each:  # several targets erased at once: each one's UA beside their mean
        row["UA_each"] = {t: 100.0 * u for t, u in zip(targets_of(scores.target), scores.ua_each, strict=True)}
    row.update(FID=fid_value, time_s=cost.time_s, memory_gb=cost.memory_gb, storage_gb=cost.storage_gb)
    if cost.memory_kind:
        row["memory_kind"] = cost.memory_kind
    clash = sorted(set(extra) & set(row))
    if clash:
        raise ValueError(f"extra row fields {clash} would overwrite metric columns")
    return {**row, **extra}


def check_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as plain dicts after checking each has the report keys, a known kind and split, and numeric (or None)
    values."""
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} ({row.get('method')!r}, {row.get('target')!r}) lacks {missing}")
        if row["kind"] not in KINDS:
            raise ValueError(f"row {i} has kind {row['kind']!r}; accepted: {', '.join(KINDS)}")
        if row["split"] not in TARGET_SPLITS:
            raise ValueError(f"row {i} has split {row['split']!r}; accepted: {', '.join(TARGET_SPLITS)} "
                             "(canvas.splits.target_split)")  # fmt: skip
        clean = dict(row)
        for key in NUMERIC_KEYS:
            value = row[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"row {i} field {key!r} is {value!r}; accepted: a number or None")
            clean[key] = None if value is None else float(value)  # numpy / torch scalars become plain floats
        out.append(clean)
    return out


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's table, one entry per (split, method): held-out entries first, then tuning ones, methods in
    first-appearance order. Per kind, UA / IRA / CRA over the method's targets of that kind and split: the mean
    (`style_UA`), the minimum (`style_UA_min`) and the population std (`style_UA_std`); FID / time / memory /
    storage are means over all its targets of the split. A statistic over nothing (no object targets, no FID
    measured) is None; a (split, method) without targets has no entry. Jobs that erase several targets at once are
    not single targets and stay out of it (`together_rows`)."""
    rows = [r for r in check_rows(rows) if TOGETHER not in r["target"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for split in (HELD_OUT, TUNING):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["split"] == split]
            if mine:
                table.append(_entry(method, split, mine))
    return table


def _entry(method: str, split: str, mine: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One line of the table: the statistics of one method's targets of one split."""
    entry: dict[str, Any] = {"method": method, "split": split}
    for kind in KINDS:
        of_kind = [r for r in mine if r["kind"] == kind]
        for key in SCORE_KEYS:
            values = _present(r[key] for r in of_kind)
            entry[f"{kind}_{key}"] = _mean(values)
            entry[f"{kind}_{key}_min"] = min(values) if values else None
            entry[f"{kind}_{key}_std"] = _population_std(values)
    for key in COST_KEYS:
        entry[key] = _mean(r[key] for r in mine)
    entry["n_style"] = sum(r["kind"] == "style" for r in mine)
    entry["n_object"] = sum(r["kind"] == "object" for r in mine)
    return entry


def fid_column(fid_features: str) -> str:
    """The name of the FID column in every report format: `FID[<feature space>]`."""
    if not isinstance(fid_features, str) or not fid_features.strip():
        raise ValueError(f"the FID feature space must be a non-empty name (e.g. the judge's), got {fid_features!r}")
    return f"FID[{fid_features}]"


def _check_feature_space(rows: Sequence[Mapping[str, Any]], fid_features: str) -> str:
    """The column name, after checking that no row says its FID was measured in another feature space."""
    column = fid_column(fid_features)
    for i, row in enumerate(rows):
        space = row.get("fid_features")
        if space is not None and space != fid_features:
            raise ValueError(
                f"row {i} ({row['method']!r}, {row['target']!r}) has FID in feature space {space!r}, the report's "
                f"is {fid_features!r}; FIDs of different spaces cannot share a column (rerun that job)"
            )
    return column


def _named(entries: Sequence[Mapping[str, Any]], column: str) -> list[dict[str, Any]]:
    """Entries with the FID key renamed to the report's column name, other keys in place."""
    return [{(column if key == "FID" else key): value for key, value in entry.items()} for entry in entries]


def _present(values: Iterable[float | None]) -> list[float]:
    """The measured values: None and NaN (not measured) left out."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _mean(values: Iterable[float | None]) -> float | None:
    present = _present(values)
    return sum(present) / len(present) if present else None


def _population_std(values: Sequence[float]) -> float | None:
    """sqrt(mean((v - mean)^2)): the spread of the targets themselves, not an estimate of a wider population."""
    if not values:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _fixed(digits: int) -> _Fmt:
    return lambda v: f"{v:.{digits}f}"


def _seconds(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _gigabytes(v: float) -> str:
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.1 else f"{v:.2g}"  # a toy Delta is ~1e-4 GB; keep its digits


# (key, header, formatter) of the summary table in the paper's column order; score cells are `_with_spread`'s text
SUMMARY_COLUMNS: tuple[tuple[str, str, _Fmt], ...] = (
    ("method", "Method", str),
    ("split", "Targets", str),
    ("style_UA", "Style UA", str),
    ("style_IRA", "Style IRA", str),
    ("style_CRA", "Style CRA", str),
    ("object_UA", "Object UA", str),
    ("object_IRA", "Object IRA", str),
    ("object_CRA", "Object CRA", str),
    ("n_style", "Styles", str),
    ("n_object", "Objects", str),
    ("FID", "FID", _fixed(2)),
    ("time_s", "Time (s)", _seconds),
    ("memory_gb", "Memory (GB)", _gigabytes),
    ("storage_gb", "Storage (GB)", _gigabytes),
)
TARGET_COLUMNS: tuple[tuple[str, str, _Fmt], ...] = (
    ("method", "Method", str),
    ("target", "Target", str),
    ("kind", "Kind", str),
    ("split", "Split", SPLIT_LABELS.get),
    ("UA", "UA", _fixed(2)),
    ("IRA", "IRA", _fixed(2)),
    ("CRA", "CRA", _fixed(2)),
    ("FID", "FID", _fixed(2)),
    ("time_s", "Time (s)", _seconds),
    ("memory_gb", "Memory (GB)", _gigabytes),
    ("storage_gb", "Storage (GB)", _gigabytes),
)


def markdown_table(rows: Iterable[Mapping[str, Any]], *, fid_features: str) -> str:
    """The paper's table, one line per method over its held-out targets, then (when there are any) a second table
    over its tuning targets, titled and marked "tuning — not a result"; a kind without targets shows `-`."""
    rows = check_rows(rows)
    column = _check_feature_space(rows, fid_features)
    table = aggregate(rows)
    parts = []
    for split, title in ((HELD_OUT, "Held-out targets"), (TUNING, "Tuning targets (tuning — not a result)")):
        entries = [_with_spread(e) for e in table if e["split"] == split]
        if entries or split == HELD_OUT:
            parts.append(f"{title}:\n\n" + (_markdown(entries, SUMMARY_COLUMNS, column) if entries else "none"))
    return "\n\n".join(parts)


def _with_spread(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A table entry as the Markdown shows it: each score cell `mean ± std, min x`, the split by its label."""
    shown = dict(entry, split=SPLIT_LABELS[entry["split"]])
    for kind in KINDS:
        for key in (f"{kind}_{k}" for k in SCORE_KEYS):
            if entry[key] is not None:
                shown[key] = f"{entry[key]:.2f} ± {entry[key + '_std']:.2f}, min {entry[key + '_min']:.2f}"
    return shown


TOGETHER_COLUMNS: tuple[tuple[str, str, _Fmt], ...] = (
    ("method", "Method", str),
    ("target", "Targets", str),
    ("kind", "Kind", str),
    ("split", "Split", SPLIT_LABELS.get),
    ("UA", "UA (mean)", _fixed(2)),
    ("UA_min", "UA (min)", _fixed(2)),
    ("IRA", "IRA", _fixed(2)),
    ("CRA", "CRA", _fixed(2)),
    ("time_s", "Time (s)", _seconds),
    ("storage_gb", "Storage (GB)", _gigabytes),
)


def together_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The jobs that erased several targets at once, each with the worst of its targets' UAs (`UA_min`)."""
    out = []
    for row in check_rows(rows):
        if TOGETHER in row["target"]:
            each = row.get("UA_each") or {}
            out.append({**row, "UA_min": min(each.values()) if each else None})
    return out


def markdown_targets(rows: Iterable[Mapping[str, Any]], *, fid_features: str) -> str:
    """One line per (method, target)."""
    rows = check_rows(rows)
    return _markdown(rows, TARGET_COLUMNS, _check_feature_space(rows, fid_features))


def markdown_report(
    rows: Iterable[Mapping[str, Any]], metadata: Mapping[str, Any] | None = None, *, fid_features: str
) -> str:
    """The whole `report.md`: metadata, the summary table, the per-target rows and the plot."""
    rows = check_rows(rows)
    column = _check_feature_space(rows, fid_features)
    lines = ["# UnlearnCanvas benchmark", ""]
    for key, value in (metadata or {}).items():
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
        lines.append(f"- **{key}**: {shown}")
    lines += [
        "",
        "## Summary",
        "",
        "UA / IRA / CRA in percent over each method's targets of that kind, each cell `mean ± std, min`: std is the",
        "population standard deviation over the targets (divides by n), min the worst target. FID, time, memory and",
        "storage are means over all its targets of the table's split; GB = 10^9 bytes. Results are the held-out",
        "targets; tuning targets (presets may have been tuned on them) are a separate table, never in those means.",
        "",
        markdown_table(rows, fid_features=fid_features),
        "",
        *_together_section(rows, column),
        *attacks.markdown_section(rows),
        "## Per target",
        "",
        _markdown(rows, TARGET_COLUMNS, column),
        "",
        "![UA against IRA and CRA](ua_vs_retain.png)",
        "",
    ]
    return "\n".join(lines)


def _together_section(rows: Sequence[Mapping[str, Any]], column: str) -> list[str]:
    together = together_rows(rows)
    if not together:
        return []
    return [
        "## Several targets at once",
        "",
        "One erasure per line of all its targets: UA is the mean of their UAs (min: the worst of them), IRA is over",
        "the targets of their kind outside them, CRA over the other kind.",
        "",
        _markdown(together, TOGETHER_COLUMNS, column),
        "",
    ]


def write_report(
    out_dir: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    *,
    fid_features: str,
    plot: bool = True,
) -> dict[str, Path]:
    """Write report.json, report.md, report.csv (the per-method table, a `split` column), rows.csv (per target, with
    its split) and ua_vs_retain.png into `out_dir`; returns their paths by name. `metadata` goes into report.json at
    top level, with `fid_features`, the feature space that names the FID column (`fid_column`) in every file, and
    `spread` (`SPREAD`), what the `_std` columns are."""
    rows = check_rows(rows)
    column = _check_feature_space(rows, fid_features)
    metadata = dict(metadata or {})
    clash = sorted({"rows", "table", "spread"} & set(metadata))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the report's own rows and table")
    if metadata.setdefault("fid_features", fid_features) != fid_features:
        raise ValueError(f"metadata names FID features {metadata['fid_features']!r}, the report {fid_features!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows)
    document = {"rows": _named(rows, column), "table": _named(table, column), "spread": SPREAD, **metadata}
    named = {"FID": column}
    paths = {
        "json": write_text(out / "report.json", json.dumps(_finite(document), indent=2, default=str) + "\n"),
        "md": write_text(out / "report.md", markdown_report(rows, metadata, fid_features=fid_features)),
        "csv": write_text(out / "report.csv", _csv(_named(table, column), [named.get(k, k) for k in TABLE_KEYS])),
        "rows_csv": write_text(
            out / "rows.csv", _csv(_named(rows, column), [named.get(k, k) for k in _row_fields(rows)])
        ),
    }
    if plot:
        paths["plot"] = plot_ua_vs_retain(rows, out / "ua_vs_retain.png")
    return paths


def plot_ua_vs_retain(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """UA against IRA (left) and CRA (right): one colour per method, circles for style and triangles for object
    targets; faint points are held-out targets, hollow ones tuning targets (not a result), outlined ones the
    method's mean over its held-out targets. Top right is best."""
    rows = check_rows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = colormaps["tab10"]
    markers = {"style": "o", "object": "^"}
    fig = Figure(figsize=(10, 4.6))  # no pyplot: a report never changes the caller's matplotlib backend
    axes = fig.subplots(1, 2, sharey=True)
    for ax, retain in zip(axes, ("IRA", "CRA")):
        for (m, method), kind in itertools.product(enumerate(methods), KINDS):
            colour, marker = colours(m % 10), markers[kind]
            points = {
                split: [(r[retain], r["UA"]) for r in rows if r["method"] == method and r["kind"] == kind
                        and r["split"] == split and r[retain] is not None and r["UA"] is not None]
                for split in TARGET_SPLITS
            }  # fmt: skip
            if points[TUNING]:
                xs, ys = zip(*points[TUNING])
                ax.scatter(xs, ys, facecolors="none", edgecolors=[colour], marker=marker, s=28, linewidths=0.8)
            if points[HELD_OUT]:
                xs, ys = zip(*points[HELD_OUT])
                ax.scatter(xs, ys, color=colour, marker=marker, alpha=0.35, s=28, linewidths=0)
                ax.scatter(
                    [sum(xs) / len(xs)], [sum(ys) / len(ys)], color=colour, marker=marker, s=110,
                    edgecolors="black", linewidths=1.2, zorder=3,
                )  # fmt: skip
        ax.set_xlabel(f"{retain} (%)  - {'in-domain' if retain == 'IRA' else 'cross-domain'} retain accuracy")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if not rows:
            ax.text(50, 50, "no targets", ha="center", va="center", color="grey")
    axes[0].set_ylabel("UA (%)  - unlearning accuracy")
    handles = [
        Line2D([], [], color=colours(m % 10), marker="s", linestyle="", label=name) for m, name in enumerate(methods)
    ]
    handles += [Line2D([], [], color="grey", marker=markers[k], linestyle="", label=f"{k} target") for k in KINDS]
    handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="tuning"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
    fig.suptitle("Unlearning vs retaining (top right is best; outlined = mean over held-out targets; hollow = tuning)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_text(Path(path), buffer.getvalue())


def _markdown(entries: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, _Fmt]], fid: str) -> str:
    """A Markdown table; `fid` is the FID column's header (`fid_column`)."""
    lines = ["| " + " | ".join(fid if key == "FID" else h for key, h, _ in columns) + " |"]
    lines.append(
        "|" + "|".join("---" if key in ("method", "target", "kind", "split") else "---:" for key, _, _ in columns) + "|"
    )
    for entry in entries:
        cells = [_cell(entry.get(key), fmt) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any, fmt: _Fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return fmt(value).replace("|", "\\|")


def _row_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra = [k for row in rows for k in row if k not in ROW_KEYS]
    return [*ROW_KEYS, *dict.fromkeys(extra)]


def _csv(entries: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in fields})
    return buffer.getvalue()


def _finite(value: Any) -> Any:
    """NaN / inf become null, so report.json stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
