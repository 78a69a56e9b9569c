"""The validation rules in SQL: typed columns, the reason each candidate row is rejected (the
first rule that fails, in the order :mod:`ingest.loader` lists), and the ``raw.*__new`` /
``raw.rejected_*__new`` tables they fill (the first rows of each reason, each row with the
exact count of its reason).

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.guards import MAX_LINE_BYTES, MAX_UNPACKED_BYTES, SourceError
from ingest.layouts import TableSource
from ingest.staging import _stage

# 1970-01-01 .. 2100-01-01: anything outside is almost surely milliseconds or garbage.
MAX_TS = 4_102_444_800
# Rejected rows kept per reason and table (RECSYS_MAX_REJECTED_ROWS_PER_REASON overrides it).
# A thousand examples show what is wrong with a file; a broken 30 MB file would otherwise
# store its 1.8M rows a second time. Every rejected row is still counted (``reason_rows``).
MAX_REJECTED_ROWS_PER_REASON = 1000
_INT_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
              "UINTEGER", "UBIGINT")  # fmt: skip
_FLOAT_TYPES = ("FLOAT", "DOUBLE", "REAL")




@dataclass(frozen=True)
class Limits:
    """How far one ingest reads (line length, unpacked size of compressed files) and how many
    rejected rows it keeps per reason."""

    max_line_bytes: int = MAX_LINE_BYTES
    max_unpack_bytes: int = MAX_UNPACKED_BYTES
    max_rejected_per_reason: int = MAX_REJECTED_ROWS_PER_REASON


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


# Strict ISO-8601: a date, or a date and a time (seconds and their fraction optional, 'T'
# or a space between) with an optional Z or UTC offset; groups: date, time, zone.
ISO_8601 = (
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?)"
    r"(Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"
)
# Text to unix seconds, row by row. DuckDB's own cast also takes 'epoch' (0), 'infinity',
# 'now', zone names and offsets past 23:59, and reads a time without an offset in the session's
# time zone; these macros take digits (unix seconds) and ISO_8601 only, a time without an
# offset as UTC, and drop fractions of a second as unix time does. NULL when it does not parse.
_TIMESTAMP_MACROS = (
    "CREATE OR REPLACE TEMP MACRO _recsys_zone_hours(z) AS TRY_CAST(substr(z, 2, 2) AS INTEGER)",
    "CREATE OR REPLACE TEMP MACRO _recsys_zone_minutes(z) AS "
    "coalesce(TRY_CAST(nullif(substr(replace(z, ':', ''), 4, 2), '') AS INTEGER), 0)",
    "CREATE OR REPLACE TEMP MACRO _recsys_offset_seconds(z) AS CASE WHEN z IN ('', 'Z') THEN 0 "
    "WHEN _recsys_zone_hours(z) <= 23 AND _recsys_zone_minutes(z) <= 59 THEN "
    "(CASE WHEN starts_with(z, '-') THEN -60 ELSE 60 END) "
    "* (_recsys_zone_hours(z) * 60 + _recsys_zone_minutes(z)) END",
    "CREATE OR REPLACE TEMP MACRO _recsys_iso_seconds(p) AS CAST(epoch(date_trunc('second', "
    "TRY_CAST(p.d || ' ' || coalesce(nullif(p.t, ''), '00:00') AS TIMESTAMP))) AS BIGINT) "
    "- _recsys_offset_seconds(p.z)",
    "CREATE OR REPLACE TEMP MACRO _recsys_text_seconds(v) AS CASE "
    "WHEN regexp_full_match(v, '[0-9]{1,18}') THEN TRY_CAST(v AS BIGINT) "
    f"WHEN regexp_full_match(v, '{ISO_8601}') THEN "
    f"_recsys_iso_seconds(regexp_extract(v, '{ISO_8601}', ['d', 't', 'z'])) END",
)


def _as_unix_seconds(col: str, typ: str) -> str:
    """SQL: ``col`` as unix seconds, NULL when it is none. Parquet TIMESTAMP columns arrive
    as BIGINT seconds already (:mod:`ingest.staging` reads them so an out-of-range value is
    one row, not a file error)."""
    if typ in _INT_TYPES:
        return f"TRY_CAST({col} AS BIGINT)"
    if typ in _FLOAT_TYPES:
        return f"CASE WHEN {col} = trunc({col}) THEN TRY_CAST({col} AS BIGINT) END"
    if typ.startswith("TIMESTAMP") or typ == "DATE":
        return f"TRY_CAST(epoch({col}) AS BIGINT)"
    return f"_recsys_text_seconds(trim(CAST({col} AS VARCHAR)))"


def _as_text(col: str, typ: str) -> str:
    return f"NULLIF(trim(CAST({col} AS VARCHAR)), '')"


# ----------------------------------------------------------------- validation per table


def _quarantine(con, checked: str, rejected: str, columns: str, keep: int) -> None:
    """``rejected``: the first ``keep`` rows of each reason in ``checked`` (in file order),
    each with ``reason_rows``, the number of rows rejected for that reason in all."""
    con.execute(
        f"CREATE TABLE {rejected} AS SELECT {columns}, reason, count(*) OVER (PARTITION BY reason) "
        f"AS reason_rows FROM {checked} WHERE reason IS NOT NULL QUALIFY row_number() OVER "
        f"(PARTITION BY reason ORDER BY source_file, source_row) <= {int(keep)} "
        "ORDER BY source_file, source_row"
    )


def rejected_by_reason(con, rejected: str) -> dict[str, int]:
    """Reason -> rows rejected for it (kept or not), most frequent first."""
    rows = con.execute(
        f"SELECT reason, max(reason_rows) FROM {rejected} GROUP BY reason ORDER BY 2 DESC, 1"
    ).fetchall()
    return {reason: int(n) for reason, n in rows}


def _load_entities(con, src: TableSource | None, table: str, id_col: str, limits: Limits) -> None:
    """users/items: stage, validate ids, normalise features into raw.<table>__new."""
    new, rej = f"raw.{table}__new", f"raw.rejected_{table}__new"
    if src is None:
        return
    _stage(con, src, f"cand_{table}", limits.max_line_bytes, limits.max_unpack_bytes)
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
    keep_rejected = limits.max_rejected_per_reason
    _quarantine(con, f"checked_{table}", rej, "source_file, source_row, record", keep_rejected)
    kept = con.execute(f"SELECT count(*) FROM {new}").fetchone()[0]
    if kept == 0:
        # Every interaction would then be rejected as "not in the {table} table": say why here.
        by_reason = rejected_by_reason(con, rej)
        n_rejected, reasons = sum(by_reason.values()), dict(list(by_reason.items())[:5])
        raise SourceError(
            f"No row of the {table} file {[str(f) for f in src.files]} passed validation "
            f"({n_rejected} rejected: {reasons}). Fix or replace that file; the previous "
            "raw tables are kept."
        )


def _load_interactions(con, src: TableSource, has_users: bool, has_items: bool, limits: Limits) -> None:
    _stage(con, src, "cand_interactions", limits.max_line_bytes, limits.max_unpack_bytes)
    t = _types(con, "cand_interactions")
    for macro in _TIMESTAMP_MACROS:
        con.execute(macro)
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
                WHEN ts IS NULL AND regexp_full_match(trim(raw_timestamp), '{ISO_8601}')
                    THEN 'timestamp has the ISO-8601 form but is not a valid date or time'
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
    _quarantine(
        con, "checked_interactions", "raw.rejected_interactions__new",
        "source_file, source_row, raw_user_id AS user_id, raw_item_id AS item_id, raw_rating AS rating, "
        "raw_timestamp AS ts", limits.max_rejected_per_reason,
    )  # fmt: skip


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
        "record VARCHAR, reason VARCHAR, reason_rows BIGINT)"
    )
