"""``training_snapshot``: the marts frozen into parquet, the one input every family trains on."""

import json

import dagster as dg

from export.lineage import dbt_lineage, file_sha256
from orchestration.assets.contracts import MARTS
from orchestration.resources import WarehouseResource
from pipeline.settings import DBT_PROJECT_DIR, load_settings
from pipeline.snapshot import BUILD_INFO, write_snapshot

RAW_ASSETS = ("raw_interactions", "raw_users", "raw_items")


def _latest_data_versions(instance: dg.DagsterInstance, keys) -> dict[str, str | None]:
    versions = {}
    for key in keys:
        record = instance.get_latest_data_version_record(dg.AssetKey(key))
        versions[key] = record.asset_materialization.tags.get("dagster/data_version") if record else None
    return versions


@dg.asset(
    group_name="train",
    deps=[dg.AssetKey(m) for m in (*MARTS, BUILD_INFO)],
    kinds={"duckdb", "parquet"},
    code_version="snapshot-v1",
    pool="duckdb_warehouse",
    op_tags={"recsys/warehouse": "duckdb"},
    owners=["team:recsys-ml"],
    description=(
        "The marts frozen into parquet + meta.json under `$RECSYS_HOME/snapshots/<fingerprint>/`: "
        "every family trains and is evaluated on exactly these rows, without holding the "
        "DuckDB file (on Spark, DuckDB reads the marts' parquet folders). Data version = content "
        "hash of the marts. The split and the other dbt "
        "vars are read from `mart_build_info` (meta.json `build_info`)."
    ),
)
def training_snapshot(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
    settings = load_settings()
    manifest = DBT_PROJECT_DIR / "target" / "manifest.json"
    # The split and history_len come from the warehouse (mart_build_info), as dbt built them.
    extra = {
        "dbt_manifest_sha256": file_sha256(manifest) if manifest.exists() else None,
        "dbt_models": dbt_lineage(manifest, MARTS),
        "upstream": _latest_data_versions(context.instance, RAW_ASSETS + MARTS),
    }
    with warehouse.connect_marts() as con:  # DuckDB's tables, or Spark's parquet folders
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
            "warehouse": settings.warehouse_engine,
        },
    )
