"""Input files as the ingest finds them: names DuckDB would read as glob patterns, symbolic
links out of the data folder, and landing files that change between the sensor's tick and
the run's read (issue: harden it).

Each test names the item of the hardening review it covers. They call the planners and the
loader directly on tiny files, and the sensor through ``evaluate_tick``."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from movielens_fixtures import toy, write_ml100k

from ingest.guards import SourceError
from ingest.layouts import files_plan, movielens_plan
from ingest.loader import connect, ingest

HEADER = "user_id,item_id,rating,timestamp\n"


def _csv(path: Path, *rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def _land(tmp_path: Path, plan) -> duckdb.DuckDBPyConnection:
    con = connect(tmp_path / "w.duckdb")
    ingest(con, plan)
    return con


def _rows(con) -> list[tuple]:
    return con.execute(
        "SELECT user_id, item_id, source_file FROM raw.interactions ORDER BY user_id, item_id"
    ).fetchall()


def _old(path: Path, age: float = 60.0) -> None:
    then = time.time() - age
    os.utime(path, (then, then))


# --- 2. File names are read as file names, never as glob patterns ---------------------------
def test_a_file_named_star_csv_is_read_alone_not_with_its_neighbours(tmp_path):
    star = _csv(tmp_path / "in" / "*.csv", "1,10,4,1600000000")
    _csv(tmp_path / "in" / "neighbour.csv", "2,20,4,1600000000")

    con = _land(tmp_path, files_plan(star))

    assert _rows(con) == [(1, 10, str(star))]


def test_a_bracketed_parquet_name_loads_itself_not_the_file_it_would_match(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    frame = {"user_id": [1], "item_id": [10], "rating": [4.0], "timestamp": [1600000000]}
    pd.DataFrame(frame).to_parquet(folder / "[x].parquet")
    pd.DataFrame({**frame, "user_id": [2], "item_id": [20]}).to_parquet(folder / "x.parquet")

    con = _land(tmp_path, files_plan(folder / "[x].parquet"))

    assert _rows(con) == [(1, 10, str(folder / "[x].parquet"))]


def test_a_question_mark_member_of_a_folder_is_credited_only_its_own_rows(tmp_path):
    folder = tmp_path / "in"
    a = _csv(folder / "a.csv", "1,10,4,1600000000")
    q = _csv(folder / "?.csv", "2,20,4,1600000000")

    con = _land(tmp_path, files_plan(folder))

    assert _rows(con) == [(1, 10, str(a)), (2, 20, str(q))]
    assert con.execute("SELECT count(*) FROM raw.rejected_interactions").fetchone() == (0,)


@pytest.mark.parametrize("as_zip", [False, True])
def test_glob_characters_in_a_movielens_folder_name_do_not_widen_the_read(tmp_path, as_zip):
    data = toy()
    root = write_ml100k(tmp_path / "data" / "ml[1]", data)
    # What 'ml[1]' matches as a pattern: a folder with other users and items (no u.data, so
    # the layout is still found in 'ml[1]'). DuckDB reads a pattern that matches nothing as
    # the literal name, so only a twin like this one shows the difference.
    twin = write_ml100k(tmp_path / "data" / "ml1", toy(n_users=3, n_items=4, per_user=2))
    (twin / "u.data").unlink()
    path = root
    if as_zip:  # the archive's members 'ml[1]/...' and 'ml1/...' unpack side by side
        path = tmp_path / "ml.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for p in sorted((tmp_path / "data").rglob("*")):
                zf.write(p, p.relative_to(tmp_path / "data"))

    con = _land(tmp_path, movielens_plan(path, tmp_path / "scratch"))

    assert con.execute("SELECT count(*) FROM raw.users").fetchone() == (len(data.users),)
    assert con.execute("SELECT count(*) FROM raw.items").fetchone() == (len(data.items),)
    assert con.execute("SELECT count(*) FROM raw.interactions").fetchone() == (len(data.ratings),)


def test_a_read_that_matches_other_files_than_planned_is_refused(tmp_path, monkeypatch):
    """The count check behind the escaping: were a pattern ever to match more than the
    planned file, the ingest stops naming the file instead of crediting its neighbours."""
    import ingest.paths as paths

    star = _csv(tmp_path / "in" / "*.csv", "1,10,4,1600000000")
    _csv(tmp_path / "in" / "neighbour.csv", "2,20,4,1600000000")
    monkeypatch.setattr(paths, "duckdb_pattern", lambda path: str(path))

    with pytest.raises(SourceError, match=r"\*\.csv.*matches 2 files.*Rename it without"):
        _land(tmp_path, files_plan(star))


def test_parquet_rows_from_a_file_that_was_not_planned_are_refused(tmp_path, monkeypatch):
    """The check after a parquet read: the files the rows came from (DuckDB's ``filename``)
    must be planned ones, whatever the pattern did."""
    import ingest.staging as staging

    folder = tmp_path / "in"
    folder.mkdir()
    frame = {"user_id": [1], "item_id": [10], "rating": [4.0], "timestamp": [1600000000]}
    pd.DataFrame(frame).to_parquet(folder / "[x].parquet")
    pd.DataFrame(frame).to_parquet(folder / "x.parquet")
    plan = files_plan(folder / "[x].parquet")
    monkeypatch.setattr(staging, "read_pattern", lambda con, path: str(path))  # no escaping

    with pytest.raises(SourceError, match=r"took rows from .*/x\.parquet.*not among the planned"):
        _land(tmp_path, plan)


# --- 3. Symbolic links out of the data folder are refused, their content never echoed -------
SECRET = "root:$6$NOT-FOR-LOGS:19000:0:99999:7:::\n"


def _outside_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    return secret


def test_a_link_in_a_files_folder_to_a_file_outside_is_refused_without_echoing_it(tmp_path):
    secret = _outside_secret(tmp_path)
    folder = tmp_path / "in"
    _csv(folder / "events.csv", "1,10,4,1600000000")
    (folder / "more.csv").symlink_to(secret)

    with pytest.raises(SourceError) as info:
        files_plan(folder)

    message = str(info.value)
    assert str(folder / "more.csv") in message and str(secret) in message
    assert "outside" in message and "NOT-FOR-LOGS" not in message


def test_a_linked_movielens_folder_outside_the_data_path_is_refused(tmp_path):
    write_ml100k(tmp_path / "elsewhere" / "ml-100k", toy())
    data = tmp_path / "data"
    data.mkdir()
    (data / "ml-100k").symlink_to(tmp_path / "elsewhere" / "ml-100k", target_is_directory=True)

    with pytest.raises(SourceError, match=r"ml-100k.*symbolic link.*elsewhere.*outside"):
        movielens_plan(data, tmp_path / "scratch")


def test_a_link_that_stays_inside_the_data_folder_is_followed(tmp_path):
    folder = tmp_path / "in"
    real = _csv(folder / "archive" / "2026-11.csv", "1,10,4,1600000000")
    (folder / "events.csv").symlink_to(Path("archive") / "2026-11.csv")

    con = _land(tmp_path, files_plan(folder))

    assert [r[:2] for r in _rows(con)] == [(1, 10)]
    assert real.read_text().startswith(HEADER)


def test_the_landing_sensor_does_not_count_a_link_out_of_the_landing_folder(tmp_path):
    from orchestration.automation import landing_files

    secret = _outside_secret(tmp_path)
    landing = tmp_path / "landing"
    _old(_csv(landing / "events.csv", "1,10,4,1600000000"))
    (landing / "shadow.csv").symlink_to(secret)
    _old(secret)

    assert set(landing_files(landing)) == {"events.csv"}


# --- 9. The landing run reads the files the sensor settled on, unchanged --------------------
def test_a_files_folder_skips_dot_names_being_copied_in(tmp_path):
    folder = tmp_path / "in"
    events = _csv(folder / "events.csv", "1,10,4,1600000000")
    (folder / ".incoming.csv").write_text("user_id,item_id,rat")  # half copied

    plan = files_plan(folder)

    assert plan.interactions.files == (events,)


def _tick(tmp_path, monkeypatch):
    import dagster as dg

    from orchestration.automation import landing_sensor

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()) as ctx:
        return landing_sensor.evaluate_tick(ctx)


def test_the_landing_run_request_lists_the_settled_files_with_size_and_mtime(tmp_path, monkeypatch):
    landing = tmp_path / "home" / "landing"
    events = _csv(landing / "events.csv", "1,10,4,1600000000")
    _old(events)
    (landing / ".incoming.csv").write_text("user_id,item")
    _csv(landing / "still-copying.csv", "2,20,4,1600000000")

    (request,) = _tick(tmp_path, monkeypatch).run_requests

    config = request.run_config["ops"]["raw_tables"]["config"]
    stat = events.stat()
    assert config == {
        "source": "files",
        "data_path": str(landing),
        "files": [{"name": "events.csv", "size": stat.st_size, "mtime": stat.st_mtime}],
    }


def test_the_landing_run_config_is_accepted_by_the_raw_tables_op(tmp_path, monkeypatch):
    import dagster as dg

    from orchestration.assets.ingest import raw_tables
    from orchestration.resources import WarehouseResource

    landing = tmp_path / "home" / "landing"
    events = _csv(landing / "events.csv", "1,10,4,1600000000")
    _old(events)
    (request,) = _tick(tmp_path, monkeypatch).run_requests
    _csv(landing / "late.csv", "2,20,4,1600000000")  # arrived after the tick: not this run's

    # One row fails the contract's row-count bounds; what matters here is what was read.
    result = dg.materialize([raw_tables], resources={"warehouse": WarehouseResource()},
                            run_config=request.run_config, raise_on_error=False)  # fmt: skip

    mats = {m.asset_key.to_user_string(): m for m in result.asset_materializations_for_node("raw_tables")}
    assert mats["raw_interactions"].metadata["source_files"].value == [str(events)]


def _listed(*paths: Path) -> dict:
    from ingest.paths import FileStat

    return {p.name: FileStat.of(p) for p in paths}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_landing_ingest_reads_only_the_listed_files(tmp_path, suffix):
    folder = tmp_path / "landing"
    events = _csv(folder / "events.csv", "1,10,4,1600000000")
    if suffix == ".parquet":  # parquet is read lazily elsewhere; settled files are read once
        frame = {"user_id": [1], "item_id": [10], "rating": [4.0], "timestamp": [1600000000]}
        events.unlink()
        pd.DataFrame(frame).to_parquet(events := folder / "events.parquet")
        pd.DataFrame({**frame, "user_id": [2]}).to_parquet(folder / "late.parquet")
    _csv(folder / "late.csv", "2,20,4,1600000000")

    con = _land(tmp_path, files_plan(folder, settled=_listed(events)))

    assert _rows(con) == [(1, 10, str(events))]


@pytest.mark.parametrize("change", ["grown", "touched", "vanished"])
def test_a_listed_file_that_changed_since_the_tick_is_refused_for_the_next_tick(tmp_path, change):
    folder = tmp_path / "landing"
    events = _csv(folder / "events.csv", "1,10,4,1600000000")
    _old(events)
    listed = _listed(events)
    if change == "grown":  # a writer that keeps the mtime: the size still tells
        mtime_ns = events.stat().st_mtime_ns
        with events.open("a") as fh:
            fh.write("2,20,4,1600000000\n")
        os.utime(events, ns=(mtime_ns, mtime_ns))
    elif change == "touched":
        _old(events, age=30)
    else:
        events.unlink()

    with pytest.raises(SourceError, match=r"events\.csv.*(changed|vanished).*next .*tick"):
        files_plan(folder, settled=listed)


def test_a_listed_file_that_changes_while_it_is_read_is_not_accepted(tmp_path, monkeypatch):
    import ingest.staging as staging

    folder = tmp_path / "landing"
    events = _csv(folder / "events.csv", "1,10,4,1600000000")
    _old(events)
    plan = files_plan(folder, settled=_listed(events))
    con = connect(tmp_path / "w.duckdb")
    ingest(con, files_plan(_csv(tmp_path / "before.csv", "9,90,4,1600000000")))
    read = staging._stage_csv

    def read_while_a_writer_appends(*args, **kwargs):
        read(*args, **kwargs)
        with events.open("a") as fh:
            fh.write("2,20,4,1600000000\n")

    monkeypatch.setattr(staging, "_stage_csv", read_while_a_writer_appends)

    with pytest.raises(SourceError, match=r"events\.csv.*changed while .*read.*next .*tick"):
        ingest(con, plan)
    assert [r[:2] for r in _rows(con)] == [(9, 90)]  # the previous raw tables are kept


def test_a_settled_list_only_names_plain_files_of_the_landing_folder(tmp_path):
    folder = tmp_path / "landing"
    events = _csv(folder / "events.csv", "1,10,4,1600000000")
    outside = _csv(tmp_path / "other.csv", "1,10,4,1600000000")
    listed = {"../other.csv": _listed(outside)["other.csv"], "events.csv": _listed(events)["events.csv"]}

    with pytest.raises(SourceError, match=r"\.\./other\.csv.*not a file name"):
        files_plan(folder, settled=listed)
