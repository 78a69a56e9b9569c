"""Hostile or odd input on the ingest readers: column names DuckDB gives a meaning to, zips
that are encrypted or hold thousands of members, compressed files that unpack far past the
limit, and timestamps DuckDB's cast would accept or refuse for the whole file. Each is either
a row in ``raw.rejected_*`` with its reason or a :class:`SourceError` naming the file and
what to do, never a raw DuckDB or zipfile error.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from movielens_fixtures import toy, write_ml100k, zip_folder

from ingest.guards import unpack_zip
from ingest.layouts import SourceError, files_plan, movielens_plan
from ingest.loader import connect, ingest
from ingest.plan import build_plan
from pipeline.raw import land
from pipeline.settings import load_settings

EVENTS = {
    "user_id": [1, 2, 3],
    "item_id": [10, 20, 30],
    "rating": [4.0, 3.5, 5.0],
    "timestamp": [1_600_000_000, 1_600_000_100, 1_600_000_200],
}


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _ingest(tmp_path: Path, plan, **limits):
    con = connect(tmp_path / "warehouse.duckdb")
    try:
        return ingest(con, plan, **limits), con
    except BaseException:
        con.close()
        raise


# ------------------------------------------------------------------ column names DuckDB uses


ODD_NAMES = [
    ("rowid", "csv"), ("rowid", "parquet"), ("_recsys_k", "csv"), ("_recsys_k", "parquet"),
    ("filename", "parquet"), ("file_row_number", "parquet"), ("_recsys_line", "csv"),
]  # fmt: skip


@pytest.mark.parametrize("odd,fmt", ODD_NAMES)
def test_an_extra_column_with_a_name_duckdb_uses_is_harmless(tmp_path, odd, fmt):
    df = pd.DataFrame({**EVENTS, odd: ["x", "y", "z"]})
    path = _write(df, tmp_path / f"events.{fmt}")

    report, con = _ingest(tmp_path, files_plan(path))

    assert (report.interactions.rows, report.interactions.rejected) == (3, 0)
    got = con.execute("SELECT user_id, item_id, ts, source_file, source_row FROM raw.interactions ORDER BY 1")
    first_row = 2 if fmt == "csv" else 1  # the csv header is line 1
    assert got.fetchall() == [
        (u, i, t, str(path), first_row + k)
        for k, (u, i, t) in enumerate(zip(EVENTS["user_id"], EVENTS["item_id"], EVENTS["timestamp"]))
    ]
    con.close()


@pytest.mark.parametrize("odd,fmt", ODD_NAMES)
def test_a_mapped_column_with_a_name_duckdb_uses_is_read(tmp_path, odd, fmt):
    df = pd.DataFrame(EVENTS).rename(columns={"user_id": odd})
    path = _write(df, tmp_path / f"events.{fmt}")

    report, con = _ingest(tmp_path, files_plan(path, {"user_id": odd}))

    assert (report.interactions.rows, report.interactions.rejected) == (3, 0)
    assert con.execute("SELECT user_id FROM raw.interactions ORDER BY 1").fetchall() == [(1,), (2,), (3,)]
    con.close()


def test_odd_names_in_several_parquet_files_keep_each_file_and_row(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    a = _write(pd.DataFrame({**EVENTS, "filename": ["x"] * 3}), folder / "a.parquet")
    b = pd.DataFrame({k: v[:2] for k, v in EVENTS.items()}).assign(item_id=[40, 50])
    b = _write(b.assign(file_row_number=[7, 8]), folder / "b.parquet")

    report, con = _ingest(tmp_path, files_plan(folder))

    assert report.interactions.rows == 5
    got = con.execute("SELECT item_id, source_file, source_row FROM raw.interactions ORDER BY 1").fetchall()
    assert got == [(10, str(a), 1), (20, str(a), 2), (30, str(a), 3), (40, str(b), 1), (50, str(b), 2)]
    con.close()


# ------------------------------------------------------------------ zips


def _encrypt_flag(archive: Path, member: str) -> None:
    """Mark ``member`` encrypted (general-purpose flag bit 0) in its local and central
    headers: what zipfile sees of a password-protected member, without a zip tool."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    data[info.header_offset + 6] |= 0x1
    name = member.encode()
    central = data.find(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name:
        central = data.find(b"PK\x01\x02", central + 4)
    data[central + 8] |= 0x1
    archive.write_bytes(bytes(data))


def test_an_encrypted_member_is_refused_naming_archive_and_member(tmp_path):
    archive = zip_folder(write_ml100k(tmp_path / "ml-100k", toy()), tmp_path / "ml-100k.zip")
    _encrypt_flag(archive, "ml-100k/u.data")

    with pytest.raises(SourceError) as info:
        movielens_plan(archive, tmp_path / "scratch")

    message = str(info.value)
    assert "ml-100k.zip" in message and "'ml-100k/u.data' is encrypted" in message, message
    assert "Decrypt it first" in message, message


def _many_members(archive: Path, n: int) -> Path:
    root = write_ml100k(archive.parent / "ml-100k", toy(n_users=5, n_items=6, per_user=3))
    zip_folder(root, archive)
    with zipfile.ZipFile(archive, "a") as zf:
        for k in range(n):
            zf.writestr(f"ml-100k/empty/{k}.txt", b"")
    return archive


def test_a_zip_of_twenty_thousand_empty_members_is_refused_before_unpacking(tmp_path):
    archive = _many_members(tmp_path / "many.zip", 20_000)
    dest = tmp_path / "out"

    with pytest.raises(
        SourceError,
        match=r"many\.zip holds 200\d\d members, over the limit of 10000 "
        r"\(RECSYS_MAX_ZIP_MEMBERS=10000\); nothing was unpacked",
    ):
        unpack_zip(archive, dest)
    assert not dest.exists()


def test_the_member_limit_is_read_from_the_environment(tmp_path):
    archive = _many_members(tmp_path / "many.zip", 20)
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MAX_ZIP_MEMBERS": "10"})
    assert settings.max_zip_members == 10
    assert load_settings({"RECSYS_HOME": str(tmp_path / "home")}).max_zip_members == 10_000

    with pytest.raises(SourceError, match=r"RECSYS_MAX_ZIP_MEMBERS=10\)"):
        build_plan("movielens", archive, tmp_path / "scratch", max_zip_members=settings.max_zip_members)


def test_only_the_files_the_layout_reads_are_unpacked(tmp_path):
    archive = _many_members(tmp_path / "ml.zip", 3)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("ml-100k/u.data.bak", b"old")
        zf.writestr("ml-100k/deeper/u.data", b"not read")
        zf.writestr("__MACOSX/ml-100k/._u.data", b"resource fork")
    scratch = tmp_path / "scratch"

    plan = movielens_plan(archive, scratch)

    unpacked = sorted(str(p.relative_to(scratch / "unzipped")) for p in scratch.rglob("*") if p.is_file())
    assert unpacked == ["ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user"]
    assert plan.layout == "ml-100k"


def test_a_zip_without_any_movielens_file_names_the_archive(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("holiday/1.jpg", b"\xff\xd8")

    with pytest.raises(SourceError, match=r"photos\.zip holds none of the files .*'u\.data'.*holiday/1\.jpg"):
        movielens_plan(archive, tmp_path / "scratch")


# ------------------------------------------------------------------ compressed inputs, rejected rows


def _land(tmp_path: Path, path: Path, **env: str):
    """The pipeline's own path: settings from the environment, then plan and ingest."""
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), **env})
    con = connect(tmp_path / "warehouse.duckdb")
    try:
        return land(con, settings, "files", path, None, tmp_path / "scratch", log=lambda _: None), con
    except BaseException:
        con.close()
        raise


