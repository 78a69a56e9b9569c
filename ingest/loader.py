"""Load a :class:`SourcePlan` into the warehouse's ``raw`` schema, validating every row.

Rules, applied in this order (the first that fails is the row's ``reason``):

* interactions: the line parses into the expected fields; ``user_id``/``item_id`` are
  non-negative integers; ``rating`` is a finite number in 0.5..5; ``timestamp`` is unix
  seconds (or ISO-8601) between 1970 and 2100; the user/item exists when the layout has a
  users/items table; no earlier row has the same (user_id, item_id, timestamp).
* users/items: the id is a non-negative integer that no earlier row used. Unusable
  optional features (an age that is not a number, a gender other than M/F) become NULL.

Rejected rows land in ``raw.rejected_*`` with the row as read and the reason; nothing is
silently dropped. Lines DuckDB cannot parse at all (wrong field count in a quoted csv, bytes
that are not the file's encoding, an unterminated quote, a record longer than
``max_line_bytes``) are quarantined the same way, with their line number. Whole-file faults
stop the ingest with a :class:`SourceError` naming the file: binary data, a line longer
than ``max_line_bytes`` (checked before DuckDB reads the file), a truncated ``.gz``, a
users/items file of which no row is usable. The input files are only read. All six tables
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

from common.io import StorageError, is_storage_failure, storage_error, wrapped_storage_error
from ingest.layouts import (
    SourceError,
    SourcePlan,
    TableSource,
    check_text_file,
    read_header,
    short_error,
)

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


def _duckdb_storage_error(exc: BaseException, path: Path | str, kept: str) -> StorageError | None:
    """A :class:`StorageError` when ``exc`` is DuckDB failing to write (disk full, read-only,
    not permitted), else None."""
    return wrapped_storage_error(exc, path, kept)


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
    try:
        con = duckdb.connect(str(warehouse))
    except duckdb.Error as exc:
        storage = _duckdb_storage_error(exc, warehouse, kept)
        if storage is not None:
            raise storage from exc
        raise SourceError(
            f"Cannot open the warehouse {warehouse} for writing ({short_error(exc)}). Another "
            "process may hold it (DuckDB allows one writer): wait for it, or check RECSYS_HOME "
            "is writable."
        ) from exc
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = true")  # source_row relies on file order
    if temp_dir is not None:
        con.execute(f"SET temp_directory = '{_q(temp_dir)}'")
    return con


def _q(value: object) -> str:
    return str(value).replace("'", "''")


# ----------------------------------------------------------------- staging candidates


def _stage(con: duckdb.DuckDBPyConnection, src: TableSource, name: str, max_line_bytes: int) -> None:
    """Create relation ``name`` with source_file, source_row, problem and one column per field."""
    fields = list(src.fields)
    if src.reader == "parquet":
        files = ", ".join(f"'{_q(f)}'" for f in src.files)
        cols = ", ".join(f"{src.fields[c]} AS {c}" for c in fields)
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT filename AS source_file, "
                f"file_row_number + 1 AS source_row, NULL::VARCHAR AS problem, {cols} "
                f"FROM read_parquet([{files}], filename = true, file_row_number = true, "
                "union_by_name = true)"
            )
            con.execute(f"SELECT count(*) FROM {name}").fetchone()  # reads every footer now
        except duckdb.Error as exc:
            about_input = any(str(f) in str(exc) for f in src.files)
            if _duckdb_storage_error(exc, "", "") is not None and not about_input:
                raise  # the warehouse's disk, not the input file: ingest() explains it
            raise SourceError(
                f"The {src.table} parquet files {[str(f) for f in src.files]} cannot be read "
                f"({short_error(exc)}); re-export the damaged file."
            ) from exc
        return
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {name} (source_file VARCHAR, source_row BIGINT, "
        f"problem VARCHAR, {', '.join(f'{c} VARCHAR' for c in fields)})"
    )
    for path in src.files:
        # Whole-file faults first, in Python: DuckDB would buffer a 2 GB line whole.
        check_text_file(path, max_line_bytes, src.encoding)
        try:
            if src.reader == "lines":
                _stage_lines(con, src, path, name, max_line_bytes)
            else:
                _stage_csv(con, src, path, name, max_line_bytes)
        except duckdb.Error as exc:
            if _duckdb_storage_error(exc, "", "") is not None and str(path) not in str(exc):
                raise  # the warehouse's disk, not the input file: ingest() explains it
            raise SourceError(
                f"{path} cannot be read as the {src.table} file of this layout ({short_error(exc)}). "
                "Check its encoding and delimiter."
            ) from exc


def _read_options(src: TableSource, max_line_bytes: int) -> str:
    """read_csv options shared by both text readers: no sniffing, every unparsable line
    goes to the temp table ``_rejects`` (with its line number) instead of failing the read."""
    # DuckDB counts the line break in a record's size; the Python check bounds lines already.
    return (
        f"auto_detect = false, encoding = '{src.encoding}', max_line_size = {max_line_bytes + 2}, "
        "store_rejects = true, rejects_table = '_rejects', rejects_scan = '_rejects_scan'"
    )


def _fresh_rejects(con) -> None:
    con.execute("DROP TABLE IF EXISTS _rejects")
    con.execute("DROP TABLE IF EXISTS _rejects_scan")


def _reject_reason(src: TableSource, max_line_bytes: int) -> str:
    """SQL: the reason of a line DuckDB rejected, from ``_rejects``' error_type."""
    if src.reader == "lines":  # one column split on chr(1): more columns = a \x01 byte in the line
        fields = "'contains a \\x01 control byte (binary data?)'"
    else:
        fields = "'wrong number of fields (' || first(error_message) || ')'"
    return (
        "CASE first(error_type) "
        f"WHEN 'LINE SIZE OVER MAXIMUM' THEN 'row longer than {max_line_bytes} bytes "
        "(RECSYS_MAX_LINE_BYTES)' "
        f"WHEN 'INVALID ENCODING' THEN 'not valid {src.encoding} text (wrong file encoding? "
        "re-encode it, or set RECSYS_FILES_ENCODING for csv/tsv files)' "
        f"WHEN 'TOO MANY COLUMNS' THEN {fields} WHEN 'MISSING COLUMNS' THEN {fields} "
        "WHEN 'UNQUOTED VALUE' THEN 'unterminated or stray quote' "
        "ELSE 'malformed line: ' || first(error_message) END"
    )


