"""Data contracts as blocking Dagster asset checks (great-expectations suites in data_contracts/)."""

from collections.abc import Mapping

import dagster as dg
import duckdb

from orchestration.resources import WarehouseResource
from pipeline.settings import Settings, load_settings
from pipeline.snapshot import read_build_info

MARTS = ("dim_users", "dim_items", "fct_ratings", "fct_ctr_samples", "user_stats", "item_stats")


def contract_parameters(
    settings: Settings, build_info: Mapping[str, object] | None = None
) -> dict[str, object]:
    """Bounds the suites take from the configuration rather than from the data.

    The split bounds follow ``build_info`` (the vars dbt built the marts with, from
    ``main.mart_build_info``), never RECSYS_SPLIT: a run that overrides the split is checked
    against the split it built. Without ``build_info`` the suites' own loose bounds apply.
    """
    params: dict[str, object] = {
        "min_rows": settings.min_events,
        "history_len": build_info["history_len"] if build_info else settings.history_len,
    }
    if build_info and build_info["split"] in ("temporal", "stratified"):
        # Both aim at the configured fractions; stratified rounds up per user, hence the slack.
        valid, test = float(build_info["valid_frac"]), float(build_info["test_frac"])
        params["min_holdout_frac"] = 0.5 * min(valid, test)
        params["max_holdout_frac"] = min(0.5, 2 * max(valid, test) + 0.05)
        params["min_train_frac"] = max(0.3, 1 - 2.5 * (valid + test))
    return params


def contract_check_result(
    con: duckdb.DuckDBPyConnection,
    suite: str,
    asset_key: dg.AssetKey,
    settings: Settings,
    build_info: Mapping[str, object] | None = None,
    skip_unbuilt_upstream: bool = False,
    warehouse: str | None = None,
) -> dg.AssetCheckResult:
    """Run one suite and turn it into a check result whose metadata shows what failed.

    ``skip_unbuilt_upstream``: expectations comparing with a mart not built yet (a partial
    materialisation on a fresh warehouse) are listed as skipped instead of failing the suite.
    ``warehouse``: the engine that built the table (``duckdb`` / ``spark``), shown in the metadata.
    """
    from data_contracts import run_suite

    parameters = contract_parameters(settings, build_info)
    result = run_suite(con, suite, parameters=parameters, skip_unbuilt_upstream=skip_unbuilt_upstream)
    failed = result.failed()
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name="contract",
        passed=result.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "suite": suite,
            # the split of the bounds, as built (mart_build_info); absent for the raw tables
            **({"split": str(build_info["split"])} if build_info else {}),
            "parameters": dg.MetadataValue.json(parameters),
            "relation": result.relation,
            "rows_in_table": result.n_rows,
            "rows_sampled": result.sampled_rows if result.sampled_rows is not None else result.n_rows,
            "expectations": len(result.outcomes),
            "failed_expectations": len(failed),
            "skipped_expectations": dg.MetadataValue.json(list(result.skipped)),
            "failed": dg.MetadataValue.json(
                [
                    {
                        "expectation": o.expectation,
                        "column": o.column,
                        "observed": str(o.observed),
                        "sample_bad_values": [str(v) for v in o.sample_bad_values[:10]],
                    }
                    for o in failed
                ]
            ),
            "report": dg.MetadataValue.md(result.to_markdown()),
            **({"warehouse": warehouse} if warehouse else {}),
        },
    )


@dg.multi_asset_check(
    name="mart_contracts",
    specs=[
        dg.AssetCheckSpec(
            "contract",
            asset=dg.AssetKey(mart),
            blocking=True,
            description=f"great-expectations suite {mart}: schema, nulls, ranges, uniqueness, "
            "label rate and row-count bounds. Blocks training when it fails.",
        )
        for mart in MARTS
    ],
    can_subset=True,
    pool="duckdb_warehouse",
    op_tags={"recsys/warehouse": "duckdb"},
)
def mart_contracts(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource):
    settings = load_settings()
    selected = {key.asset_key.path[-1] for key in context.selected_asset_check_keys}
    with warehouse.connect_marts() as con:  # DuckDB's tables, or Spark's parquet folders
        build_info = read_build_info(con)
        for mart in MARTS:
            if mart in selected:
                yield contract_check_result(
                    con, mart, dg.AssetKey(mart), settings, build_info, skip_unbuilt_upstream=True,
                    warehouse=settings.warehouse_engine,
                )  # fmt: skip