def test_a_csv_gz_that_unpacks_past_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "events.csv.gz"
    path.write_bytes(gzip.compress(b"user_id,item_id,rating,timestamp\n" + b"x,y,z,w\n" * 250_000))
    assert path.stat().st_size < 20_000  # 2 MB of rows in a few KB

    with pytest.raises(SourceError) as info:
        _land(tmp_path, path, RECSYS_MAX_UNPACK_BYTES="1000")

    message = str(info.value)
    assert "events.csv.gz unpacks past the limit of 1000 bytes (RECSYS_MAX_UNPACK_BYTES=1000)" in message
    assert "raise RECSYS_MAX_UNPACK_BYTES" in message, message


def test_a_csv_gz_within_the_limit_is_read(tmp_path):
    path = tmp_path / "events.csv.gz"
    path.write_bytes(gzip.compress(pd.DataFrame(EVENTS).to_csv(index=False).encode()))

    landed, con = _land(tmp_path, path, RECSYS_MAX_UNPACK_BYTES="1000")

    assert landed.report.interactions.rows == 3
    con.close()


def test_a_parquet_file_whose_columns_unpack_past_the_limit_is_refused(tmp_path):
    # Plain-encoded constants that zstd packs to almost nothing: 1.6 MB per column unpacked.
    n = 200_000
    table = pa.table({"user_id": [1] * n, "item_id": [2] * n, "rating": [4.0] * n, "timestamp": [0] * n})
    path = tmp_path / "events.parquet"
    pq.write_table(table, path, use_dictionary=False, compression="zstd")
    assert path.stat().st_size < 200_000  # 6.4 MB of column data

    with pytest.raises(
        SourceError,
        match=r"events\.parquet unpacks to \d+\.\d MiB .*over the limit of "
        r"1\.0 MiB \(RECSYS_MAX_UNPACK_BYTES=1048576\)",
    ):
        _land(tmp_path, path, RECSYS_MAX_UNPACK_BYTES=str(1 << 20))


