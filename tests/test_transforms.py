"""A real `dbt build` (models, data tests, unit tests) against a real DuckDB file, for
each split, on MovieLens-layout input; and proof that the leakage tests can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from movielens_fixtures import toy, write_ml100k, write_ml_latest

from ingest.layouts import movielens_plan
from ingest.loader import connect, ingest
from pipeline.settings import DBT_PROJECT_DIR

DBT = str(Path(sys.executable).with_name("dbt"))


def _dbt(args: list[str], warehouse: Path, target: Path, dbt_vars: dict | None = None):
    env = dict(os.environ, RECSYS_WAREHOUSE=str(warehouse), DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    cmd = [DBT, *args, "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir",
           str(DBT_PROJECT_DIR), "--target-path", str(target), "--log-path", str(target)]  # fmt: skip
    if dbt_vars:
        cmd += ["--vars", json.dumps(dbt_vars)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _results(target: Path) -> dict[str, str]:
    data = json.loads((target / "run_results.json").read_text())
    return {r["unique_id"]: r["status"] for r in data["results"]}


@pytest.fixture(scope="module")
def ml100k_warehouse(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ml100k")
    root = write_ml100k(tmp / "ml-100k", toy(n_users=60, n_items=80, per_user=30))
    con = connect(tmp / "warehouse.duckdb")
    ingest(con, movielens_plan(root, tmp / "scratch"))
    con.close()
    return tmp / "warehouse.duckdb"


@pytest.mark.slow
@pytest.mark.parametrize("split", ["temporal", "leave_last_out", "stratified"])
def test_dbt_build_every_split(ml100k_warehouse, tmp_path, split):
    done = _dbt(["build"], ml100k_warehouse, tmp_path / "target", {"split": split})
    assert done.returncode == 0, done.stdout[-4000:]
    results = _results(tmp_path / "target")
    kinds = {uid.split(".")[0] for uid in results}
    assert {"model", "test", "unit_test"} <= kinds
    assert all(status in ("success", "pass") for status in results.values())

    con = duckdb.connect(str(ml100k_warehouse), read_only=True)
    try:
        # The build records the vars it used; downstream reads the split from here.
        assert con.execute("SELECT split, history_len FROM mart_build_info").fetchall() == [(split, 50)]
        # Independent of the dbt tests: recompute the leakage rules in Python.
        rows = con.execute(
            "SELECT r.user_id, r.ts, r.split, c.history_item_idx FROM fct_ratings r "
            "JOIN fct_ctr_samples c USING (event_id)"
        ).fetchall()
        item_of = dict(con.execute("SELECT item_idx, item_id FROM dim_items").fetchall())
        events = {}
        for user, ts, _, _ in rows:
            events.setdefault(user, []).append(ts)
        seen_at = {
            (u, i): t for u, i, t in con.execute("SELECT user_id, item_id, ts FROM fct_ratings").fetchall()
        }
        for user, ts, _, history in rows:
            for idx in history or []:
                assert seen_at[(user, item_of[idx])] < ts, "history holds the event or a later one"
        train_items = {
            r[0]
            for r in con.execute("SELECT DISTINCT item_id FROM fct_ratings WHERE split = 'train'").fetchall()
        }
        assert set(item_of.values()) == train_items, "item vocabulary must come from train rows only"
        assert sorted(item_of) == list(range(1, len(item_of) + 1)), "indices contiguous from 1"
        if split == "temporal":
            last_train, first_test = con.execute(
                "SELECT max(ts) FILTER (split = 'train'), min(ts) FILTER (split = 'test') FROM fct_ratings"
            ).fetchone()
            assert last_train <= first_test
        if split == "leave_last_out":
            per_user = con.execute(
                "SELECT user_id, max(ts) FILTER (split = 'test') = max(ts) FROM fct_ratings GROUP BY 1"
            ).fetchall()
            assert all(ok for _, ok in per_user)
        n_stats = con.execute("SELECT sum(n_ratings) FROM item_stats").fetchone()[0]
        n_train = con.execute("SELECT count(*) FROM fct_ratings WHERE split = 'train'").fetchone()[0]
        assert n_stats == n_train
    finally:
        con.close()


@pytest.mark.slow
def test_history_recompute_checks_picked_events_against_all_earlier_ones(ml100k_warehouse, tmp_path):
    """assert_history_matches_recompute recomputes at most var history_check_events_per_user
    events per sampled user, each against every earlier event of that user: with 3 picked of
    30, correct histories pass (they would not if only the picked events counted as earlier),
    and misordered histories fail at the default cap and at 3."""
    target = tmp_path / "target"
    assert _dbt(["build"], ml100k_warehouse, target).returncode == 0
    check = ["test", "--select", "assert_history_matches_recompute"]
    done = _dbt(check, ml100k_warehouse, target, {"history_check_events_per_user": 3})
    assert done.returncode == 0, done.stdout[-4000:]
    con = duckdb.connect(str(ml100k_warehouse))
    con.execute("UPDATE int_user_history SET history_item_idx = list_reverse(history_item_idx) "
                "WHERE history_len >= 2")  # fmt: skip
    con.close()
    for dbt_vars in (None, {"history_check_events_per_user": 3}):
        done = _dbt(check, ml100k_warehouse, target, dbt_vars)
        assert done.returncode != 0, done.stdout[-4000:]
        assert set(_results(target).values()) == {"fail"}
    done = _dbt(check, ml100k_warehouse, target, {"history_check_events_per_user": 0})
    assert done.returncode != 0 and "history_check_events_per_user must be an integer >= 1" in done.stdout


@pytest.mark.slow
def test_layout_without_user_table(tmp_path):
    root = write_ml_latest(tmp_path / "ml-latest-small", toy(half_stars=True))
    con = connect(tmp_path / "w.duckdb")
    ingest(con, movielens_plan(root, tmp_path / "scratch"))
    con.close()
    done = _dbt(["build"], tmp_path / "w.duckdb", tmp_path / "target", {"split": "leave_last_out"})
    assert done.returncode == 0, done.stdout[-4000:]
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    assert con.execute("SELECT max(gender_idx), max(age_idx) FROM dim_users").fetchone() == (0, 0)
    con.close()


@pytest.mark.slow
def test_leakage_test_fails_on_leaked_history(ml100k_warehouse, tmp_path):
    """The history test is not a test that cannot fail: plant a leak and watch it fail."""
    target = tmp_path / "target"
    assert _dbt(["build"], ml100k_warehouse, target).returncode == 0
    con = duckdb.connect(str(ml100k_warehouse))
    # Put each event's own item at the end of its history: the classic off-by-one leak.
    con.execute(
        "UPDATE int_user_history SET history_item_idx = list_append(coalesce(history_item_idx, []), "
        "item_idx), history_len = history_len + 1, history_max_ts = ts WHERE item_idx > 0"
    )
    con.close()
    done = _dbt(["test", "--select", "assert_history_strictly_before_event"], ml100k_warehouse, target)
    assert done.returncode != 0
    assert _results(target) == {next(iter(_results(target))): "fail"}
