"""The one Dagster code location: ingest -> dbt -> contracts -> train -> ONNX -> evaluate ->
registry, scheduled nightly and sensed on a landing folder; storage retention pruned nightly."""

import dagster as dg
from dagster_dbt import DbtCliResource

from models.catalogue import select_families
from orchestration.assets.contracts import mart_contracts
from orchestration.assets.evaluation import (
    EVAL_LOADER,
    baseline_metrics,
    build_leaderboard_asset,
    latest_evaluation,
)
from orchestration.assets.families import UPSTREAM_LOADER, build_family_assets, upstream_checkpoint
from orchestration.assets.ingest import raw_tables
from orchestration.assets.retention import prune_storage, storage_retention
from orchestration.assets.snapshot import training_snapshot
from orchestration.assets.transforms import DBT_EXECUTABLE, dbt_project, transforms
from orchestration.automation import landing_sensor, nightly_prune, nightly_refresh, refresh_all
from orchestration.resources import WarehouseResource
from pipeline.settings import SettingsError, load_settings

SETTINGS = load_settings()
try:
    # RECSYS_FAMILIES=wals,deepfm builds only those chains (plus what they build on)
    FAMILY_NAMES = select_families(SETTINGS.families)
except ValueError as exc:
    raise SettingsError(f"RECSYS_FAMILIES: {exc}") from None


def _executor(max_concurrent: int) -> dg.ExecutorDefinition:
    """One process per run by default: on a small machine the per-step process start of the
    multiprocess executor (importing Dagster, dbt and torch each time) cost more than the
    steps themselves (measured: the default data took 3.6 min multiprocess, 45 s in-process).
    With RECSYS_MAX_CONCURRENT > 1, steps run in parallel processes; steps that touch the
    warehouse share one tag so they never overlap inside a run (DuckDB: one writer per file),
    and the `duckdb_warehouse` pool does the same across runs."""
    if max_concurrent <= 1:
        return dg.in_process_executor
    return dg.multiprocess_executor.configured(
        {
            "max_concurrent": max_concurrent,
            "tag_concurrency_limits": [{"key": "recsys/warehouse", "value": "duckdb", "limit": 1}],
        }
    )


defs = dg.Definitions(
    assets=[
        raw_tables,
        transforms,
        training_snapshot,
        baseline_metrics,
        *[asset for name in FAMILY_NAMES for asset in build_family_assets(name)],
        build_leaderboard_asset(FAMILY_NAMES),
        storage_retention,  # reported by the prune_storage job, never part of a graph run
    ],
    asset_checks=[mart_contracts],
    jobs=[refresh_all, prune_storage],
    schedules=[nightly_refresh, nightly_prune],
    sensors=[landing_sensor],
    resources={
        "warehouse": WarehouseResource(),
        "dbt": DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE),
        UPSTREAM_LOADER: upstream_checkpoint,
        EVAL_LOADER: latest_evaluation,
        # Dagster's default, named so that sensors and schedules see what EVAL_LOADER needs
        # (they check resource dependencies against this dict, not the implicit default)
        "io_manager": dg.fs_io_manager,
    },
    executor=_executor(SETTINGS.max_concurrent),
)
