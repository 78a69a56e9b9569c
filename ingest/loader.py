"""Load a :class:`SourcePlan` into the warehouse's ``raw`` schema, validating every row.

Rules, applied in this order (the first that fails is the row's ``reason``):

* interactions: the line parses into the expected fields; ``user_id``/``item_id`` are
  non-negative integers; ``rating`` is a finite number in 0.5..5; ``timestamp`` is unix
  seconds (digits) or strict ISO-8601 (a date, or a date and time with an optional fraction
  and Z/offset; none means UTC), or a parquet TIMESTAMP/DATE, between 1970 and 2100; the
  user/item exists when the layout has a users/items table; no earlier row has the same
  (user_id, item_id, timestamp).
* users/items: the id is a non-negative integer that no earlier row used. Unusable
  optional features (an age that is not a number, a gender other than M/F) become NULL.

Rejected rows land in ``raw.rejected_*`` with the row as read and the reason, the first
``max_rejected_per_reason`` of each reason (RECSYS_MAX_REJECTED_ROWS_PER_REASON), each with
``reason_rows``, the exact number of rows rejected for that reason; nothing is silently
dropped. Lines DuckDB cannot parse at all (wrong field count in a quoted csv, bytes
that are not the file's encoding, an unterminated quote, a record longer than
``max_line_bytes``) are quarantined the same way, with their line number. Whole-file faults
stop the ingest with a :class:`SourceError` naming the file: binary data, a line longer
than ``max_line_bytes`` (checked before DuckDB reads the file), a truncated ``.gz``, a
``.gz`` or parquet file that unpacks past ``max_unpack_bytes``, a users/items file of which
no row is usable. The input files are only read. All six tables
are built as ``*__new`` and swapped in one transaction, so a failed ingest (a full or
read-only disk included) leaves the previous raw tables intact.

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from common.io import is_storage_failure, storage_error
from ingest.guards import MAX_UNPACKED_BYTES, SourceError, short_error
from ingest.layouts import SourcePlan
from ingest.staging import _duckdb_storage_error
from ingest.validation import (
    MAX_REJECTED_ROWS_PER_REASON,
    Limits,
    _derive_entities,
    _load_entities,
    _load_interactions,
    rejected_by_reason,
)

RAW_TABLES = ("interactions", "users", "items")


@dataclass(frozen=True)
class TableReport:
    table: str
    rows: int
    rejected: int
    rejected_by_reason: dict[str, int]
    fingerprint: str
    source_files: list[str]
    derived: bool = False  # True when the layout had no such table and ids came from interactions


@dataclass(frozen=True)
class IngestReport:
    layout: str
    tables: dict[str, TableReport]
    notes: list[str] = field(default_factory=list)

    @property
    def interactions(self) -> TableReport:
        return self.tables["interactions"]


def connect(warehouse: Path, memory_limit: str = "2GB", temp_dir: Path | None = None):
    """A read-write connection to the warehouse file, spilling to ``temp_dir``.

    Raises:
        StorageError: the warehouse's folder is read-only, full or not writable.
        SourceError: another process holds the file.
    """
    kept = "Nothing in the warehouse was changed."
    for folder in (warehouse.parent, temp_dir):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_storage_failure(exc) or isinstance(exc, FileExistsError):
                if isinstance(exc, FileExistsError):
                    exc = OSError(errno.ENOTDIR, "a file stands where a folder is needed", exc.filename)
                raise storage_error(exc, folder, kept=kept) from exc
            raise
    # Options as connection config, never formatted into SQL: a value cannot smuggle a statement.
    config: dict[str, object] = {"memory_limit": memory_limit, "preserve_insertion_order": True}
    if temp_dir is not None:
        config["temp_directory"] = str(temp_dir)
    try:
        con = duckdb.connect(str(warehouse), config=config)
    except (duckdb.InvalidInputException, duckdb.ParserException) as exc:
        raise SourceError(
            f"DuckDB refused the connection options {config} ({short_error(exc)}): check "
            "RECSYS_DUCKDB_MEMORY_LIMIT (e.g. 2GB) and RECSYS_HOME."
        ) from exc
    except duckdb.Error as exc:
        storage = _duckdb_storage_error(exc, warehouse, kept)
        if storage is not None:
            raise storage from exc
        raise SourceError(
            f"Cannot open the warehouse {warehouse} for writing ({short_error(exc)}). Another "
            "process may hold it (DuckDB allows one writer): wait for it, or check RECSYS_HOME "
            "is writable."
        ) from exc
    return con  # preserve_insertion_order: source_row relies on file order


# ----------------------------------------------------------------- fingerprint and swap


def fingerprint(con, relation: str) -> tuple[int, str]:
    """(rows, content hash) of a raw table, independent of row order and of where the files
    lay (``source_file``/``source_row`` are left out), so re-ingesting the same data from
    another folder gives the same data version."""
    cols = [r[0] for r in con.execute(f"DESCRIBE {relation}").fetchall()]
    content = ", ".join(c for c in cols if c not in ("source_file", "source_row"))
    n, h = con.execute(
        f"SELECT count(*), coalesce(sum(hash({content})::HUGEINT), 0) FROM {relation}"
    ).fetchone()
    return int(n), hashlib.sha256(f"{n}:{h}".encode()).hexdigest()[:16]


def _drop_new(con) -> None:
    for table in RAW_TABLES:
        con.execute(f"DROP TABLE IF EXISTS raw.{table}__new")
        con.execute(f"DROP TABLE IF EXISTS raw.rejected_{table}__new")


def _drop_new_after_failure(con) -> None:
    """Best effort: on a full disk or a dead connection the drop fails too, and the next
    ingest drops the leftovers first; the error that matters is the one being raised."""
    try:
        _drop_new(con)
    except duckdb.Error:
        pass


def _database_path(con) -> str:
    try:
        row = con.execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchone()
    except duckdb.Error:
        return "the warehouse"
    return row[0] if row and row[0] else "the warehouse"


def _swap(con) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for table in RAW_TABLES:
            for name in (table, f"rejected_{table}"):
                con.execute(f"DROP TABLE IF EXISTS raw.{name}")
                con.execute(f"ALTER TABLE raw.{name}__new RENAME TO {name}")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def ingest(
    con: duckdb.DuckDBPyConnection,
    plan: SourcePlan,
    max_unpack_bytes: int = MAX_UNPACKED_BYTES,
    max_rejected_per_reason: int = MAX_REJECTED_ROWS_PER_REASON,
) -> IngestReport:
    """Validate ``plan`` into ``raw.*``; on any error the previous raw tables stay as they were.
    ``max_unpack_bytes`` bounds what a ``.gz`` or parquet file may unpack to
    (RECSYS_MAX_UNPACK_BYTES); ``raw.rejected_*`` keep ``max_rejected_per_reason`` rows of
    each reason (RECSYS_MAX_REJECTED_ROWS_PER_REASON), the report counts them all.

    Raises:
        SourceError: the input cannot be used (the message names the file, and the line
            where one line is at fault).
        StorageError: the warehouse cannot be written (disk full, read-only, not permitted).
    """
    db_path = _database_path(con)
    kept = "The previous raw tables are kept (the swap is one transaction)."
    try:
        return _ingest(con, plan, Limits(plan.max_line_bytes, max_unpack_bytes, max_rejected_per_reason))
    except duckdb.Error as exc:
        _drop_new_after_failure(con)
        storage = _duckdb_storage_error(exc, db_path, kept)
        if storage is not None:
            raise storage from exc
        raise SourceError(
            f"Ingest of the {plan.layout} layout ({[str(f) for f in plan.interactions.files]}) into "
            f"{db_path} failed in DuckDB: {short_error(exc)}. {kept}"
        ) from exc
    except BaseException:
        _drop_new_after_failure(con)
        raise


def _ingest(con: duckdb.DuckDBPyConnection, plan: SourcePlan, limits: Limits) -> IngestReport:
    con.execute("CREATE SCHEMA IF NOT EXISTS raw")
    _drop_new(con)  # leftovers of a run that died half-way
    _load_entities(con, plan.users, "users", "user_id", limits)
    _load_entities(con, plan.items, "items", "item_id", limits)
    _load_interactions(con, plan.interactions, plan.users is not None, plan.items is not None, limits)
    if plan.users is None:
        _derive_entities(con, "users", "user_id")
    if plan.items is None:
        _derive_entities(con, "items", "item_id")
    reports = {}
    for table in RAW_TABLES:
        src = {"interactions": plan.interactions, "users": plan.users, "items": plan.items}[table]
        rows, fp = fingerprint(con, f"raw.{table}__new")
        by_reason = rejected_by_reason(con, f"raw.rejected_{table}__new")
        reports[table] = TableReport(
            table=table,
            rows=rows,
            rejected=sum(by_reason.values()),
            rejected_by_reason=by_reason,
            fingerprint=fp,
            source_files=[str(f) for f in src.files] if src else [],
            derived=src is None,
        )
    if reports["interactions"].rows == 0:
        raise SourceError(
            f"No interaction in {[str(f) for f in plan.interactions.files]} passed validation "
            f"({reports['interactions'].rejected} rejected: "
            f"{reports['interactions'].rejected_by_reason}). The previous raw tables are kept."
        )
    _swap(con)
    return IngestReport(layout=plan.layout, tables=reports, notes=list(plan.notes))
