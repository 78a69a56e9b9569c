"""Stage one raw table's files as a candidate relation in DuckDB: one row per line (or parquet
row) with its file and line number, and every line DuckDB cannot parse quarantined with its
reason instead of failing the read. Whole-file faults raise :class:`SourceError`.

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.io import StorageError, wrapped_storage_error
from ingest.guards import (
    MAX_UNPACKED_BYTES,
    SourceError,
    check_parquet_file,
    check_text_file,
    read_header,
    short_error,
)
from ingest.layouts import TableSource
from ingest.paths import check_read, check_unchanged, read_pattern


def _duckdb_storage_error(exc: BaseException, path: Path | str, kept: str) -> StorageError | None:
    """A :class:`StorageError` when ``exc`` is DuckDB failing to write (disk full, read-only,
    not permitted), else None."""
    return wrapped_storage_error(exc, path, kept)


def _q(value: object) -> str:
    return str(value).replace("'", "''")


# ----------------------------------------------------------------- staging candidates


def _stage(con: duckdb.DuckDBPyConnection, src: TableSource, name: str, max_line_bytes: int,
           max_unpack_bytes: int = MAX_UNPACKED_BYTES) -> None:  # fmt: skip
    """Create relation ``name`` with source_file, source_row, problem and one column per field."""
    fields = list(src.fields)
    if src.reader == "parquet":
        files = ", ".join(f"'{_q(read_pattern(con, f))}'" for f in src.files)
        _stage_parquet(con, src, name, files, max_unpack_bytes)
        read = con.execute(f"SELECT DISTINCT source_file FROM {name}").fetchall()
        check_read(src.files, (r[0] for r in read), src.table)
        for path, stat in src.settled.items():
            check_unchanged(path, stat, while_reading=True)
        return
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {name} (source_file VARCHAR, source_row BIGINT, "
        f"problem VARCHAR, {', '.join(f'{c} VARCHAR' for c in fields)})"
    )
    for path in src.files:
        # Whole-file faults first, in Python: DuckDB would buffer a 2 GB line whole.
        check_text_file(path, max_line_bytes, src.encoding, max_unpack_bytes)
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
        if path in src.settled:
            check_unchanged(path, src.settled[path], while_reading=True)


def _free_name(base: str, taken: set[str]) -> str:
    """``base``, with underscores added until no column in ``taken`` has the name (DuckDB's
    names ignore case)."""
    while base in {t.lower() for t in taken}:
        base += "_"
    return base


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _bare_column(expr: str) -> str | None:
    """The column name when the field expression ``expr`` is one quoted column, else None."""
    inner = expr[1:-1]
    if len(expr) > 1 and expr[0] == expr[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return None


def _arrow_field(schema: pa.Schema, column: str) -> pa.Field | None:
    """The field DuckDB reads as ``column`` (its names ignore case)."""
    return next((f for f in schema if f.name.lower() == column.lower()), None)


def _unix_seconds(values: pa.Array) -> pa.Array:
    """Parquet timestamps or dates as whole unix seconds (floored), computed from the stored
    integers: no unit conversion, so a value DuckDB cannot hold is still a number."""
    if pa.types.is_date32(values.type):
        return pc.multiply(values.cast(pa.int32()).cast(pa.int64()), 86_400)
    per_second = 1_000 if pa.types.is_date64(values.type) else _PER_SECOND[values.type.unit]
    raw = values.cast(pa.int64())
    if per_second == 1:
        return raw
    whole = pc.divide(raw, per_second)  # rounds toward zero; floor below
    return pc.subtract(whole, pc.cast(pc.greater(pc.multiply(whole, per_second), raw), pa.int64()))


def _check_timestamp_types(src: TableSource, timestamps: dict[str, str]) -> None:
    for path in src.files:
        schema = pq.ParquetFile(path).schema_arrow
        for column in timestamps.values():
            f = _arrow_field(schema, column)
            if f is not None and not (pa.types.is_timestamp(f.type) or pa.types.is_date(f.type)):
                raise SourceError(
                    f"{path}: column {f.name!r} holds {f.type}, but timestamps in the other "
                    f"{src.table} files; write it with the same type in every file."
                )


def _row_stream(files: tuple[Path, ...], timestamps: dict[str, str]) -> pa.RecordBatchReader:
    """For every row of ``files`` in order: ``_recsys_k`` (the file's index), ``_recsys_row``
    (1-based row in the file, from the footers: what DuckDB's ``file_row_number`` gives,
    without a column name a file may also use) and ``_recsys_ts_<field>`` for each field of
    ``timestamps`` (field -> parquet TIMESTAMP column) as unix seconds. DuckDB converts every
    TIMESTAMP to microseconds and fails the whole read on one value past year 294246; read
    here, that value is one row outside 1970..2100."""
    schema = pa.schema(
        [("_recsys_k", pa.int32()), ("_recsys_row", pa.int64())]
        + [(f"_recsys_ts_{c}", pa.int64()) for c in timestamps]
    )

    def batches():
        for k, path in enumerate(files):
            pf = pq.ParquetFile(path, coerce_int96_timestamp_unit="ms")
            fields = {c: _arrow_field(pf.schema_arrow, col) for c, col in timestamps.items()}
            present = {c: f.name for c, f in fields.items() if f is not None}
            parts = pf.iter_batches(1 << 16, columns=sorted(set(present.values()))) if present else None
            n, start = pf.metadata.num_rows, 0
            while start < n:
                part = next(parts, None) if parts else None
                if parts and part is None:
                    raise pa.ArrowInvalid(f"{path} holds fewer rows than its footer says")
                size = part.num_rows if part else min(1 << 20, n - start)
                rows = np.arange(start + 1, start + size + 1, dtype=np.int64)
                arrays = [pa.array(np.full(size, k, np.int32)), pa.array(rows)] + [
                    _unix_seconds(part.column(present[c])) if c in present else pa.nulls(size, pa.int64())
                    for c in timestamps
                ]
                yield pa.record_batch(arrays, schema=schema)
                start += size

    return pa.RecordBatchReader.from_batches(schema, batches())


def _stage_parquet(con, src: TableSource, name: str, files: str, max_unpack_bytes: int) -> None:
    """Table ``name`` from the parquet ``files`` (SQL list items): only the layout's fields
    are read, under their canonical names, so a file column called ``filename``, ``rowid``
    or ``file_row_number`` is never confused with the ones DuckDB adds. Row numbers, and the
    fields that are TIMESTAMP columns, come from :func:`_row_stream`, joined by position
    (both read the files in order)."""
    for path in src.files:
        check_parquet_file(path, max_unpack_bytes)
    scan = f"read_parquet([{files}], union_by_name = true"
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {scan})").fetchall()
        types = {r[0].lower(): r[1].upper() for r in described}
        fname = _free_name("_recsys_file", set(types))  # DuckDB's name for each file, as it read it
        timestamps = {
            c: col for c, expr in src.fields.items()
            if (col := _bare_column(expr)) and types.get(col.lower(), "").startswith("TIMESTAMP")
        }  # fmt: skip
        _check_timestamp_types(src, timestamps)
        read = "".join(f', {src.fields[c]} AS "{c}"' for c in src.fields if c not in timestamps)
        columns = ", ".join(
            f'r."_recsys_ts_{c}" AS "{c}"' if c in timestamps else f'p."{c}"' for c in src.fields
        )
        con.register("_recsys_rows", _row_stream(src.files, timestamps))
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT p.source_file, r._recsys_row AS "
                f"source_row, NULL::VARCHAR AS problem, {columns}, r._recsys_k "
                f'FROM (SELECT "{fname}" AS source_file{read} FROM {scan}, filename = \'{fname}\')) p '
                "POSITIONAL JOIN _recsys_rows r"
            )
        finally:
            con.unregister("_recsys_rows")
        # Both sides read whole files in order, so each file DuckDB read pairs with one index.
        pairs, files_read, indexes = con.execute(
            f"SELECT count(DISTINCT (source_file, _recsys_k)), count(DISTINCT source_file), "
            f"count(DISTINCT _recsys_k) FROM {name}"
        ).fetchone()
        con.execute(f"ALTER TABLE {name} DROP COLUMN _recsys_k")
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        about_input = any(str(f) in str(exc) for f in src.files)
        if _duckdb_storage_error(exc, "", "") is not None and not about_input:
            raise  # the warehouse's disk, not the input file: ingest() explains it
        raise SourceError(
            f"The {src.table} parquet files {[str(f) for f in src.files]} cannot be read "
            f"({short_error(exc)}); re-export the damaged file."
        ) from exc
    if not pairs == files_read == indexes:
        raise SourceError(
            f"The {src.table} parquet files {[str(f) for f in src.files]} were read in a different "
            "order by DuckDB and pyarrow, so row numbers cannot be given; report this with the files."
        )


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
        f"FROM read_csv('{_q(read_pattern(con, path))}', columns = {{'line': 'VARCHAR'}}, header = false, "
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
    # Only the layout's fields leave the read, under their canonical names, with whether the
    # record spans lines: a file column called rowid or _recsys_k cannot shadow ours below.
    fields = ", ".join(f'{src.fields[c]} AS "{c}"' for c in src.fields)
    spans = " OR ".join(f"""contains("{c.replace('"', '""')}", chr(10))""" for c in header)
    _fresh_rejects(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _csv AS SELECT {fields}, ({spans}) AS _recsys_spans "
        f"FROM read_csv('{_q(read_pattern(con, path))}', "
        f"columns = {{{columns}}}, header = true, delim = '{_q(src.delim)}', quote = '\"', "
        f"escape = '\"', {_read_options(src, max_line_bytes)})"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _csv_numbered AS SELECT * FROM {_numbered(con, '_csv', 1)}")
    _refuse_multiline_records(con, path)
    cols = ", ".join(f'"{c}"' for c in src.fields)
    con.execute(f"INSERT INTO {name} SELECT '{_q(path)}', _recsys_line, NULL, {cols} FROM _csv_numbered")
    _insert_rejected_lines(con, src, path, name, max_line_bytes)


def _refuse_multiline_records(con, path: Path) -> None:
    """A quoted field may not contain a line break. An unclosed quote otherwise makes DuckDB
    read every following line (up to the next quote, or the end of the file) into one field,
    and those rows would vanish behind one rejected record: a silently smaller table. No
    field of these tables holds a line break, so a record that spans lines is a fault, and
    refusing it keeps every line number exact."""
    rejected = con.execute(
        "SELECT line, length(csv_line) - length(replace(csv_line, chr(10), '')) "
        "- CASE WHEN suffix(csv_line, chr(10)) THEN 1 ELSE 0 END FROM _rejects "
        "WHERE contains(csv_line, chr(10)) ORDER BY line LIMIT 1"
    ).fetchone()
    accepted = con.execute(
        "SELECT _recsys_line FROM _csv_numbered WHERE _recsys_spans ORDER BY 1 LIMIT 1"
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
