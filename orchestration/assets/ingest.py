"""Ingest: raw interactions, users and items into ``raw.*``, each checked by its contract."""

import shutil
from pathlib import Path

import dagster as dg

from common.io import StorageError
from ingest.layouts import SourceError
from ingest.plan import build_plan
from orchestration.assets.contracts import contract_check_result
from orchestration.resources import WarehouseResource
from pipeline.settings import SOURCES, SettingsError, ensure_writable, load_settings

# Bump when the validation rules or the raw schema change: the UI then marks the raw
# assets, and everything downstream, as stale.
INGEST_CODE_VERSION = "ingest-v1"
WAREHOUSE_POOL = "duckdb_warehouse"
WAREHOUSE_TAGS = {"recsys/warehouse": "duckdb"}

RAW_DESCRIPTIONS = {
    "interactions": (
        "Validated user-item interactions in `raw.interactions` of the DuckDB warehouse "
        "(`$RECSYS_HOME/warehouse.duckdb`): user_id, item_id, rating 0.5..5, ts (unix seconds), "
        "plus the source file and row. Rows that fail validation are in "
        "`raw.rejected_interactions` with the reason. Data version = content fingerprint."
    ),
    "users": (
        "Users in `raw.users` (gender, age, occupation, zip). Layouts without a user table get "
        "one featureless row per user seen. Rejected rows: `raw.rejected_users`."
    ),
    "items": (
        "Items in `raw.items` (title, year, '|'-separated genres). Layouts without an item table "
        "get one featureless row per item seen. Rejected rows: `raw.rejected_items`."
    ),
}
RAW_KEYS = {table: dg.AssetKey(f"raw_{table}") for table in RAW_DESCRIPTIONS}


class IngestConfig(dg.Config):
    """Per-run overrides of the source; empty fields fall back to the RECSYS_* variables."""

    source: str | None = None
    data_path: str | None = None
    column_map: dict[str, str] | None = None


@dg.multi_asset(
    name="raw_tables",
    specs=[
        dg.AssetSpec(
            key,
            group_name="ingest",
            description=RAW_DESCRIPTIONS[table],
            kinds={"duckdb", "python"},
            code_version=INGEST_CODE_VERSION,
            owners=["team:recsys-data"],
            metadata={"relation": f"raw.{table}"},
        )
        for table, key in RAW_KEYS.items()
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "contract",
            asset=key,
            blocking=True,
            description=f"great-expectations suite raw_{table}: schema, nulls, ranges, uniqueness, "
            "row-count bounds. Blocks everything downstream when it fails.",
        )
        for table, key in RAW_KEYS.items()
    ],
    pool=WAREHOUSE_POOL,
    op_tags=WAREHOUSE_TAGS,
)
def raw_tables(context: dg.AssetExecutionContext, config: IngestConfig, warehouse: WarehouseResource):
    try:
        settings = load_settings()
        # Before any work: a read-only, full or missing RECSYS_HOME fails here, in one line.
        ensure_writable(settings.home, "RECSYS_HOME")
    except SettingsError as exc:
        raise dg.Failure(description=str(exc)) from None
    source = config.source or settings.source
    if source not in SOURCES:
        raise dg.Failure(f"run config source={source!r} is not one of {', '.join(SOURCES)}.")
    data_path = Path(config.data_path).expanduser() if config.data_path else settings.data_path
    scratch = settings.scratch_dir / context.run_id
    try:
        plan = build_plan(
            source,
            data_path,
            scratch,
            column_map=config.column_map if config.column_map is not None else settings.column_map,
            synthetic={
                "n_users": settings.synth_users,
                "n_items": settings.synth_items,
                "n_events": settings.synth_events,
                "seed": settings.synth_seed,
            },
            encoding=settings.files_encoding,
            max_line_bytes=settings.max_line_bytes,
            max_unpack_bytes=settings.max_unpack_bytes,
        )
        context.log.info(f"ingesting layout {plan.layout} ({'; '.join(plan.notes) or 'no notes'})")
        with warehouse.connect() as con:
            from ingest.loader import ingest

            report = ingest(con, plan)
            checks = [
                contract_check_result(con, f"raw_{table}", RAW_KEYS[table], settings) for table in RAW_KEYS
            ]
            stats = con.execute(
                "SELECT count(DISTINCT user_id), count(DISTINCT item_id), min(ts), max(ts), "
                "avg(rating) FROM raw.interactions"
            ).fetchone()
    except (SourceError, StorageError) as exc:
        # Bad input or a full/read-only disk: the message names the file and the fix, and
        # the previous raw tables are intact. A Failure shows that message, not a deep stack.
        raise dg.Failure(
            description=str(exc),
            metadata={"source": source, "data_path": str(data_path or ""), "error": type(exc).__name__},
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for table, rep in report.tables.items():
        metadata = {
            "dagster/row_count": rep.rows,
            "rejected_rows": rep.rejected,
            "rejected_by_reason": dg.MetadataValue.json(rep.rejected_by_reason),
            "fingerprint": rep.fingerprint,
            "layout": report.layout,
            "source": source,
            "source_files": dg.MetadataValue.json(rep.source_files),
            "derived_from_interactions": rep.derived,
            "warehouse": dg.MetadataValue.path(str(settings.warehouse)),
        }
        if table == "interactions":
            metadata |= {
                "n_users": stats[0],
                "n_items": stats[1],
                "first_ts": stats[2],
                "last_ts": stats[3],
                "mean_rating": float(stats[4]),
                "notes": "; ".join(report.notes),
            }
        if rep.rejected:
            context.log.warning(
                f"raw_{table}: {rep.rejected} rows rejected ({rep.rejected_by_reason}); "
                f"see raw.rejected_{table}"
            )
        yield dg.MaterializeResult(
            asset_key=RAW_KEYS[table],
            data_version=dg.DataVersion(rep.fingerprint),
            metadata=metadata,
        )
    yield from checks
