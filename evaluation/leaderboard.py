"""The leaderboard: every model and baseline side by side, as JSON, Markdown and a PNG.

A record is one number::

    {"model": str, "family_or_baseline": str, "task": str, "metric": str, "value": float,
     "split": str, "data_version": str, "version": str | None, "is_baseline": bool}

Models are only comparable on the same task, split and data version, so every view groups
by that triple; within a group a ``model`` appears once per metric.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.io import atomic_write_bytes, atomic_write_json
from common.metrics import MAIN_METRIC, TASK_ORDER

REQUIRED_KEYS = (
    "model",
    "family_or_baseline",
    "task",
    "metric",
    "value",
    "split",
    "data_version",
    "is_baseline",
)
_LOWER_IS_BETTER = ("rmse", "mae", "logloss")
# Counts and descriptive numbers: shown, never ranked or bolded.
_UNRANKED = ("n_", "gauc_users", "positive_rate", "catalogue_size", "sampled_negatives")

Record = dict[str, Any]
GroupKey = tuple[str, str, str]  # (task, split, data_version)


def metric_direction(metric: str) -> str | None:
    """``"min"`` if lower is better (rmse, mae, logloss and their ``_task``/``sampled_``
    variants), ``None`` for counts that are not a quality, else ``"max"``."""
    name = metric.removeprefix("sampled_")
    if name.startswith(_UNRANKED):
        return None
    if any(name == m or name.startswith(m + "_") for m in _LOWER_IS_BETTER):
        return "min"
    return "max"


def validate_records(records: Iterable[Record]) -> list[Record]:
    """Check keys, types and uniqueness; returns the records as a list.

    Raises ValueError on an empty list, a missing key, a non-finite value, or the same
    (task, split, data_version, model, metric) twice (which one would the table show?).
    """
    out = list(records)
    if not out:
        raise ValueError("no leaderboard records: evaluate at least one model or baseline first.")
    seen: set[tuple[str, ...]] = set()
    for i, r in enumerate(out):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ValueError(f"leaderboard record {i} ({r.get('model')!r}) lacks {missing}.")
        if not math.isfinite(float(r["value"])):
            raise ValueError(f"record {i}: {r['model']} {r['metric']} is {r['value']}; not a finite number.")
        key = (r["task"], r["split"], r["data_version"], r["model"], r["metric"])
        if key in seen:
            raise ValueError(f"record {i} duplicates {key}; keep one value per model and metric.")
        seen.add(key)
    return out


def _groups(records: list[Record]) -> dict[GroupKey, list[Record]]:
    def order(key: GroupKey) -> tuple[int, GroupKey]:
        return (TASK_ORDER.index(key[0]) if key[0] in TASK_ORDER else len(TASK_ORDER), key)

    groups: dict[GroupKey, list[Record]] = {}
    for r in records:
        groups.setdefault((r["task"], r["split"], str(r["data_version"])), []).append(r)
    return {k: groups[k] for k in sorted(groups, key=order)}


def write_leaderboard_json(records: Iterable[Record], path: Path | str) -> Path:
    """Write ``{"main_metric": MAIN_METRIC, "records": [...]}`` atomically (temp + os.replace).

    Records are sorted (task, split, data version, model, metric) so reruns diff cleanly.
    """
    rows = validate_records(records)
    rows.sort(key=lambda r: (r["task"], r["split"], str(r["data_version"]), r["model"], r["metric"]))
    payload = {"main_metric": {t: list(m) for t, m in MAIN_METRIC.items()}, "records": rows}
    return atomic_write_json(path, payload)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


def _table(task: str, rows: list[Record]) -> list[str]:
    """One Markdown table: rows = models (best main metric first), columns = metrics."""
    main, main_dir = MAIN_METRIC.get(task, (None, "max"))
    # main metric first, counts (n_users...) last
    metrics = sorted({r["metric"] for r in rows}, key=lambda m: (m != main, metric_direction(m) is None, m))
    cells: dict[str, dict[str, float]] = {}
    info: dict[str, Record] = {}
    for r in rows:
        cells.setdefault(r["model"], {})[r["metric"]] = float(r["value"])
        info[r["model"]] = r

    best: dict[str, float] = {}
    for m in metrics:
        direction = metric_direction(m)
        values = [c[m] for c in cells.values() if m in c]
        if direction and len(values) > 1:
            best[m] = min(values) if direction == "min" else max(values)

    def rank(model: str) -> tuple[bool, float, str]:
        v = cells[model].get(main) if main else None
        sign = 1.0 if main_dir == "min" else -1.0
        return (v is None, sign * v if v is not None else 0.0, model)

    lines = [
        "| model | family / baseline | version | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---:|" * len(metrics),
    ]
    for model in sorted(cells, key=rank):
        r = info[model]
        name = f"{model} *(baseline)*" if r["is_baseline"] else model
        values = []
        for m in metrics:
            if m not in cells[model]:
                values.append("–")
                continue
            text = _fmt(cells[model][m])
            values.append(f"**{text}**" if best.get(m) == cells[model][m] else text)
        version = r.get("version") or "–"
        lines.append(f"| {name} | {r['family_or_baseline']} | {version} | " + " | ".join(values) + " |")
    return lines


def leaderboard_markdown(records: Iterable[Record]) -> str:
    """Markdown: one table per (task, split, data version); the best value of each ranked
    column in bold (ties all bold), baselines marked *(baseline)*, rows ordered by the
    task's main metric (``MAIN_METRIC``)."""
    out = ["# Leaderboard", ""]
    for (task, split, data_version), rows in _groups(validate_records(records)).items():
        main = MAIN_METRIC.get(task)
        better = "lower" if main and main[1] == "min" else "higher"
        ranked_by = f"ranked by {main[0]} ({better} is better)" if main else ""
        out += [f"## {task} — split `{split}`, data `{data_version}`", "", ranked_by, ""]
        out += _table(task, rows) + [""]
    return "\n".join(out)


