"""The one Dagster code location: ingest -> dbt transforms -> contracts, scheduled and sensed."""

from __future__ import annotations

import dagster as dg
from dagster_dbt import DbtCliResource

from orchestration.assets.contracts import mart_contracts
from orchestration.assets.ingest import raw_tables
from orchestration.assets.transforms import DBT_EXECUTABLE, dbt_project, transforms
from orchestration.automation import landing_sensor, nightly_refresh, refresh_all
from orchestration.resources import WarehouseResource

defs = dg.Definitions(
    assets=[raw_tables, transforms],
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
