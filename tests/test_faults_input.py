"""Corrupted inputs on the real ingest path (DuckDB files, the ``files`` and ``movielens``
sources, and once through Dagster): each gives a clear error naming the file (and the line
where one line is at fault) or a quarantined row in ``raw.rejected_*`` with its count, never
a deep stack error or silently fewer rows; a failed ingest keeps the previous raw tables.

What tests/test_ingest.py already covers is not repeated here (malformed MovieLens lines,
wrong header, unknown layout, missing file or column, a non-zip, the declared-size zip
guard, a failed ingest keeping the previous tables).
"""

from __future__ import annotations

import gzip
import random
import re
import struct
import zipfile
from pathlib import Path

import duckdb
import pytest
from movielens_fixtures import toy, write_ml1m, write_ml100k, zip_folder

from ingest.layouts import SourceError, files_plan, movielens_plan
from ingest.loader import connect, ingest
from ingest.plan import build_plan
from pipeline.settings import load_settings

HEADER = "user_id,item_id,rating,timestamp\n"


def _events(n_users: int = 6, n_items: int = 8) -> list[str]:
    """Good interaction rows: every user rates every item once."""
    return [
        f"{u},{i},{1 + (u + i) % 5},{1_600_000_000 + 100 * u + i}\n"
        for u in range(1, n_users + 1)
        for i in range(1, n_items + 1)
    ]


class Warehouse:
    """A real DuckDB warehouse holding a previous, good ingest."""

    def __init__(self, root: Path):
        self.path = root / "warehouse.duckdb"
        self.scratch = root / "scratch"
        data = toy(n_users=12, n_items=15, per_user=6, seed=7)
        good = write_ml1m(root / "previous-ml1m", data)
        con = connect(self.path)
        try:
            ingest(con, movielens_plan(good, self.scratch))
        finally:
            con.close()
        self.rows = len(data.ratings)
        assert self.count() == self.rows

    def count(self, table: str = "raw.interactions") -> int:
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            con.close()

    def ingest(self, plan):
        con = connect(self.path)
        try:
            return ingest(con, plan)
        finally:
            con.close()

    def rows_of(self, sql: str) -> list[tuple]:
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def assert_kept(self) -> None:
        """The failed ingest left the previous raw tables, and no half-built ``*__new`` table."""
        assert self.count() == self.rows
        leftovers = self.rows_of(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '%\\_\\_new' ESCAPE '\\'"
        )
        assert leftovers == []


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path / "home")


def _fail(warehouse: Warehouse, plan_fn, *match: str) -> str:
    """Plan + ingest must raise a SourceError whose message holds every ``match`` (regex),
    and leave the previous raw tables intact. Returns the message."""
    with pytest.raises(SourceError) as info:
        warehouse.ingest(plan_fn())
    message = str(info.value)
    for pattern in match:
        assert re.search(pattern, message), (pattern, message)
    assert "Traceback" not in message and len(message) < 1500, message
    warehouse.assert_kept()
    return message


# ------------------------------------------------------------------ truncated files


def test_truncated_csv_cut_mid_row_is_quarantined_with_its_line(warehouse, tmp_path):
    rows = _events()
    path = tmp_path / "events.csv"
    # The copy stopped mid-row: the last line has two of its four fields and no newline.
    path.write_text(HEADER + "".join(rows) + "7,3")

    report = warehouse.ingest(files_plan(path))

    assert report.interactions.rows == len(rows)
    assert report.interactions.rejected == 1
    last_line = len(rows) + 2  # header is line 1
    assert warehouse.rows_of("SELECT source_file, source_row, reason FROM raw.rejected_interactions") == [
        (str(path), last_line, "wrong number of fields (Expected Number of Columns: 4 Found: 2)")
    ]
    assert warehouse.count() == len(rows)


