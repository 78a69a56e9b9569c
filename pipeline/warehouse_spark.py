"""The Spark warehouse (``RECSYS_WAREHOUSE=spark``): where its files live, how raw data
reaches it, and how DuckDB reads what it built.

Ingest still validates every row into DuckDB's ``raw.*`` (the validating loader is the one
place that decides what a good row is). Before dbt builds on Spark, ``export_raw`` writes
the three raw tables the dbt sources read to parquet files under ``$RECSYS_HOME/spark/raw``,
each through a hidden temp file moved into place, so Spark never reads half a file. On the
Spark target the dbt sources name those files (``parquet.`<file>```, Spark SQL's query over a
file in place: ``transforms/models/staging/_sources.yml``), so no table has to be declared.

dbt writes every intermediate and mart table as a parquet folder
``$RECSYS_HOME/spark/tables/<model>/``. ``parquet_connection`` opens an in-memory DuckDB
whose ``main.<model>`` views read those folders, so the snapshot, the data contracts and the
row counts run the same SQL on either warehouse. Spark's Derby metastore, warehouse folder,
scratch space and ``derby.log`` all live under ``$RECSYS_HOME/spark`` (profiles.yml).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from common.io import fsync_dir, is_storage_failure, storage_error
from pipeline.settings import Settings

RAW_TABLES = ("interactions", "users", "items")
# Names of dbt models: the only folder names turned into views (they are quoted anyway).
_MODEL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def raw_dir(settings: Settings) -> Path:
    return settings.spark_dir / "raw"


def tables_dir(settings: Settings) -> Path:
    return settings.spark_dir / "tables"


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def export_raw(con: duckdb.DuckDBPyConnection, settings: Settings) -> dict[str, int]:
    """Write ``raw.interactions``, ``raw.users`` and ``raw.items`` of the DuckDB warehouse to
    ``<raw_dir>/<table>.parquet`` atomically; returns the rows written per table.

    Raises:
        FileNotFoundError: a raw table is missing (ingest has not run yet).
        common.io.StorageError: the disk is full or read-only; the previous files are unchanged.
    """
    present = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'raw'"
        ).fetchall()
    }
    missing = [t for t in RAW_TABLES if t not in present]
    if missing:
        raise FileNotFoundError(
            f"The warehouse has no raw.{', raw.'.join(missing)}: materialise the ingest assets "
            "(raw_interactions, raw_users, raw_items) before building the marts on Spark."
        )
    folder = raw_dir(settings)
    rows = {}
    for table in RAW_TABLES:
        final = folder / f"{table}.parquet"
        # Hidden: a crashed export leaves nothing Spark or a reader would pick up.
        tmp = folder / f".{table}.parquet.{os.getpid()}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY (SELECT * FROM raw.{table}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_storage_failure(exc):
                raise storage_error(exc, final, kept="The previous raw parquet files are unchanged.") from exc
            raise
        except duckdb.Error:
            tmp.unlink(missing_ok=True)
            raise
        rows[table] = int(con.execute(f"SELECT count(*) FROM raw.{table}").fetchall()[0][0])
    fsync_dir(folder)
    return rows


def built_tables(settings: Settings) -> dict[str, Path]:
    """``{model: folder}`` for every table dbt has written on Spark (a folder with parquet)."""
    root = tables_dir(settings)
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and _MODEL_NAME.match(p.name) and any(p.glob("*.parquet"))
    }


def parquet_connection(settings: Settings, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view ``main.<model>`` over each table Spark built, and
    ``raw.<table>`` over the raw parquet files Spark read.

    The views read the parquet folders as they are on disk; the caller closes the connection.
    Types are DuckDB's reading of Spark's parquet (int -> INTEGER, array<int> -> INTEGER[], ...),
    the same types the DuckDB warehouse's marts have.
    """
    con = duckdb.connect(config={"memory_limit": memory_limit or settings.duckdb_memory_limit})
    try:
        # raw.*: the files Spark read, which the mart contracts compare row counts with
        con.execute("CREATE SCHEMA raw")
        for table in RAW_TABLES:
            path = raw_dir(settings) / f"{table}.parquet"
            if path.is_file():
                con.execute(f"CREATE VIEW raw.{table} AS SELECT * FROM read_parquet('{_sql_path(path)}')")
        for name, folder in built_tables(settings).items():
            con.execute(
                f"CREATE VIEW main.\"{name}\" AS SELECT * FROM read_parquet('{_sql_path(folder)}/*.parquet')"
            )
    except BaseException:
        con.close()
        raise
    return con
