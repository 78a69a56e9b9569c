"""Load a :class:`SourcePlan` into the warehouse's ``raw`` schema, validating every row.

Rules, applied in this order (the first that fails is the row's ``reason``):

* interactions: the line parses into the expected fields; ``user_id``/``item_id`` are
  non-negative integers; ``rating`` is a finite number in 0.5..5; ``timestamp`` is unix
  seconds (or ISO-8601) between 1970 and 2100; the user/item exists when the layout has a
  users/items table; no earlier row has the same (user_id, item_id, timestamp).
* users/items: the id is a non-negative integer that no earlier row used. Unusable
  optional features (an age that is not a number, a gender other than M/F) become NULL.

Rejected rows land in ``raw.rejected_*`` with the row as read and the reason; nothing is
silently dropped. The input files are only read. All six tables are built as ``*__new``
and swapped in one transaction, so a failed ingest leaves the previous raw tables intact.

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from orchestration.sources.layouts import SourceError, SourcePlan, TableSource

RAW_TABLES = ("interactions", "users", "items")
# 1970-01-01 .. 2100-01-01: anything outside is almost surely milliseconds or garbage.
MAX_TS = 4_102_444_800
_INT_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
              "UINTEGER", "UBIGINT")  # fmt: skip
_FLOAT_TYPES = ("FLOAT", "DOUBLE", "REAL")


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
    """A read-write connection to the warehouse file, spilling to ``temp_dir``."""
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(warehouse))
    except duckdb.IOException as exc:
        raise SourceError(
            f"Cannot open the warehouse {warehouse} for writing ({exc}). Another process may "
            "hold it (DuckDB allows one writer): wait for it, or check RECSYS_HOME is writable."
        ) from exc
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = true")  # source_row relies on file order
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = '{_q(temp_dir)}'")
    return con


def _q(value: object) -> str:
    return str(value).replace("'", "''")


# ----------------------------------------------------------------- staging candidates


def _stage(con: duckdb.DuckDBPyConnection, src: TableSource, name: str) -> None:
    """Create relation ``name`` with source_file, source_row, problem and one column per field."""
    fields = list(src.fields)
    if src.reader == "parquet":
        files = ", ".join(f"'{_q(f)}'" for f in src.files)
        cols = ", ".join(f"{src.fields[c]} AS {c}" for c in fields)
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT filename AS source_file, "
            f"file_row_number + 1 AS source_row, NULL::VARCHAR AS problem, {cols} "
            f"FROM read_parquet([{files}], filename = true, file_row_number = true, "
            "union_by_name = true)"
        )
        return
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {name} (source_file VARCHAR, source_row BIGINT, "
        f"problem VARCHAR, {', '.join(f'{c} VARCHAR' for c in fields)})"
    )
    for path in src.files:
        try:
            if src.reader == "lines":
                _stage_lines(con, src, path, name)
            else:
                _stage_csv(con, src, path, name)
        except duckdb.Error as exc:
            raise SourceError(
                f"{path} cannot be read as the {src.table} file of this layout ({exc}). "
                "Check its encoding and delimiter."
            ) from exc


def _stage_lines(con, src: TableSource, path: Path, name: str) -> None:
    # Every physical line becomes one row so a malformed line keeps its exact number.
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _lines AS SELECT rtrim(line, chr(13)) AS line "
        f"FROM read_csv('{_q(path)}', columns = {{'line': 'VARCHAR'}}, header = false, "
        f"delim = chr(1), quote = '', escape = '', auto_detect = false, "
        f"encoding = '{src.encoding}')"
    )
    if src.header:
        first = con.execute("SELECT line FROM _lines WHERE rowid = 0").fetchone()
        got = tuple((first[0] or "").split(src.delim)) if first else ()
        if got[: len(src.header_names)] != src.header_names:
            raise SourceError(
                f"{path} starts with header {first[0] if first else '(empty file)'!r}; "
                f"expected {src.delim.join(src.header_names)!r}."
            )
    delim_name = {"\t": "tab", ",": "','", "|": "'|'", "::": "'::'"}.get(src.delim, repr(src.delim))
    cols = ", ".join(src.fields[c] for c in src.fields)
    con.execute(
        f"INSERT INTO {name} SELECT '{_q(path)}', rowid + 1, "
        f"CASE WHEN line IS NULL OR trim(line) = '' THEN 'empty line' "
        f"WHEN len(parts) <> {src.n_fields} THEN 'expected {src.n_fields} fields separated by "
        f"{_q(delim_name)}, found ' || len(parts) END, {cols} "
        f"FROM (SELECT rowid, line, string_split(line, '{_q(src.delim)}') AS parts FROM _lines) "
        f"{'WHERE rowid > 0' if src.header else ''}"
    )


def _stage_csv(con, src: TableSource, path: Path, name: str) -> None:
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _csv AS SELECT * FROM read_csv('{_q(path)}', "
        f"header = true, delim = '{_q(src.delim)}', all_varchar = true, "
        f"encoding = '{src.encoding}', store_rejects = true, "
        "rejects_table = '_csv_rejects', rejects_scan = '_csv_scan')"
    )
    cols = ", ".join(src.fields[c] for c in src.fields)
    # rowid + 2: the header is line 1 (quoted fields spanning lines would shift this).
    con.execute(f"INSERT INTO {name} SELECT '{_q(path)}', rowid + 2, NULL, {cols} FROM _csv")
    nulls = ", ".join("NULL" for _ in src.fields)
    con.execute(
        f"INSERT INTO {name} SELECT '{_q(path)}', line, "
        f"'malformed CSV line: ' || first(error_message), {nulls} "
        "FROM _csv_rejects GROUP BY line"
    )


# ----------------------------------------------------------------- typed expressions


def _types(con, relation: str) -> dict[str, str]:
    rows = con.execute(f"DESCRIBE {relation}").fetchall()
    return {r[0]: r[1].upper() for r in rows}


def _as_int(col: str, typ: str) -> str:
    if typ in _INT_TYPES:
        return f"TRY_CAST({col} AS BIGINT)"
    if typ in _FLOAT_TYPES:  # ids written as floats (pandas with NaN) are fine when integral
        return f"CASE WHEN {col} = trunc({col}) THEN TRY_CAST({col} AS BIGINT) END"
    return (
        f"CASE WHEN regexp_full_match(trim({col}), '[+]?[0-9]{{1,18}}(\\.0+)?') "
        f"THEN TRY_CAST(TRY_CAST(trim({col}) AS DECIMAL(18, 0)) AS BIGINT) END"
    )


def _as_float(col: str, typ: str) -> str:
    if typ in _INT_TYPES or typ in _FLOAT_TYPES or typ.startswith("DECIMAL"):
        return f"TRY_CAST({col} AS DOUBLE)"
    return f"TRY_CAST(trim({col}) AS DOUBLE)"


def _as_unix_seconds(col: str, typ: str) -> str:
    if typ in _INT_TYPES:
        return f"TRY_CAST({col} AS BIGINT)"
    if typ in _FLOAT_TYPES:
        return f"CASE WHEN {col} = trunc({col}) THEN TRY_CAST({col} AS BIGINT) END"
    if typ.startswith("TIMESTAMP") or typ == "DATE":
        return f"TRY_CAST(epoch({col}) AS BIGINT)"
    return (
        f"CASE WHEN regexp_full_match(trim({col}), '[0-9]{{1,18}}') THEN TRY_CAST(trim({col}) AS BIGINT) "
        f"ELSE TRY_CAST(epoch(TRY_CAST(trim({col}) AS TIMESTAMPTZ)) AS BIGINT) END"
    )


def _as_text(col: str, typ: str) -> str:
    return f"NULLIF(trim(CAST({col} AS VARCHAR)), '')"


# ----------------------------------------------------------------- validation per table


def _load_entities(con, src: TableSource | None, table: str, id_col: str) -> None:
    """users/items: stage, validate ids, normalise features into raw.<table>__new."""
    new, rej = f"raw.{table}__new", f"raw.rejected_{table}__new"
    if src is None:
        return
    _stage(con, src, f"cand_{table}")
    t = _types(con, f"cand_{table}")
    fields = [c for c in src.fields]
    record = " || '|' || ".join(f"coalesce(CAST({c} AS VARCHAR), '')" for c in fields)
    if table == "users":
        features = (
            f"CASE WHEN upper(left(trim(CAST(gender AS VARCHAR)), 1)) IN ('M', 'F') "
            f"THEN upper(left(trim(CAST(gender AS VARCHAR)), 1)) END AS gender, "
            f"TRY_CAST({_as_int('age', t['age'])} AS INTEGER) AS age, "
            f"{_as_text('occupation', t['occupation'])} AS occupation, "
            f"{_as_text('zip_code', t['zip_code'])} AS zip_code"
        )
    else:
        features = (
            f"{_as_text('title', t['title'])} AS title, "
            f"CASE WHEN TRY_CAST({_as_int('year', t['year'])} AS INTEGER) BETWEEN 1800 AND 2100 "
            f"THEN TRY_CAST({_as_int('year', t['year'])} AS INTEGER) END AS year, "
            f"{_as_text('genres', t['genres'])} AS genres"
        )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE checked_{table} AS
        WITH typed AS (
            SELECT source_file, source_row, problem, {record} AS record,
                   {_as_int(id_col, t[id_col])} AS {id_col}, {features}
            FROM cand_{table}
        ), first_pass AS (
            SELECT *, CASE
                WHEN problem IS NOT NULL THEN problem
                WHEN {id_col} IS NULL THEN '{id_col} is missing or not a non-negative integer'
            END AS reason
            FROM typed
        )
        SELECT * EXCLUDE (reason), coalesce(reason, CASE WHEN row_number() OVER (
                PARTITION BY {id_col}, reason IS NULL ORDER BY source_file, source_row) > 1
            THEN 'duplicate {id_col} (an earlier row has the same id)' END) AS reason
        FROM first_pass
        """
    )
    keep = (
        "user_id, gender, age, occupation, zip_code" if table == "users" else ("item_id, title, year, genres")
    )
    con.execute(f"CREATE TABLE {new} AS SELECT {keep} FROM checked_{table} WHERE reason IS NULL")
    con.execute(
        f"CREATE TABLE {rej} AS SELECT source_file, source_row, record, reason "
        f"FROM checked_{table} WHERE reason IS NOT NULL"
    )


