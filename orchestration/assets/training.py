"""Train -> export -> evaluate -> registry, one chain of assets per model family (a factory).

Every family in ``models.catalogue.FAMILIES`` gets the same four assets:

    model_<family>     train on the mart snapshot (checkpoint under $RECSYS_HOME/artifacts)
    onnx_<family>      model.onnx + signature + lineage; blocking `parity` check
    eval_<family>      onnxruntime-only evaluation on test; blocking `blessing` check
    registry_<family>  atomic promotion into $RECSYS_HOME/registry/<family>/<version>/

so adding a family is one file in models/, one registry line and one config entry.
"""

import difflib
import json
import time
import tomllib
from pathlib import Path

import dagster as dg

from orchestration.assets.contracts import MARTS
from orchestration.resources import WarehouseResource
from pipeline.settings import DBT_PROJECT_DIR, REPO_ROOT, Settings, load_settings

TRAINING_POOL = "model_training"
FAMILY_CONFIG_FILE = REPO_ROOT / "models" / "families.toml"
RAW_ASSETS = ("raw_interactions", "raw_users", "raw_items")


def family_configs(settings: Settings) -> dict[str, dict]:
    """Per-family hyper-parameter overrides: models/families.toml, then RECSYS_MODEL_CONFIG."""
    merged: dict[str, dict] = {}
    for path in (FAMILY_CONFIG_FILE, settings.model_config):
        if path is None:
            continue
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise dg.Failure(f"model config {path} cannot be read as TOML ({exc}).") from exc
        from models.catalogue import FAMILIES

        for family, values in data.items():
            if family not in FAMILIES:
                close = difflib.get_close_matches(family, FAMILIES, n=1)
                hint = f" Did you mean [{close[0]}]?" if close else ""
                raise dg.Failure(
                    f"model config {path} has a section [{family}], which is not a family;{hint} "
                    f"known families: {', '.join(sorted(FAMILIES))}."
                )
            merged.setdefault(family, {}).update(values)
    return merged


def _latest_data_versions(instance: dg.DagsterInstance, keys) -> dict[str, str | None]:
    versions = {}
    for key in keys:
        record = instance.get_latest_data_version_record(dg.AssetKey(key))
        versions[key] = record.asset_materialization.tags.get("dagster/data_version") if record else None
    return versions


@dg.asset(
    group_name="train",
    deps=[dg.AssetKey(m) for m in MARTS],
    kinds={"duckdb", "parquet"},
    code_version="snapshot-v1",
    pool="duckdb_warehouse",
    op_tags={"recsys/warehouse": "duckdb"},
    owners=["team:recsys-ml"],
    description=(
        "The marts frozen into parquet + meta.json under `$RECSYS_HOME/snapshots/<fingerprint>/`: "
        "every family trains and is evaluated on exactly these rows, without holding the "
        "DuckDB file. Data version = content hash of the marts."
    ),
)
def training_snapshot(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
    from export.lineage import dbt_lineage, file_sha256
    from pipeline.snapshot import write_snapshot

    settings = load_settings()
    manifest = DBT_PROJECT_DIR / "target" / "manifest.json"
    extra = {
        "split": settings.split,
        "history_len": settings.history_len,
        "dbt_manifest_sha256": file_sha256(manifest) if manifest.exists() else None,
        "dbt_models": dbt_lineage(manifest, MARTS),
        "upstream": _latest_data_versions(context.instance, RAW_ASSETS + MARTS),
    }
    with warehouse.connect(read_only=True) as con:
        path = write_snapshot(con, settings.home / "snapshots", extra)
    meta = json.loads((path / "meta.json").read_text())
    return dg.Output(
        str(path),
        data_version=dg.DataVersion(meta["fingerprint"]),
        metadata={
            "snapshot_dir": dg.MetadataValue.path(str(path)),
            "n_users": meta["n_users"],
            "n_items": meta["n_items"],
            "split_rows": dg.MetadataValue.json(meta["split_rows"]),
            "split": str(meta.get("split")),
        },
    )


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