def leaderboard_png(records: Iterable[Record], path: Path | str, tasks: Sequence[str] = TASK_ORDER) -> Path:
    """Bar chart, one panel per task on its main metric (RMSE lower is better; NDCG@10,
    AUC, AUC(like) higher). Baselines are grey and hatched. Written atomically.

    Raises ValueError if no record carries a main metric of ``tasks``.
    """
    # Figure + Agg canvas, not pyplot: no global backend state, safe in a Dagster worker thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = validate_records(records)
    panels = []
    for task in tasks:
        if task not in MAIN_METRIC:
            continue
        metric, direction = MAIN_METRIC[task]
        chosen = [r for r in rows if r["task"] == task and r["metric"] == metric]
        if chosen:
            panels.append((task, metric, direction, chosen))
    if not panels:
        raise ValueError(f"no record holds a main metric ({MAIN_METRIC}) for tasks {list(tasks)}.")

    height = max(3.0, 0.35 * max(len(p[3]) for p in panels) + 1.5)
    fig = Figure(figsize=(5.5 * len(panels), height), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (task, metric, direction, chosen) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        several_splits = len({(r["split"], str(r["data_version"])) for r in chosen}) > 1
        chosen = sorted(chosen, key=lambda r: float(r["value"]), reverse=direction == "max")
        labels = [r["model"] + (f" [{r['split']}]" if several_splits else "") for r in chosen]
        bars = ax.barh(range(len(chosen)), [float(r["value"]) for r in chosen])
        for bar, r in zip(bars, chosen):
            if r["is_baseline"]:
                # facecolor, not color=: color also sets the hatch colour and hides the hatch
                bar.set(facecolor="lightgrey", hatch="//", edgecolor="grey")
        ax.set_yticks(range(len(chosen)), labels)
        ax.invert_yaxis()  # best on top
        ax.set_title(f"{task}: {metric} ({'lower' if direction == 'min' else 'higher'} is better)")
        ax.bar_label(bars, fmt="%.4f", fontsize=8)
        ax.margins(x=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


def leaderboard_records(
    evaluations: list[dict], baselines: dict, split: str, data_version: str
) -> list[dict]:
    """One record per (model or baseline, metric); baselines once per task."""
    records = []
    tasks = set()
    for ev in evaluations:
        tasks.add(ev["task"])
        # an evaluation a partial run brought along from an older snapshot keeps that label
        on_split, on_version = ev.get("evaluated_on", (split, data_version))
        for metric, value in ev["metrics"].items():
            records.append(
                {
                    "model": ev["family"],
                    "family_or_baseline": ev["family"],
                    "task": ev["task"],
                    "metric": metric,
                    "value": float(value),
                    "split": on_split,
                    "data_version": on_version,
                    "version": None,
                    "is_baseline": False,
                }  # fmt: skip
            )
    for task in sorted(tasks):
        for name, metrics in baselines.get(task, {}).items():
            for metric, value in metrics.items():
                records.append(
                    {
                        "model": f"baseline:{name}",
                        "family_or_baseline": name,
                        "task": task,
                        "metric": metric,
                        "value": float(value),
                        "split": split,
                        "data_version": data_version,
                        "version": None,
                        "is_baseline": True,
                    }  # fmt: skip
                )
    return records


def best_markdown(records: list[dict]) -> str:
    """One line per task: the best model on the task's main metric beside the popularity
    baseline (the bar for blessing); short enough for the UI to show inline."""
    lines = ["| task | main metric | best model | value | popularity |", "|---|---|---|---:|---:|"]
    for task in TASK_ORDER:
        metric, direction = MAIN_METRIC[task]
        rows = [r for r in records if r["task"] == task and r["metric"] == metric]
        models = [r for r in rows if not r["is_baseline"]]
        if not models:
            continue
        pick = min if direction == "min" else max
        best = pick(models, key=lambda r: float(r["value"]))
        popularity = [r for r in rows if r["is_baseline"] and r["family_or_baseline"] == "popularity"]
        bar = f"{float(popularity[0]['value']):.4f}" if popularity else "–"
        better = "lower" if direction == "min" else "higher"
        value = f"{float(best['value']):.4f}"
        lines.append(f"| {task} | {metric} ({better} is better) | {best['model']} | {value} | {bar} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Published:
    """The leaderboard of one run, written to ``reports_dir``."""

    records: list[Record]
    json_path: Path
    png_path: Path
    markdown: str
    split: str
    data_version: str


def _evaluated_on(evaluation: dict, split: str, data_version: str) -> tuple[str, str]:
    """(split, data version) of the snapshot an evaluation scored. A partial run brings the
    latest evaluations of the families it did not run, which may have scored an older snapshot;
    they are listed under that snapshot, apart from this one's baselines. An evaluation that
    does not name its snapshot (written before it did) is taken to be of this one."""
    snapshot = evaluation.get("snapshot")
    if not snapshot or Path(snapshot).name == data_version:
        return split, data_version
    try:
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
        return str(meta.get("split", "?")), str(meta["fingerprint"])
    except (OSError, ValueError, KeyError):  # pruned since: its folder name is its fingerprint
        return "?", Path(snapshot).name


def publish_leaderboard(
    evaluations: list[dict], baselines: dict, snapshot_dir: Path | str, reports_dir: Path | str
) -> Published:
    """Every evaluated family and every baseline on the snapshot's split and data version:
    ``leaderboard.json`` and ``leaderboard.png`` in ``reports_dir`` (each written atomically)."""
    meta = json.loads((Path(snapshot_dir) / "meta.json").read_text())
    split, data_version = str(meta.get("split", "?")), meta["fingerprint"]
    labelled = [{**ev, "evaluated_on": _evaluated_on(ev, split, data_version)} for ev in evaluations]
    records = leaderboard_records(labelled, baselines, split=split, data_version=data_version)
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    json_path = write_leaderboard_json(records, reports / "leaderboard.json")
    png_path = leaderboard_png(records, reports / "leaderboard.png")
    return Published(records, json_path, Path(png_path), leaderboard_markdown(records), split, data_version)