def _load_interactions(con, src: TableSource, has_users: bool, has_items: bool) -> None:
    _stage(con, src, "cand_interactions")
    t = _types(con, "cand_interactions")
    unknown_user = (
        "WHEN user_id NOT IN (SELECT user_id FROM raw.users__new) THEN 'user_id not in the users table' "
        if has_users
        else ""
    )
    unknown_item = (
        "WHEN item_id NOT IN (SELECT item_id FROM raw.items__new) THEN 'item_id not in the items table' "
        if has_items
        else ""
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE checked_interactions AS
        WITH typed AS (
            SELECT source_file, source_row, problem,
                   CAST(user_id_raw AS VARCHAR) AS raw_user_id,
                   CAST(item_id_raw AS VARCHAR) AS raw_item_id,
                   CAST(rating_raw AS VARCHAR) AS raw_rating,
                   CAST(ts_raw AS VARCHAR) AS raw_timestamp,
                   {_as_int("user_id_raw", t["user_id"])} AS user_id,
                   {_as_int("item_id_raw", t["item_id"])} AS item_id,
                   {_as_float("rating_raw", t["rating"])} AS rating,
                   {_as_unix_seconds("ts_raw", t["timestamp"])} AS ts
            FROM (SELECT * RENAME (user_id AS user_id_raw, item_id AS item_id_raw,
                                   rating AS rating_raw, timestamp AS ts_raw)
                  FROM cand_interactions)
        ), first_pass AS (
            SELECT *, CASE
                WHEN problem IS NOT NULL THEN problem
                WHEN user_id IS NULL THEN 'user_id is missing or not a non-negative integer'
                WHEN item_id IS NULL THEN 'item_id is missing or not a non-negative integer'
                WHEN rating IS NULL OR NOT isfinite(rating) THEN 'rating is missing or not a number'
                WHEN rating < 0.5 OR rating > 5 THEN 'rating outside 0.5..5'
                WHEN ts IS NULL THEN 'timestamp is missing or not unix seconds / ISO-8601'
                WHEN ts < 0 OR ts > {MAX_TS} THEN 'timestamp outside 1970..2100 (expected unix seconds)'
                {unknown_user}{unknown_item}
            END AS reason
            FROM typed
        )
        SELECT * EXCLUDE (reason), coalesce(reason, CASE WHEN row_number() OVER (
                PARTITION BY user_id, item_id, ts, reason IS NULL
                ORDER BY source_file, source_row) > 1
            THEN 'duplicate of an earlier row (same user_id, item_id, timestamp)' END) AS reason
        FROM first_pass
        """
    )
    con.execute(
        "CREATE TABLE raw.interactions__new AS SELECT user_id, item_id, rating, ts, "
        "source_file, source_row FROM checked_interactions WHERE reason IS NULL"
    )
    con.execute(
        "CREATE TABLE raw.rejected_interactions__new AS SELECT source_file, source_row, "
        "raw_user_id AS user_id, raw_item_id AS item_id, raw_rating AS rating, "
        "raw_timestamp AS ts, reason FROM checked_interactions WHERE reason IS NOT NULL"
    )


def _derive_entities(con, table: str, id_col: str) -> None:
    """Layouts without a users/items table: one featureless row per id seen."""
    cols = (
        "NULL::VARCHAR AS gender, NULL::INTEGER AS age, NULL::VARCHAR AS occupation, "
        "NULL::VARCHAR AS zip_code"
        if table == "users"
        else "NULL::VARCHAR AS title, NULL::INTEGER AS year, NULL::VARCHAR AS genres"
    )
    con.execute(
        f"CREATE TABLE raw.{table}__new AS SELECT DISTINCT {id_col}, {cols} "
        f"FROM raw.interactions__new ORDER BY {id_col}"
    )
    con.execute(
        f"CREATE TABLE raw.rejected_{table}__new (source_file VARCHAR, source_row BIGINT, "
        "record VARCHAR, reason VARCHAR)"
    )


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


def ingest(con: duckdb.DuckDBPyConnection, plan: SourcePlan) -> IngestReport:
    """Validate ``plan`` into ``raw.*``; on any error the previous raw tables stay as they were."""
    con.execute("CREATE SCHEMA IF NOT EXISTS raw")
    _drop_new(con)  # leftovers of a run that died half-way
    try:
        _load_entities(con, plan.users, "users", "user_id")
        _load_entities(con, plan.items, "items", "item_id")
        _load_interactions(con, plan.interactions, plan.users is not None, plan.items is not None)
        if plan.users is None:
            _derive_entities(con, "users", "user_id")
        if plan.items is None:
            _derive_entities(con, "items", "item_id")
        reports = {}
        for table in RAW_TABLES:
            src = {"interactions": plan.interactions, "users": plan.users, "items": plan.items}[table]
            rows, fp = fingerprint(con, f"raw.{table}__new")
            by_reason = dict(
                con.execute(
                    f"SELECT reason, count(*) FROM raw.rejected_{table}__new "
                    "GROUP BY reason ORDER BY count(*) DESC"
                ).fetchall()
            )
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
    except BaseException:
        _drop_new(con)
        raise
    return IngestReport(layout=plan.layout, tables=reports, notes=list(plan.notes))
