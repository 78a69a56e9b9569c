"""The baselines every model is measured against, and the leaderboard of all of them."""

import json
import time
from pathlib import Path

import dagster as dg

from orchestration.assets.snapshot import training_snapshot
from pipeline.settings import load_settings


@dg.asset(
    group_name="evaluate",
    ins={"snapshot": dg.AssetIn(training_snapshot.key)},
    code_version="baselines-v1",
    kinds={"python"},
    owners=["team:recsys-ml"],
    description=(
        "Random and popularity baselines for every task, scored on exactly the test rows the "
        "models are scored on. The popularity baseline is the bar a model must beat to be blessed."
    ),
)
def baseline_metrics(context: dg.AssetExecutionContext, snapshot: str):
    from evaluation.evaluate import evaluate_baselines
    from models.catalogue import FAMILIES, select_families

    names = select_families(load_settings().families)
    tasks = sorted({FAMILIES[n].task.value for n in names})
    result = {task: evaluate_baselines(Path(snapshot), task) for task in tasks}
    return dg.Output(result, metadata={"baselines": dg.MetadataValue.json(result)})


def _best_markdown(records: list[dict]) -> str:
    """One line per task: the best model on the task's main metric beside the popularity
    baseline (the bar for blessing); short enough for the UI to show inline."""
    from common.metrics import MAIN_METRIC, TASK_ORDER

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


def _chart_markdown(png: Path) -> str:
    """The PNG inlined as a data URI: Dagster's Markdown renderer allows ``data:`` images, so the
    chart shows in the UI (behind "[Show Markdown]") without a file server."""
    import base64

    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"![leaderboard chart: main metric per task, baselines hatched](data:image/png;base64,{encoded})"


def build_leaderboard_asset(family_names: list[str]) -> dg.AssetsDefinition:
    @dg.asset(
        name="leaderboard",
        group_name="evaluate",
        ins={
            **{f"eval_{n}": dg.AssetIn(dg.AssetKey(f"eval_{n}")) for n in family_names},
            "baselines": dg.AssetIn(baseline_metrics.key),
            "snapshot": dg.AssetIn(training_snapshot.key),
        },
        kinds={"python"},
        code_version="leaderboard-v1",
        owners=["team:recsys-ml"],
        description=(
            "Every family and baseline on the same split and data version. Metadata: `best` (each "
            "task's best model beside the popularity baseline), `chart` (bar chart of each task's "
            "main metric, also `$RECSYS_HOME/reports/leaderboard.png`), `leaderboard` (every metric "
            "of every model, best in bold) and `json` (`$RECSYS_HOME/reports/leaderboard.json`, one "
            "record per model and metric, with split and data version)."
        ),
    )
    def leaderboard(context: dg.AssetExecutionContext, baselines: dict, snapshot: str, **evals):
        from evaluation.evaluate import leaderboard_records
        from evaluation.leaderboard import leaderboard_markdown, leaderboard_png, write_leaderboard_json

        settings = load_settings()
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
        records = leaderboard_records(
            [e for e in evals.values()], baselines, split=meta.get("split", "?"),
            data_version=meta["fingerprint"],
        )  # fmt: skip
        reports = settings.reports_dir
        reports.mkdir(parents=True, exist_ok=True)
        write_leaderboard_json(records, reports / "leaderboard.json")
        chart = leaderboard_png(records, reports / "leaderboard.png")
        table = leaderboard_markdown(records)
        context.log.info("\n" + table)
        return dg.Output(
            str(reports / "leaderboard.json"),
            metadata={
                "best": dg.MetadataValue.md(_best_markdown(records)),
                "chart": dg.MetadataValue.md(_chart_markdown(Path(chart))),
                "leaderboard": dg.MetadataValue.md(table),
                "json": dg.MetadataValue.path(str(reports / "leaderboard.json")),
                "chart_png": dg.MetadataValue.path(str(chart)),
                "split": str(meta.get("split", "?")),
                "data_version": meta["fingerprint"],
                "records": len(records),
                "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    return leaderboard