def _numbered(con, relation: str, before: int) -> str:
    """SQL: ``relation`` with ``_recsys_line``, the line number of each accepted row.

    DuckDB skipped the lines in ``_rejects`` (numbered from 1, counting ``before`` lines
    ahead of the rows, e.g. a header), so the k-th accepted row is on line
    ``before + k + (lines rejected ahead of it)``. With the rejected lines L_1 < L_2 < ...,
    ``L_i - before - i`` rows were accepted ahead of L_i, so an ASOF join finds the count.
    """
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _shift AS SELECT acc_before, max(n) AS n FROM ("
        f"SELECT line - {before} - row_number() OVER (ORDER BY line) AS acc_before, "
        "row_number() OVER (ORDER BY line) AS n FROM (SELECT DISTINCT line FROM _rejects)) "
        "GROUP BY acc_before"
    )
    # Odd names: the relation's own columns are the file's, whatever they are called.
    return (
        f"(SELECT r.* EXCLUDE (_recsys_k), {before} + r._recsys_k + coalesce(s.n, 0) AS _recsys_line "
        f"FROM (SELECT *, rowid + 1 AS _recsys_k FROM {relation}) r "
        "ASOF LEFT JOIN _shift s ON r._recsys_k > s.acc_before)"
    )


def _insert_rejected_lines(con, src: TableSource, path: Path, name: str, max_line_bytes: int,
                           skip_line: int = 0) -> None:  # fmt: skip
    nulls = ", ".join("NULL" for _ in src.fields)
    con.execute(
        f"INSERT INTO {name} SELECT '{_q(path)}', line, {_reject_reason(src, max_line_bytes)}, {nulls} "
        f"FROM _rejects WHERE line <> {skip_line} GROUP BY line"
    )