def _bad_rows(path: Path, n_rating: int, n_user: int) -> Path:
    good = pd.DataFrame(EVENTS)
    bad_rating = pd.DataFrame({"user_id": 5, "item_id": range(100, 100 + n_rating), "rating": 9.0,
                               "timestamp": 1_600_000_000})  # fmt: skip
    bad_user = pd.DataFrame({"user_id": "?", "item_id": range(n_user), "rating": 3.0,
                             "timestamp": 1_600_000_000})  # fmt: skip
    pd.concat([good, bad_rating, bad_user]).to_csv(path, index=False)
    return path


def test_rejected_rows_keep_the_first_n_per_reason_and_exact_counts(tmp_path):
    path = _bad_rows(tmp_path / "events.csv", n_rating=50, n_user=30)

    landed, con = _land(tmp_path, path, RECSYS_MAX_REJECTED_ROWS_PER_REASON="10")

    report = landed.report.interactions
    assert report.rows == 3
    assert report.rejected == 80
    assert report.rejected_by_reason == {"rating outside 0.5..5": 50,
                                         "user_id is missing or not a non-negative integer": 30}  # fmt: skip
    kept = con.execute(
        "SELECT reason, count(*), min(source_row), max(source_row), min(reason_rows), max(reason_rows) "
        "FROM raw.rejected_interactions GROUP BY reason ORDER BY reason"
    ).fetchall()
    assert kept == [("rating outside 0.5..5", 10, 5, 14, 50, 50),
                    ("user_id is missing or not a non-negative integer", 10, 55, 64, 30, 30)]  # fmt: skip
    con.close()