def test_short_row_mid_file_is_quarantined_and_later_lines_keep_their_numbers(warehouse, tmp_path):
    rows = _events()
    path = tmp_path / "events.csv"
    path.write_text(HEADER + "".join(rows[:10]) + "9,1\n" + "".join(rows[10:]))

    report = warehouse.ingest(files_plan(path))

    assert (report.interactions.rows, report.interactions.rejected) == (len(rows), 1)
    assert warehouse.rows_of("SELECT source_row, reason FROM raw.rejected_interactions") == [
        (12, "wrong number of fields (Expected Number of Columns: 4 Found: 2)")
    ]
    # The row after the bad line is line 13 of the file, not 12: DuckDB skipped line 12.
    u, i = rows[10].split(",")[:2]
    got = warehouse.rows_of(f"SELECT source_row FROM raw.interactions WHERE user_id = {u} AND item_id = {i}")
    assert got == [(13,)]
    assert warehouse.rows_of("SELECT max(source_row) FROM raw.interactions") == [(len(rows) + 2,)]


def test_unclosed_quote_mid_file_stops_instead_of_swallowing_the_rest(warehouse, tmp_path):
    """DuckDB reads everything after an unclosed quote as one field: 37 rows would vanish
    behind one rejected record. That is refused, naming the line."""
    rows = _events()
    path = tmp_path / "events.csv"
    path.write_text(HEADER + "".join(rows[:10]) + '9,1,4,"1600000000\n' + "".join(rows[10:]))

    _fail(
        warehouse,
        lambda: files_plan(path),
        rf"events\.csv: line 12 opens a quoted field that runs over its line break \(the next "
        rf"{len(rows) - 10} lines\)",
        "Fix the quoting on line 12",
    )


def test_quote_closed_lines_later_is_refused_too(warehouse, tmp_path):
    # The quote closes three lines on and the merged record has four fields: without the
    # check it would be one row (rejected for its timestamp) standing for four lines.
    rows = _events()
    path = tmp_path / "events.csv"
    path.write_text(HEADER + "".join(rows[:10]) + '9,1,4,"16\n' + "".join(rows[10:13]) + '1"\n'
                    + "".join(rows[13:]))  # fmt: skip

    _fail(warehouse, lambda: files_plan(path), r"events\.csv: line 12 opens a quoted field")


