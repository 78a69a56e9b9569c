"""The one Dagster code location: ingest -> dbt transforms -> contracts, scheduled and sensed."""

from __future__ import annotations

import dagster as dg
from dagster_dbt import DbtCliResource

from models.registry import FAMILIES  # noqa: E402
from orchestration.assets.contracts import mart_contracts
from orchestration.assets.families import build_family_assets
from orchestration.assets.ingest import raw_tables
from orchestration.assets.training import baseline_metrics, build_leaderboard_asset, training_snapshot
from orchestration.assets.transforms import DBT_EXECUTABLE, dbt_project, transforms
from orchestration.automation import landing_sensor, nightly_refresh, refresh_all
from orchestration.resources import WarehouseResource

family_assets = [a for name in FAMILIES for a in build_family_assets(name)]

defs = dg.Definitions(
    assets=[
        raw_tables,
        transforms,
        training_snapshot,
        baseline_metrics,
        *family_assets,
        build_leaderboard_asset(list(FAMILIES)),
    ],
    asset_checks=[mart_contracts],
    jobs=[refresh_all],
    schedules=[nightly_refresh],
    sensors=[landing_sensor],
    resources={
        "warehouse": WarehouseResource(),
        "dbt": DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE),
    },
    # Steps that touch the warehouse share one tag so that, inside a run, they never
    # overlap (DuckDB: one writer per file); across runs the `duckdb_warehouse` pool does it.
    executor=dg.multiprocess_executor.configured(
        {
            "max_concurrent": 2,
            "tag_concurrency_limits": [
                {"key": "recsys/warehouse", "value": "duckdb", "limit": 1},
            ],
        }
    ),
)