def test_the_rejected_row_cap_defaults_to_a_thousand(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    assert settings.max_rejected_per_reason == 1000
    path = _bad_rows(tmp_path / "events.csv", n_rating=1005, n_user=2)

    report, con = _ingest(tmp_path, files_plan(path))

    assert report.interactions.rejected_by_reason["rating outside 0.5..5"] == 1005
    assert con.execute("SELECT count(*) FROM raw.rejected_interactions").fetchone() == (1002,)
    con.close()


def test_a_side_table_with_no_usable_row_reports_exact_counts_past_the_cap(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    _write(pd.DataFrame(EVENTS), folder / "events.csv")
    _write(pd.DataFrame({"user_id": ["?"] * 25, "gender": "M"}), folder / "users.csv")

    with pytest.raises(
        SourceError,
        match=r"No row of the users file .* passed validation \(25 rejected: "
        r"\{'user_id is missing or not a non-negative integer': 25\}\)",
    ):
        _ingest(tmp_path, files_plan(folder), max_rejected_per_reason=3)


# ------------------------------------------------------------------ timestamps

NOT_A_TIME = "timestamp is missing or not unix seconds / ISO-8601"
NOT_A_DATE = "timestamp has the ISO-8601 form but is not a valid date or time"
OUT_OF_RANGE = "timestamp outside 1970..2100 (expected unix seconds)"

TIMESTAMPS = [  # text as written -> unix seconds, or the reason it is rejected
    ("1609495200", 1609495200),
    ("2021-01-01", 1609459200),
    ("2021-01-01T10:00:00Z", 1609495200),
    ("2021-01-01 10:00:00", 1609495200),
    ("2021-01-01T10:00", 1609495200),
    ("2021-01-01T12:00:00.987654321+02:00", 1609495200),
    ("2021-01-01T05:30:00-0430", 1609495200),
    ("epoch", NOT_A_TIME),
    ("infinity", NOT_A_TIME),
    ("-infinity", NOT_A_TIME),
    ("now", NOT_A_TIME),
    ("today", NOT_A_TIME),
    ("tomorrow", NOT_A_TIME),
    ("allballs", NOT_A_TIME),
    ("1609495200.5", NOT_A_TIME),
    ("2021-01-01T10:00:00 Europe/Paris", NOT_A_TIME),
    ("20210101", 20210101),  # digits are unix seconds: 1970-08-23, as the range allows
    ("2021-02-30", NOT_A_DATE),
    ("2021-13-01T00:00:00Z", NOT_A_DATE),
    ("2021-01-01T10:61:00Z", NOT_A_DATE),
    ("2021-01-01T10:00:00+25:00", NOT_A_DATE),
    ("1969-12-31T23:59:59.5Z", OUT_OF_RANGE),
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_only_unix_seconds_and_strict_iso_8601_are_timestamps(tmp_path, fmt):
    n = len(TIMESTAMPS)
    df = pd.DataFrame({"user_id": range(1, n + 1), "item_id": 1, "rating": 4.0,
                       "timestamp": [text for text, _ in TIMESTAMPS]})  # fmt: skip
    path = _write(df, tmp_path / f"events.{fmt}")

    report, con = _ingest(tmp_path, files_plan(path))

    first = 2 if fmt == "csv" else 1
    accepted = dict(con.execute("SELECT source_row, ts FROM raw.interactions").fetchall())
    rejected = dict(con.execute("SELECT source_row, reason FROM raw.rejected_interactions").fetchall())
    got = [(text, accepted.get(first + k, rejected.get(first + k))) for k, (text, _) in enumerate(TIMESTAMPS)]
    assert got == TIMESTAMPS
    assert report.interactions.rows + report.interactions.rejected == n
    con.close()


def test_iso_times_without_an_offset_are_utc_whatever_the_session_time_zone(tmp_path):
    path = _write(pd.DataFrame({**EVENTS, "timestamp": ["2021-01-01 10:00:00"] * 3}), tmp_path / "e.csv")
    con = connect(tmp_path / "warehouse.duckdb")
    con.execute("SET TimeZone = 'America/New_York'")

    ingest(con, files_plan(path))

    assert con.execute("SELECT DISTINCT ts FROM raw.interactions").fetchall() == [(1609495200,)]
    con.close()


def test_a_parquet_timestamp_out_of_range_is_one_rejected_row(tmp_path):
    seconds = [1_600_000_000, 10**13, -1, 1_600_000_001]  # 10**13 s overflows DuckDB's microseconds
    table = pa.table({
        "user_id": [1, 2, 3, 4], "item_id": [1, 1, 1, 1], "rating": [4.0] * 4,
        "timestamp": pa.array(seconds, pa.timestamp("s")),  # pyarrow writes it as milliseconds
    })  # fmt: skip
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)

    report, con = _ingest(tmp_path, files_plan(path))

    assert con.execute("SELECT source_row, ts FROM raw.interactions ORDER BY 1").fetchall() == [
        (1, 1_600_000_000), (4, 1_600_000_001)
    ]  # fmt: skip
    rejected = con.execute("SELECT source_row, ts, reason FROM raw.rejected_interactions ORDER BY 1")
    assert rejected.fetchall() == [
        (2, str(10**13), OUT_OF_RANGE), (3, "-1", OUT_OF_RANGE)
    ]  # fmt: skip
    assert report.interactions.rejected_by_reason == {OUT_OF_RANGE: 2}
    con.close()


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_parquet_timestamps_of_every_unit_and_zone_become_unix_seconds(tmp_path, unit):
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    raw = [1_600_000_000 * per_second, 1_600_000_001 * per_second + per_second // 2]  # .5 s floors
    folder = tmp_path / "drop"
    folder.mkdir()
    for k, tz in enumerate([None, "Europe/Paris"]):
        table = pa.table({"user_id": [k * 2 + 1, k * 2 + 2], "item_id": [1, 1], "rating": [4.0, 4.0],
                          "timestamp": pa.array(raw, pa.timestamp(unit, tz=tz))})  # fmt: skip
        pq.write_table(table, folder / f"part-{k}.parquet")

    report, con = _ingest(tmp_path, files_plan(folder))

    assert report.interactions.rejected == 0
    assert con.execute("SELECT user_id, ts FROM raw.interactions ORDER BY 1").fetchall() == [
        (1, 1_600_000_000), (2, 1_600_000_001), (3, 1_600_000_000), (4, 1_600_000_001)
    ]  # fmt: skip
    con.close()