def test_truncated_gzip_csv_is_a_clear_error(warehouse, tmp_path):
    rng = random.Random(3)
    text = HEADER + "".join(
        f"{rng.randint(1, 500)},{rng.randint(1, 900)},{rng.randint(1, 5)},{1_600_000_000 + k}\n"
        for k in range(20_000)
    )
    blob = gzip.compress(text.encode())
    path = tmp_path / "events.csv.gz"
    path.write_bytes(blob[: len(blob) // 2])  # the download stopped half-way

    _fail(warehouse, lambda: files_plan(path), r"events\.csv\.gz is truncated or corrupt", "re-download")


def test_truncated_zip_is_a_clear_error(warehouse, tmp_path):
    archive = zip_folder(write_ml100k(tmp_path / "ml-100k", toy()), tmp_path / "ml-100k.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    _fail(
        warehouse,
        lambda: movielens_plan(archive, tmp_path / "scratch"),
        r"ml-100k\.zip is not a zip archive that can be read \(truncated or corrupt",
        "re-download",
    )


# ------------------------------------------------------------------ wrong delimiter


def test_semicolon_file_read_as_csv_names_the_delimiter(warehouse, tmp_path):
    path = tmp_path / "events.csv"
    path.write_text((HEADER + "".join(_events())).replace(",", ";"))

    _fail(
        warehouse,
        lambda: files_plan(path),
        r"events\.csv looks semicolon-separated, but \.csv files are read as comma-separated",
        r"Convert it to comma-separated \.csv",
        r"Columns found: \['user_id;item_id;rating;timestamp'\]",
    )


def test_tsv_named_csv_names_the_delimiter_and_renaming_fixes_it(warehouse, tmp_path):
    rows = _events()
    path = tmp_path / "events.csv"
    path.write_text((HEADER + "".join(rows)).replace(",", "\t"))

    _fail(warehouse, lambda: files_plan(path), r"events\.csv looks tab-separated", r"Name it \.tsv")

    # Following the message works: the same bytes named .tsv load completely.
    fixed = path.rename(tmp_path / "events.tsv")
    report = warehouse.ingest(files_plan(fixed))
    assert (report.interactions.rows, report.interactions.rejected) == (len(rows), 0)


def test_movielens_file_with_the_wrong_separator_stops_with_the_reason(warehouse, tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", toy(n_users=10, n_items=12, per_user=5))
    ratings = root / "ratings.dat"
    ratings.write_text(ratings.read_text().replace("::", ","))  # ',' where ml-1m has '::'

    _fail(
        warehouse,
        lambda: movielens_plan(root, tmp_path / "scratch"),
        r"No interaction in \[.*ratings\.dat'\] passed validation \(50 rejected",
        r"expected 4 fields separated by '::', found 1",
        "previous raw tables are kept",
    )


# ------------------------------------------------------------------ binary garbage


def test_binary_garbage_as_csv_is_a_clear_error(warehouse, tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(random.Random(0).randbytes(8192))

    _fail(warehouse, lambda: files_plan(path), r"events\.csv is a binary file, not utf-8 text")


def test_binary_garbage_after_good_rows_is_a_clear_error(warehouse, tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes((HEADER + "".join(_events())).encode() + random.Random(1).randbytes(4096))

    _fail(
        warehouse,
        lambda: files_plan(path),
        r"events\.csv is a binary file, not utf-8 text \(a NUL byte at offset \d+, line 5\d\)",
    )


def test_binary_garbage_as_parquet_is_a_clear_error(warehouse, tmp_path):
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1" + random.Random(2).randbytes(4096))

    _fail(warehouse, lambda: files_plan(path), r"events\.parquet cannot be read as parquet", "re-export")


def test_garbage_without_nul_bytes_in_movielens_ratings_lists_the_reasons(warehouse, tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", toy(n_users=10, n_items=12, per_user=5))
    rng = random.Random(4)
    # Random bytes but NUL, '\r' and '\n', in short lines: invalid UTF-8, \x01 bytes, wrong
    # field counts. Each line is quarantined with its reason, so the error lists them.
    alphabet = [b for b in range(1, 256) if b not in (10, 13)]
    (root / "ratings.dat").write_bytes(
        b"\n".join(bytes(rng.choice(alphabet) for _ in range(40)) for _ in range(200))
    )

    message = _fail(
        warehouse,
        lambda: movielens_plan(root, tmp_path / "scratch"),
        r"No interaction in \[.*ratings\.dat'\] passed validation \(200 rejected",
    )
    assert "not valid utf-8 text" in message or "contains a \\x01 control byte" in message, message


# ------------------------------------------------------------------ non-UTF-8 titles


def _side_files(folder: Path, rows: list[str], titles: list[bytes]) -> Path:
    folder.mkdir()
    (folder / "events.csv").write_text(HEADER + "".join(rows))
    lines = [f"{i},".encode() + title + b",Drama\n" for i, title in enumerate(titles, 1)]
    (folder / "items.csv").write_bytes(b"item_id,title,genres\n" + b"".join(lines))
    return folder


def test_latin1_title_in_utf8_items_is_quarantined_and_counted(warehouse, tmp_path):
    rows = _events(n_users=6, n_items=8)
    titles = [f"Film {i} (1999)".encode() for i in range(1, 9)]
    titles[3] = "Café (2001)".encode("latin-1")  # item 4: one Latin-1 byte in a UTF-8 file
    folder = _side_files(tmp_path / "drop", rows, titles)

    report = warehouse.ingest(files_plan(folder))

    items = report.tables["items"]
    assert (items.rows, items.rejected) == (7, 1)
    [(file, line, reason)] = warehouse.rows_of(
        "SELECT source_file, source_row, reason FROM raw.rejected_items"
    )
    assert (file, line) == (str(folder / "items.csv"), 5)
    assert reason.startswith("not valid utf-8 text") and "RECSYS_FILES_ENCODING" in reason
    # The item's 6 interactions are not silently lost: each is rejected, with the reason.
    assert report.interactions.rows == len(rows) - 6
    assert report.interactions.rejected_by_reason == {"item_id not in the items table": 6}
    assert report.interactions.rows + report.interactions.rejected == len(rows)


def test_latin1_items_file_loads_with_files_encoding_setting(warehouse, tmp_path):
    rows = _events(n_users=6, n_items=8)
    titles = [f"Film {i} (1999)".encode("latin-1") for i in range(1, 9)]
    titles[3] = "Café (2001)".encode("latin-1")
    folder = _side_files(tmp_path / "drop", rows, titles)
    settings = load_settings(
        {"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_SOURCE": "files", "RECSYS_DATA_PATH": str(folder),
         "RECSYS_FILES_ENCODING": "latin-1"}
    )  # fmt: skip

    report = warehouse.ingest(
        build_plan("files", settings.data_path, tmp_path / "scratch", encoding=settings.files_encoding)
    )

    assert (report.tables["items"].rows, report.tables["items"].rejected) == (8, 0)
    assert report.interactions.rows == len(rows)
    assert warehouse.rows_of("SELECT title, year FROM raw.items WHERE item_id = 4") == [("Café (2001)", 2001)]


# ------------------------------------------------------------------ zip bombs


def test_zip_bomb_is_refused_before_unpacking_with_the_fix(warehouse, tmp_path):
    root = write_ml100k(tmp_path / "ml-100k", toy())
    (root / "padding.bin").write_bytes(bytes(8 << 20))  # 8 MiB of zeros: deflates to ~8 KiB
    archive = zip_folder(root, tmp_path / "ml-100k.zip")
    assert archive.stat().st_size < 100_000  # small archive, large content: bomb-like
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MAX_UNPACK_BYTES": str(1 << 20)})
    scratch = tmp_path / "scratch"

    message = _fail(
        warehouse,
        lambda: build_plan("movielens", archive, scratch, max_unpack_bytes=settings.max_unpack_bytes),
        r"ml-100k\.zip \(\d+\.\d KiB\) would unpack to 8\.\d MiB in \d+ files",
        r"over the limit of 1\.0 MiB \(RECSYS_MAX_UNPACK_BYTES=1048576\); nothing was unpacked",
        r"raise RECSYS_MAX_UNPACK_BYTES, or unpack it yourself and point RECSYS_DATA_PATH at the folder",
    )
    assert not scratch.exists() or not any(scratch.rglob("*")), message


def _lie_about_size(archive: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size of ``member`` in its local and central headers."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    assert data[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, info.header_offset + 22, size)
    name = member.encode()
    central = data.find(b"PK\x01\x02")
    while central != -1:
        if data[central + 46 : central + 46 + len(name)] == name:
            struct.pack_into("<I", data, central + 24, size)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    assert central != -1
    archive.write_bytes(bytes(data))


def test_zip_whose_header_understates_its_size_is_refused_as_corrupt(warehouse, tmp_path):
    root = write_ml100k(tmp_path / "ml-100k", toy())
    archive = zip_folder(root, tmp_path / "ml-100k.zip")
    _lie_about_size(archive, "ml-100k/u.data", 100)  # says 100 bytes, holds ~12 KB

    _fail(
        warehouse,
        lambda: movielens_plan(archive, tmp_path / "scratch"),
        r"ml-100k\.zip is corrupt or truncated: member 'ml-100k/u\.data' cannot be unpacked",
        "re-download or re-copy the archive",
    )


# ------------------------------------------------------------------ over-long lines


@pytest.mark.parametrize("source", ["files", "movielens"])
def test_line_longer_than_the_limit_stops_the_ingest_naming_file_and_line(warehouse, tmp_path, source):
    """The "2 GB line" case, proven at 4 KiB instead of writing 2 GB to this machine's disk.

    The guard (``check_text_file``) streams the file in 16 MiB blocks and measures the gaps
    between newlines with numpy, so what it does with a line depends only on whether the line
    is longer than ``RECSYS_MAX_LINE_BYTES`` (default 1 MiB), never on how much longer: a
    2 GB line takes the same branch as this one, one byte over a 4 KiB limit, with memory
    bounded by the block size. The limit is read from the environment like a deployment
    sets it. DuckDB itself would hold a whole line in memory (about 2x its size), which is
    why the check runs before DuckDB reads the file.
    """
    limit = 4096
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MAX_LINE_BYTES": str(limit)})
    assert settings.max_line_bytes == limit
    rows = _events()
    if source == "files":
        path = tmp_path / "events.csv"
        lines = [HEADER, *rows[:20], "1,2,3," + "9" * (limit - 6 + 1) + "\n", *rows[20:]]
        line_no = 22
        path.write_text("".join(lines))
        assert len(lines[21]) - 1 == limit + 1
        target = path
    else:
        target = write_ml1m(tmp_path / "ml-1m", toy(n_users=10, n_items=12, per_user=5))
        path = target / "ratings.dat"
        good = path.read_text().splitlines(keepends=True)
        path.write_text("".join(good[:30]) + "1::2::3::" + "9" * (limit - 9 + 1) + "\n" + "".join(good[30:]))
        line_no = 31

    def plan():
        return build_plan(source, target, tmp_path / "scratch", max_line_bytes=settings.max_line_bytes)

    _fail(
        warehouse,
        plan,
        rf"{path.name}: line {line_no} is longer than 4\.0 KiB \(at least 4\.0 KiB; "
        r"RECSYS_MAX_LINE_BYTES=4096\)",
        r"Fix or replace the file, or raise RECSYS_MAX_LINE_BYTES",
    )


def test_line_at_the_limit_is_read_and_validated_as_a_row(warehouse, tmp_path):
    """The boundary: a line of exactly the limit is not a file fault; its row is validated
    (and quarantined here, its timestamp being 4090 digits)."""
    limit = 4096
    rows = _events()
    path = tmp_path / "events.csv"
    long_row = "1,2,3," + "9" * (limit - 6) + "\n"
    assert len(long_row) - 1 == limit
    path.write_text(HEADER + "".join(rows) + long_row)

    report = warehouse.ingest(files_plan(path, max_line_bytes=limit))

    assert (report.interactions.rows, report.interactions.rejected) == (len(rows), 1)
    assert report.interactions.rejected_by_reason == {
        "timestamp is missing or not unix seconds / ISO-8601": 1
    }


def test_carriage_return_inside_a_line_names_the_line(warehouse, tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", toy(n_users=10, n_items=12, per_user=5))
    path = root / "ratings.dat"
    lines = path.read_text().splitlines(keepends=True)
    lines[6] = lines[6].replace("::", "::\r", 1)  # DuckDB's parser stops on this, with no line number
    path.write_text("".join(lines))

    _fail(
        warehouse,
        lambda: movielens_plan(root, tmp_path / "scratch"),
        r"ratings\.dat: line 7 holds a carriage return \('\\r'\) that does not end the line",
    )


def test_file_without_line_breaks_is_caught_by_the_line_guard(warehouse, tmp_path):
    path = tmp_path / "events.csv"
    # Old Mac line endings: '\r' only, so the whole file is one line.
    path.write_text((HEADER + "".join(_events(20, 30))).replace("\n", "\r"))
    assert path.stat().st_size > 8192

    _fail(
        warehouse,
        lambda: files_plan(path, max_line_bytes=8192),
        r"events\.csv: the header line is longer than 8\.0 KiB \(RECSYS_MAX_LINE_BYTES=8192\)",
    )


# ------------------------------------------------------------------ through Dagster


@pytest.mark.slow
def test_raw_tables_asset_reports_quarantine_and_fails_cleanly(tmp_path, recsys_home, monkeypatch):
    """The Dagster asset: a truncated CSV materialises with its rejected count in the
    metadata; binary garbage fails the step with our one-paragraph message (a
    ``dagster.Failure``, not a DuckDB stack) and the raw tables of the previous run stay."""
    import dagster as dg

    from orchestration.assets.ingest import raw_tables
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("RECSYS_MIN_EVENTS", "10")
    rows = _events(n_users=30, n_items=20)
    truncated = tmp_path / "truncated.csv"
    truncated.write_text(HEADER + "".join(rows) + "7,3")
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(random.Random(5).randbytes(8192))

    def materialize(path: Path) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [raw_tables],
            resources={"warehouse": WarehouseResource()},
            run_config={"ops": {"raw_tables": {"config": {"source": "files", "data_path": str(path)}}}},
            raise_on_error=False,
        )

    first = materialize(truncated)
    mats = {m.asset_key.to_user_string(): m for m in first.get_asset_materialization_events()}
    meta = mats["raw_interactions"].materialization.metadata
    assert meta["dagster/row_count"].value == len(rows)
    assert meta["rejected_rows"].value == 1
    assert meta["rejected_by_reason"].value == {
        "wrong number of fields (Expected Number of Columns: 4 Found: 2)": 1
    }

    second = materialize(garbage)
    assert not second.success
    [failure] = [e for e in second.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert error.cls_name == "Failure"
    assert f"{garbage} is a binary file, not utf-8 text" in error.message
    assert "duckdb" not in "".join(error.stack or []).lower()

    con = duckdb.connect(str(recsys_home / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM raw.interactions").fetchone()[0] == len(rows)
    finally:
        con.close()
