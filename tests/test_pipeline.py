"""The Dagster graph for real: definitions load, every data asset materialises on small
synthetic data through a real dbt build on a real DuckDB file, contracts block downstream,
and the schedule and sensor evaluate."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import duckdb
import pandas as pd
import pytest

SMALL = {"RECSYS_SYNTH_USERS": "200", "RECSYS_SYNTH_ITEMS": "300", "RECSYS_SYNTH_EVENTS": "8000"}


@pytest.fixture
def small_synthetic(recsys_home, dagster_home, monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    return recsys_home


def _defs():
    from orchestration.definitions import defs

    return defs


def _run(instance, run_config=None, selection=None):
    job = _defs().resolve_job_def("refresh_all")
    return job.execute_in_process(
        instance=instance, run_config=run_config or {}, raise_on_error=False,
        asset_selection=selection,
    )  # fmt: skip


def test_definitions_load():
    defs = _defs()
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    expected = {"raw_interactions", "raw_users", "raw_items", "stg_interactions", "int_split",
                "int_user_history", "dim_users", "dim_items", "fct_ratings", "fct_ctr_samples",
                "user_stats", "item_stats"}  # fmt: skip
    assert expected <= keys
    groups = {repo.asset_graph.get(dg.AssetKey(k)).group_name for k in expected}
    assert {"ingest", "staging", "intermediate", "marts"} <= groups
    # dbt tests and the GX contracts are asset checks
    check_names = {(c.asset_key.to_user_string(), c.name) for c in repo.asset_graph.asset_check_keys}
    assert ("raw_interactions", "contract") in check_names
    assert ("fct_ctr_samples", "contract") in check_names
    assert any(a == "fct_ratings" and n.startswith("not_null") for a, n in check_names)
    for key in ("raw_interactions", "fct_ratings"):
        assert repo.asset_graph.get(dg.AssetKey(key)).code_version


DATA_GROUPS = {"ingest", "staging", "intermediate", "marts"}


def _data_assets():
    graph = _defs().get_repository_def().asset_graph
    return [k for k in graph.get_all_asset_keys() if graph.get(k).group_name in DATA_GROUPS]


@pytest.mark.slow
def test_end_to_end_materialisation(small_synthetic):
    """Every data asset (ingest, dbt, contracts); the model chain is test_models_pipeline.py."""
    instance = dg.DagsterInstance.get()
    result = _run(instance, selection=_data_assets())
    assert result.success, [e.message for e in result.all_events if e.is_failure]

    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    for key in ("raw_interactions", "dim_users", "dim_items", "fct_ratings", "fct_ctr_samples",
                "user_stats", "item_stats"):  # fmt: skip
        assert key in mats
    checks = result.get_asset_check_evaluations()
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in checks if not c.passed]
    assert failed == []
    assert {c.asset_key.to_user_string() for c in checks if c.check_name == "contract"} >= {
        "raw_interactions",
        "fct_ctr_samples",
        "dim_items",
    }

    con = duckdb.connect(str(small_synthetic / "warehouse.duckdb"), read_only=True)
    raw = con.execute("SELECT count(*) FROM raw.interactions").fetchone()[0]
    assert con.execute("SELECT count(*) FROM main.fct_ratings").fetchone()[0] == raw
    assert con.execute("SELECT count(*) FROM main.fct_ctr_samples").fetchone()[0] == raw
    splits = dict(con.execute("SELECT split, count(*) FROM main.fct_ratings GROUP BY 1").fetchall())
    assert set(splits) == {"train", "valid", "test"}
    assert abs(splits["test"] / raw - 0.1) < 0.02
    con.close()

    # the raw data version is the content fingerprint: a second ingest of the same seed matches
    record = instance.get_latest_data_version_record(dg.AssetKey("raw_interactions"))
    assert record is not None
    first_version = record.asset_materialization.tags["dagster/data_version"]
    again = _run(instance, selection=[dg.AssetKey(k) for k in ("raw_interactions", "raw_users",
                                                              "raw_items")])  # fmt: skip
    assert again.success
    record = instance.get_latest_data_version_record(dg.AssetKey("raw_interactions"))
    assert record.asset_materialization.tags["dagster/data_version"] == first_version


@pytest.mark.slow
def test_failed_contract_blocks_downstream(recsys_home, dagster_home, tmp_path):
    # Parses fine, but every rating is 1: the raw contract's rating distribution catches it.
    n = 400
    events = pd.DataFrame(
        {"user_id": [u % 40 + 1 for u in range(n)], "item_id": [i % 50 + 1 for i in range(n)],
         "rating": [1.0] * n, "timestamp": [1_600_000_000 + 60 * i for i in range(n)]}
    )  # fmt: skip
    path = tmp_path / "broken.csv"
    events.to_csv(path, index=False)
    instance = dg.DagsterInstance.get()
    result = _run(
        instance,
        run_config={"ops": {"raw_tables": {"config": {"source": "files", "data_path": str(path)}}}},
        selection=_data_assets(),
    )
    assert not result.success
    evaluations = {
        (c.asset_key.to_user_string(), c.check_name): c for c in result.get_asset_check_evaluations()
    }
    contract = evaluations[("raw_interactions", "contract")]
    assert not contract.passed
    failed = contract.metadata["failed"].value
    assert any(f["column"] == "rating" for f in failed), failed
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "raw_interactions" in mats
    assert not mats & {"stg_interactions", "int_split", "fct_ratings", "fct_ctr_samples"}
    assert not (recsys_home / "warehouse.duckdb").exists() or "main" not in {
        r[0]
        for r in duckdb.connect(str(recsys_home / "warehouse.duckdb"), read_only=True)
        .execute("SELECT DISTINCT schema_name FROM duckdb_tables()")
        .fetchall()
    }


def test_schedule_targets_whole_graph(recsys_home):
    defs = _defs()
    schedule = defs.resolve_schedule_def("nightly_refresh")
    assert schedule.cron_schedule == "0 2 * * *"
    ctx = dg.build_schedule_context(scheduled_execution_time=pd.Timestamp("2026-11-27T02:00Z"))
    requests = list(schedule.evaluate_tick(ctx).run_requests or [])
    assert len(requests) == 1
    job = defs.resolve_job_def(schedule.job_name)
    selected = job.asset_layer.selected_asset_keys
    assert dg.AssetKey("raw_interactions") in selected and dg.AssetKey("fct_ctr_samples") in selected


def test_landing_sensor(recsys_home):
    from orchestration.automation import SETTLE_SECONDS

    sensor = _defs().resolve_sensor_def("landing_sensor")
    landing = recsys_home / "landing"

    instance = dg.DagsterInstance.ephemeral()  # the sensor looks for landing runs in flight

    def tick(cursor=None):
        with dg.build_sensor_context(cursor=cursor, definitions=_defs(), instance=instance) as ctx:
            data = sensor.evaluate_tick(ctx)
        return data

    assert tick().skip_message and not tick().run_requests  # no folder yet
    landing.mkdir(parents=True)
    path = landing / "events-2026-11-26.csv"
    path.write_text("user_id,item_id,rating,timestamp\n1,2,4,1600000000\n")
    old = time.time() - SETTLE_SECONDS - 1
    (landing / ".partial.csv").write_text("ignored")
    fresh = landing / "still-copying.csv"
    fresh.write_text("x")
    os.utime(path, (old, old))

    first = tick()
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    config = request.run_config["ops"]["raw_tables"]["config"]
    stat = path.stat()
    settled = [{"name": path.name, "size": stat.st_size, "mtime": stat.st_mtime}]
    assert config == {"source": "files", "data_path": str(landing), "files": settled}
    assert "still-copying" not in request.tags["recsys/files"]
    assert json.loads(first.cursor).keys() == {path.name}

    assert not tick(first.cursor).run_requests  # nothing new
    path.write_text("user_id,item_id,rating,timestamp\n1,2,4,1600000000\n1,3,5,1600000100\n")
    os.utime(path, (old + 1, old + 1))
    assert len(tick(first.cursor).run_requests) == 1  # changed file
