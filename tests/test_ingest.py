"""Ingest of every source and MovieLens layout, and of each kind of bad input.

These call the plain-Python readers on a real DuckDB file; the Dagster path is covered by
test_pipeline.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from movielens_fixtures import toy, write_ml1m, write_ml100k, write_ml_latest, zip_folder

from ingest.layouts import SourceError, files_plan, movielens_plan
from ingest.loader import connect, ingest


def _tree_digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _ingest(tmp_path: Path, plan, db: str = "w.duckdb"):
    con = connect(tmp_path / db)
    try:
        return ingest(con, plan), con
    except BaseException:
        con.close()
        raise


@pytest.mark.parametrize(
    "writer,layout,has_users",
    [
        (write_ml100k, "ml-100k", True),
        (write_ml1m, "ml-1m", True),
        (lambda root, data: write_ml1m(root, data, with_users=False), "ml-10m", False),
        (write_ml_latest, "ml-latest", False),
    ],
)
@pytest.mark.parametrize("as_zip", [False, True])
def test_movielens_layouts(tmp_path, writer, layout, has_users, as_zip):
    data = toy(half_stars=layout == "ml-latest")
    root = writer(tmp_path / "ml-data" / "ml-x", data)
    path = zip_folder(root, tmp_path / "ml-x.zip") if as_zip else tmp_path / "ml-data"
    before = _tree_digest(path)

    report, con = _ingest(tmp_path, movielens_plan(path, tmp_path / "scratch"))

    assert report.layout == layout
    assert report.interactions.rows == len(data.ratings)
    assert report.interactions.rejected == 0
    assert report.tables["items"].rows == len(data.items)
    assert report.tables["users"].rows == len(data.users)
    assert report.tables["users"].derived is (not has_users)
    got = con.execute(
        "SELECT user_id, item_id, rating, ts FROM raw.interactions ORDER BY user_id, ts"
    ).fetchall()
    assert got == sorted(data.ratings, key=lambda r: (r[0], r[3]))
    # genres and year come from the item file, whatever its encoding
    title, year, genres = con.execute(
        "SELECT title, year, genres FROM raw.items WHERE item_id = 3"
    ).fetchone()
    _, _, want_year, want_genres = data.items[2]
    assert "Café" in title and year == want_year
    assert set(genres.split("|")) == set(want_genres)
    if layout == "ml-latest":  # "(no genres listed)" means no genres
        assert con.execute("SELECT genres FROM raw.items WHERE item_id = 11").fetchone() == (None,)
    demo = con.execute("SELECT count(gender), count(age) FROM raw.users").fetchone()
    assert demo == ((len(data.users), len(data.users)) if has_users else (0, 0))
    assert _tree_digest(path) == before, "ingest must never modify its input"
    con.close()


def test_fingerprint_is_content_not_location(tmp_path):
    data = toy()
    a = write_ml1m(tmp_path / "a", data)
    b = write_ml1m(tmp_path / "b" / "elsewhere", data)
    ra, ca = _ingest(tmp_path, movielens_plan(a, tmp_path / "s"), "a.duckdb")
    rb, cb = _ingest(tmp_path, movielens_plan(b, tmp_path / "s"), "b.duckdb")
    assert ra.interactions.fingerprint == rb.interactions.fingerprint
    other = toy(seed=1)
    c = write_ml1m(tmp_path / "c", other)
    rc, cc = _ingest(tmp_path, movielens_plan(c, tmp_path / "s"), "c.duckdb")
    assert rc.interactions.fingerprint != ra.interactions.fingerprint
    for con in (ca, cb, cc):
        con.close()


def test_unknown_layout_names_path_and_expected_files(tmp_path):
    folder = tmp_path / "not-movielens"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"not-movielens.*u\.data.*ratings\.dat.*ratings\.csv"):
        movielens_plan(folder, tmp_path / "scratch")


def test_missing_file_names_it(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k", toy())
    (root / "u.item").unlink()
    with pytest.raises(SourceError, match=r"u\.item is missing.*ml-100k"):
        movielens_plan(root, tmp_path / "scratch")


def test_not_a_zip(tmp_path):
    bogus = tmp_path / "ml-100k.zip"
    bogus.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(SourceError, match="not a zip"):
        movielens_plan(bogus, tmp_path / "scratch")


def test_wrong_header_names_file(tmp_path):
    root = write_ml_latest(tmp_path / "ml", toy())
    text = (root / "ratings.csv").read_text().replace("userId,movieId", "user,movie", 1)
    (root / "ratings.csv").write_text(text)
    with pytest.raises(SourceError, match=r"ratings\.csv.*header.*userId,movieId,rating,timestamp"):
        _ingest(tmp_path, movielens_plan(root, tmp_path / "scratch"))


def test_malformed_rows_are_rejected_with_reasons(tmp_path):
    data = toy(n_users=10, n_items=20, per_user=5)
    root = write_ml100k(tmp_path / "ml-100k", data)
    good = (root / "u.data").read_text()
    u, i, r, t = data.ratings[0]
    bad_lines = [
        f"abc\t{i}\t4\t{t}",  # non-numeric user
        f"{u}\t{i}\t7\t{t + 1}",  # rating out of range
        f"{u}\t{i}\t4\t",  # missing timestamp
        f"{u}\t{i}\t{int(r)}\t{t}",  # exact duplicate of the first row
        f"999\t{i}\t4\t{t}",  # user not in u.user
        f"{u}\t999\t4\t{t}",  # item not in u.item
        f"{u}\t{i}",  # too few fields
        "",  # empty line
        f"{u}\t{i}\t4\t1700000000000",  # milliseconds, not seconds
    ]
    (root / "u.data").write_text(good + "\n".join(bad_lines) + "\n")
    before = _tree_digest(root)

    report, con = _ingest(tmp_path, movielens_plan(root, tmp_path / "scratch"))

    assert report.interactions.rows == len(data.ratings)
    assert report.interactions.rejected == len(bad_lines)
    rejected = con.execute(
        "SELECT source_row, reason FROM raw.rejected_interactions ORDER BY source_row"
    ).fetchall()
    first_bad = len(data.ratings) + 1
    assert [row for row, _ in rejected] == list(range(first_bad, first_bad + len(bad_lines)))
    reasons = [reason for _, reason in rejected]
    for expected, got in zip(
        [
            "user_id is missing or not",
            "rating outside 0.5..5",
            "timestamp is missing",
            "duplicate of an earlier row",
            "user_id not in the users table",
            "item_id not in the items table",
            "expected 4 fields separated by tab, found 2",
            "empty line",
            "timestamp outside 1970..2100",
        ],
        reasons,
    ):
        assert expected in got
    assert sum(report.interactions.rejected_by_reason.values()) == len(bad_lines)
    assert _tree_digest(root) == before
    con.close()


def test_failed_ingest_keeps_previous_raw_tables(tmp_path):
    data = toy()
    good = write_ml1m(tmp_path / "good", data)
    report, con = _ingest(tmp_path, movielens_plan(good, tmp_path / "s"))
    con.close()
    broken = write_ml1m(tmp_path / "broken", toy(seed=3))
    (broken / "ratings.dat").write_text("not::a::rating::row\n" * 5)
    con = connect(tmp_path / "w.duckdb")
    with pytest.raises(SourceError, match="No interaction.*passed validation.*previous raw tables"):
        ingest(con, movielens_plan(broken, tmp_path / "s"))
    assert con.execute("SELECT count(*) FROM raw.interactions").fetchone()[0] == len(data.ratings)
    leftovers = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '%__new'"
    ).fetchall()
    assert leftovers == []
    con.close()


def test_files_source_csv_with_column_map(tmp_path):
    df = pd.DataFrame(
        {
            "uid": [1, 1, 2, 2, 3],
            "sku": [10, 11, 10, 12, 11],
            "stars": [4.5, 3, 5, 1, 2],
            "when": ["2021-01-01T10:00:00Z", "2021-01-02 10:00:00", "1609500000", "1609600000",
                     "yesterday"],
        }
    )  # fmt: skip
    path = tmp_path / "events.csv"
    df.to_csv(path, index=False)
    mapping = {"user_id": "uid", "item_id": "sku", "rating": "stars", "timestamp": "when"}
    report, con = _ingest(tmp_path, files_plan(path, mapping))
    assert report.interactions.rows == 4
    assert report.interactions.rejected_by_reason == {
        "timestamp is missing or not unix seconds / ISO-8601": 1
    }
    ts = con.execute("SELECT ts FROM raw.interactions WHERE user_id = 1 ORDER BY ts").fetchall()
    assert ts == [(1609495200,), (1609581600,)]
    assert con.execute("SELECT source_row FROM raw.rejected_interactions").fetchall() == [(6,)]
    con.close()


def test_files_source_folder_with_parquet_side_tables(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    pd.DataFrame(
        {"user_id": [1, 2, 2], "item_id": [5, 5, 6], "rating": [4.0, 2.0, 5.0],
         "timestamp": [1_600_000_000, 1_600_000_100, 1_600_000_200]}
    ).to_parquet(folder / "part-1.parquet")  # fmt: skip
    pd.DataFrame({"user_id": [3], "item_id": [6], "rating": [3.0], "timestamp": [1_600_000_300]}).to_parquet(
        folder / "part-2.parquet"
    )
    pd.DataFrame({"user_id": [1, 2, 3], "gender": ["m", "F", "x"], "age": [25, None, 40]}).to_parquet(
        folder / "users.parquet"
    )
    pd.DataFrame({"item_id": [5, 6], "title": ["A (1999)", "B"], "genres": ["Drama", None]}).to_parquet(
        folder / "items.parquet"
    )
    report, con = _ingest(tmp_path, files_plan(folder))
    assert report.interactions.rows == 4
    assert con.execute("SELECT user_id, gender, age FROM raw.users ORDER BY 1").fetchall() == [
        (1, "M", 25), (2, "F", None), (3, None, 40)
    ]  # fmt: skip
    assert con.execute("SELECT item_id, year FROM raw.items ORDER BY 1").fetchall() == [
        (5, 1999), (6, None)
    ]  # fmt: skip
    con.close()


def test_files_source_missing_column_names_file_and_fix(tmp_path):
    path = tmp_path / "events.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2], "score": [3.0], "timestamp": [1]}).to_csv(path, index=False)
    with pytest.raises(SourceError, match=r"events\.csv has no rating.*Columns found.*RECSYS_COLUMN_MAP"):
        files_plan(path)


def test_zip_bomb_guard(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k", toy())
    archive = zip_folder(root, tmp_path / "ml.zip")
    from ingest.layouts import unpack_zip

    with pytest.raises(SourceError, match="would unpack to"):
        unpack_zip(archive, tmp_path / "out", max_bytes=1000)


def test_warehouse_is_real_duckdb_file(tmp_path):
    report, con = _ingest(tmp_path, movielens_plan(write_ml100k(tmp_path / "m", toy()), tmp_path))
    con.close()
    ro = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    names = {r[0] for r in ro.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'raw'"
    ).fetchall()}  # fmt: skip
    assert names == {"interactions", "users", "items", "rejected_interactions", "rejected_users",
                     "rejected_items"}  # fmt: skip
    ro.close()
