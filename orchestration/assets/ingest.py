"""Ingest: raw interactions, users and items into ``raw.*``, each checked by its contract."""

import dagster as dg

from common.io import StorageError
from ingest.layouts import SourceError
from ingest.paths import FileStat
from orchestration.assets.contracts import contract_check_result
from orchestration.resources import WarehouseResource
from pipeline.raw import Landed, land, resolve_source
from pipeline.settings import SettingsError, ensure_writable, load_settings

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


class SettledFile(dg.Config):
    """A file the landing sensor saw settled: read only while it still has this size and mtime."""

    name: str  # a file name in data_path, no folders
    size: int  # bytes
    mtime: float  # seconds since the epoch, as os.stat's st_mtime


class IngestConfig(dg.Config):
    """Per-run overrides of the source; empty fields fall back to the RECSYS_* variables."""

    source: str | None = None
    data_path: str | None = None
    column_map: dict[str, str] | None = None
    # The landing sensor's list: the files source reads exactly these files of the data_path
    # folder, and refuses one that changed since. Left out (by hand), the folder is read whole.
    files: list[SettledFile] | None = None


def _settled(config: IngestConfig) -> dict[str, FileStat] | None:
    if config.files is None:
        return None
    names = [f.name for f in config.files]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise SettingsError(f"run config files lists {dupes} more than once; list each file once.")
    return {f.name: FileStat(f.size, f.mtime) for f in config.files}


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
        source, data_path = resolve_source(settings, config.source, config.data_path)
        settled = _settled(config)
    except SettingsError as exc:
        raise dg.Failure(description=str(exc)) from None
    try:
        with warehouse.connect() as con:
            landed = land(con, settings, source, data_path, config.column_map,
                          settings.scratch_dir / context.run_id, context.log.info, settled)  # fmt: skip
            checks = [contract_check_result(con, f"raw_{t}", key, settings) for t, key in RAW_KEYS.items()]
    except (SourceError, StorageError) as exc:
        # Bad input or a full/read-only disk: the message names the file and the fix, and
        # the previous raw tables are intact. A Failure shows that message, not a deep stack.
        raise dg.Failure(
            description=str(exc),
            metadata={"source": source, "data_path": str(data_path or ""), "error": type(exc).__name__},
        ) from None
    for table, rep in landed.report.tables.items():
        if rep.rejected:
            context.log.warning(f"raw_{table}: {rep.rejected} rejected ({rep.rejected_by_reason}); first "
                                f"{settings.max_rejected_per_reason}/reason: raw.rejected_{table}")
        yield dg.MaterializeResult(
            asset_key=RAW_KEYS[table],
            data_version=dg.DataVersion(rep.fingerprint),
            metadata=_table_metadata(table, landed, settings),
        )
    yield from checks


def _table_metadata(table: str, landed: Landed, settings) -> dict:
    rep = landed.report.tables[table]
    metadata = {
        "dagster/row_count": rep.rows,
        "rejected_rows": rep.rejected,
        "rejected_by_reason": dg.MetadataValue.json(rep.rejected_by_reason),
        "fingerprint": rep.fingerprint,
        "layout": landed.report.layout,
        "source": landed.source,
        "source_files": dg.MetadataValue.json(rep.source_files),
        "derived_from_interactions": rep.derived,
        "warehouse": dg.MetadataValue.path(str(settings.warehouse)),
    }
    if table == "interactions":
        metadata |= {
            "n_users": landed.n_users,
            "n_items": landed.n_items,
            "first_ts": landed.first_ts,
            "last_ts": landed.last_ts,
            "mean_rating": landed.mean_rating,
            "notes": "; ".join(landed.report.notes),
        }
    return metadata