def _stage_lines(con, src: TableSource, path: Path, name: str, max_line_bytes: int) -> None:
    # Every physical line becomes one row so a malformed line keeps its exact number.
    _fresh_rejects(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _lines_read AS SELECT rtrim(line, chr(13)) AS line "
        f"FROM read_csv('{_q(path)}', columns = {{'line': 'VARCHAR'}}, header = false, "
        f"delim = chr(1), quote = '', escape = '', {_read_options(src, max_line_bytes)})"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _lines AS SELECT * FROM {_numbered(con, '_lines_read', 0)}")
    if src.header:
        bad = con.execute(
            f"SELECT {_reject_reason(src, max_line_bytes)} FROM _rejects WHERE line = 1 GROUP BY line"
        ).fetchone()
        first = con.execute("SELECT line FROM _lines WHERE _recsys_line = 1").fetchone()
        got = tuple((first[0] or "").split(src.delim)) if first else ()
        if bad is not None or got[: len(src.header_names)] != src.header_names:
            shown = f"an unreadable line ({bad[0]})" if bad else (
                f"header {first[0]!r}" if first else "(empty file)")  # fmt: skip
            raise SourceError(
                f"{path} starts with {shown}; "
                f"expected {src.delim.join(src.header_names)!r}."
            )
    delim_name = {"\t": "tab", ",": "','", "|": "'|'", "::": "'::'"}.get(src.delim, repr(src.delim))
    cols = ", ".join(src.fields[c] for c in src.fields)
    con.execute(
        f"INSERT INTO {name} SELECT '{_q(path)}', _recsys_line, "
        f"CASE WHEN line IS NULL OR trim(line) = '' THEN 'empty line' "
        f"WHEN len(parts) <> {src.n_fields} THEN 'expected {src.n_fields} fields separated by "
        f"{_q(delim_name)}, found ' || len(parts) END, {cols} "
        f"FROM (SELECT _recsys_line, line, string_split(line, '{_q(src.delim)}') AS parts FROM _lines) "
        f"{'WHERE _recsys_line > 1' if src.header else ''}"
    )
    _insert_rejected_lines(con, src, path, name, max_line_bytes, skip_line=1 if src.header else 0)


def _stage_csv(con, src: TableSource, path: Path, name: str, max_line_bytes: int) -> None:
    # The header is read by us and the columns given to DuckDB: no sniffing, so a damaged
    # row (a truncated last line, a stray quote, a non-UTF-8 byte) is one rejected row, not
    # a failed read of the whole file.
    header = read_header(path, src.delim, src.encoding, max_line_bytes)
    columns = ", ".join(f"'{_q(c)}': 'VARCHAR'" for c in header)
    _fresh_rejects(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _csv AS SELECT * FROM read_csv('{_q(path)}', "
        f"columns = {{{columns}}}, header = true, delim = '{_q(src.delim)}', quote = '\"', "
        f"escape = '\"', {_read_options(src, max_line_bytes)})"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _csv_numbered AS SELECT * FROM {_numbered(con, '_csv', 1)}")
    _refuse_multiline_records(con, path, header)
    cols = ", ".join(src.fields[c] for c in src.fields)
    con.execute(f"INSERT INTO {name} SELECT '{_q(path)}', _recsys_line, NULL, {cols} FROM _csv_numbered")
    _insert_rejected_lines(con, src, path, name, max_line_bytes)


def _refuse_multiline_records(con, path: Path, header: list[str]) -> None:
    """A quoted field may not contain a line break. An unclosed quote otherwise makes DuckDB
    read every following line (up to the next quote, or the end of the file) into one field,
    and those rows would vanish behind one rejected record: a silently smaller table. No
    field of these tables holds a line break, so a record that spans lines is a fault, and
    refusing it keeps every line number exact."""
    quoted = ['"' + c.replace('"', '""') + '"' for c in header]
    newline_in = " OR ".join(f"contains({c}, chr(10))" for c in quoted)
    rejected = con.execute(
        "SELECT line, length(csv_line) - length(replace(csv_line, chr(10), '')) "
        "- CASE WHEN suffix(csv_line, chr(10)) THEN 1 ELSE 0 END FROM _rejects "
        "WHERE contains(csv_line, chr(10)) ORDER BY line LIMIT 1"
    ).fetchone()
    accepted = con.execute(
        f"SELECT _recsys_line FROM _csv_numbered WHERE {newline_in} ORDER BY 1 LIMIT 1"
    ).fetchone()
    starts = [r[0] for r in (rejected, accepted) if r]
    if not starts:
        return
    line = min(starts)
    extra = f" (the next {rejected[1]} lines)" if rejected and rejected[0] == line else ""
    raise SourceError(
        f"{path}: line {line} opens a quoted field that runs over its line break{extra}, so the "
        f"lines after it would be read as part of one field and lost. Fix the quoting on line "
        f"{line} (an unclosed quote?); fields may not contain line breaks."
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


def _load_entities(con, src: TableSource | None, table: str, id_col: str, max_line_bytes: int) -> None:
    """users/items: stage, validate ids, normalise features into raw.<table>__new."""
    new, rej = f"raw.{table}__new", f"raw.rejected_{table}__new"
    if src is None:
        return
    _stage(con, src, f"cand_{table}", max_line_bytes)
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
    kept = con.execute(f"SELECT count(*) FROM {new}").fetchone()[0]
    if kept == 0:
        # Every interaction would then be rejected as "not in the {table} table": say why here.
        n_rejected = con.execute(f"SELECT count(*) FROM {rej}").fetchone()[0]
        reasons = dict(
            con.execute(f"SELECT reason, count(*) FROM {rej} GROUP BY 1 ORDER BY 2 DESC LIMIT 5").fetchall()
        )
        raise SourceError(
            f"No row of the {table} file {[str(f) for f in src.files]} passed validation "
            f"({n_rejected} rejected: {reasons}). Fix or replace that file; the previous "
            "raw tables are kept."
        )


def _load_interactions(con, src: TableSource, has_users: bool, has_items: bool, max_line_bytes: int) -> None:
    _stage(con, src, "cand_interactions", max_line_bytes)
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


def ingest(con: duckdb.DuckDBPyConnection, plan: SourcePlan) -> IngestReport:
    """Validate ``plan`` into ``raw.*``; on any error the previous raw tables stay as they were.

    Raises:
        SourceError: the input cannot be used (the message names the file, and the line
            where one line is at fault).
        StorageError: the warehouse cannot be written (disk full, read-only, not permitted).
    """
    db_path = _database_path(con)
    kept = "The previous raw tables are kept (the swap is one transaction)."
    try:
        return _ingest(con, plan)
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


def _ingest(con: duckdb.DuckDBPyConnection, plan: SourcePlan) -> IngestReport:
    max_line_bytes = plan.max_line_bytes
    con.execute("CREATE SCHEMA IF NOT EXISTS raw")
    _drop_new(con)  # leftovers of a run that died half-way
    _load_entities(con, plan.users, "users", "user_id", max_line_bytes)
    _load_entities(con, plan.items, "items", "item_id", max_line_bytes)
    _load_interactions(
        con, plan.interactions, plan.users is not None, plan.items is not None, max_line_bytes
    )
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
    return IngestReport(layout=plan.layout, tables=reports, notes=list(plan.notes))
