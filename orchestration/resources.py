"""Dagster resources: the DuckDB warehouse every stage reads and writes, and the marts dbt
built on the engine RECSYS_WAREHOUSE names (DuckDB itself, or Spark's parquet folders)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb

from ingest.loader import connect
from pipeline.settings import load_settings, memory_size
from pipeline.warehouse_spark import parquet_connection


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file at ``$RECSYS_HOME/warehouse.duckdb``.

    DuckDB allows one writing process per file, and a reader cannot open it while another
    process writes. Every step that opens it runs in the ``duckdb_warehouse`` pool (limit 1),
    and connections are opened per step and closed at once, never held across steps.
    """

    # Empty fields resolve from the RECSYS_* environment when a step runs, so one loaded
    # code location follows RECSYS_HOME without a reload.
    path: str | None = None
    memory_limit: str | None = None

    def engine(self) -> str:
        """``duckdb`` or ``spark``: where dbt builds the marts (RECSYS_WAREHOUSE)."""
        return load_settings().warehouse_engine

    @contextmanager
    def connect_marts(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only DuckDB connection whose ``main.*`` are the tables dbt built: the DuckDB
        file itself, or on Spark an in-memory DuckDB over the parquet folders Spark wrote
        (pipeline.warehouse_spark). The snapshot, the contracts and the row counts read these."""
        settings = load_settings()
        if settings.warehouse_engine != "spark":
            with self.connect(read_only=True) as con:
                yield con
            return
        memory = memory_size(self.memory_limit, "warehouse.memory_limit") if self.memory_limit else None
        con = parquet_connection(settings, memory)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        settings = load_settings()
        path = Path(self.path) if self.path else settings.warehouse
        memory = memory_size(self.memory_limit, "warehouse.memory_limit") if self.memory_limit else None
        memory = memory or settings.duckdb_memory_limit
        if read_only:
            if not path.exists():
                raise FileNotFoundError(
                    f"The warehouse {path} does not exist yet: materialise the ingest assets "
                    "(raw_interactions, raw_users, raw_items) first."
                )
            # Readers get the same memory limit as writers: a snapshot of 10M rows otherwise
            # grew DuckDB's buffer pool to 5 GiB.
            con = duckdb.connect(
                str(path),
                read_only=True,
                config={"memory_limit": memory},
            )
        else:
            con = connect(path, memory, settings.scratch_dir / "duckdb_tmp")
        try:
            yield con
        finally:
            con.close()
