"""The dbt project on Spark (RECSYS_WAREHOUSE=spark) builds the same marts as on DuckDB.

One small MovieLens-layout source, with same-second events inside a user (the history's tie
rule) and items seen only after the train period (index 0), lands once in DuckDB's raw.*
through the validating loader and is exported to parquet for Spark. For each split, dbt
builds every model on both engines and each table is compared: row counts, per-column
checksums of the integer, string and list columns, float columns within FLOAT_TOLERANCE,
and the split of every event. dbt's data and unit tests then run on Spark, the GX contracts
on the parquet marts Spark wrote, and a `recsys run` with RECSYS_WAREHOUSE=spark goes from
ingest to a blessed model through the real Dagster graph.

Spark runs in this process through dbt's Python entry point, so the three builds and the
tests share one Spark session (one JVM start); DuckDB builds run as `dbt` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from movielens_fixtures import Toy, toy, write_ml100k

from ingest.layouts import movielens_plan
from ingest.loader import connect, ingest
from pipeline.settings import DBT_PROJECT_DIR, SPLITS, load_settings
from pipeline.warehouse_spark import export_raw, parquet_connection

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parent.parent
DBT = str(Path(sys.executable).with_name("dbt"))
# Floats may differ in the last bits: Spark and DuckDB sum in different orders, and ln() comes
# from different maths libraries. Measured on this data: <= 8.9e-16 (a few ulps), most 0.
FLOAT_TOLERANCE = 1e-12
MODELS = ("int_split", "int_user_vocab", "int_item_vocab", "int_feature_vocab", "int_user_features",
          "int_item_features", "int_user_history", "int_dense_feature_stats", "dim_users", "dim_items",
          "fct_ratings", "fct_ctr_samples", "user_stats", "item_stats", "mart_build_info")  # fmt: skip
# The leakage and split rules, run on Spark after every split's build.
RULE_TESTS = ("assert_split_sizes_and_order", "assert_temporal_split_is_time_ordered",
              "assert_history_strictly_before_event", "assert_history_matches_recompute",
              "assert_indices_fitted_on_train")  # fmt: skip


def _with_ties(data: Toy) -> Toy:
    """Every fourth event of a user shares its second with the event before it."""
    ratings, last = [], {}
    for n, (user, item, rating, ts) in enumerate(data.ratings):
        if n % 4 == 3 and user in last:
            ts = last[user]
        last[user] = ts
        ratings.append((user, item, rating, ts))
    return Toy(data.users, data.items, ratings)


@pytest.fixture(scope="module")
def homes(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("parity")
    # 200 items for 1800 events: some items only appear after the temporal cut (item_idx 0)
    root = write_ml100k(tmp / "ml-100k", _with_ties(toy(n_users=60, n_items=200, per_user=30)))
    home = tmp / "home"
    con = connect(home / "warehouse.duckdb")
    try:
        ingest(con, movielens_plan(root, tmp / "scratch"))
        export_raw(con, load_settings({"RECSYS_HOME": str(home), "RECSYS_WAREHOUSE": "spark"}))
    finally:
        con.close()
    return {"tmp": tmp, "home": home}


@pytest.fixture(scope="module")
def spark_dbt(homes):
    """dbt on Spark inside this process: one Spark session for every invocation."""
    from dbt.cli.main import dbtRunner

    settings = load_settings({"RECSYS_HOME": str(homes["home"]), "RECSYS_WAREHOUSE": "spark"})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in settings.dbt_env().items():
            mp.setenv(name, value)
        mp.setenv("RECSYS_SPARK_SHUFFLE_PARTITIONS", "2")  # tiny data: fewer, cheaper tasks

        def invoke(args: list[str], split: str) -> None:
            target = homes["tmp"] / f"spark-target-{split}"
            paths = ["--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
                     "--target-path", str(target), "--log-path", str(target)]  # fmt: skip
            result = dbtRunner().invoke([*args, *paths, "--vars", json.dumps({"split": split}), "--quiet"])
            failed = [r.node.name for r in (result.result or []) if r.status not in ("success", "pass")]
            assert result.success and not failed, (
                f"dbt {args[0]} on Spark failed: {failed} {result.exception}"
            )

        yield invoke, settings
    _stop_spark()


def _stop_spark() -> None:
    """End the in-process Spark session and its JVM (it would otherwise live until pytest exits)."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    session = SparkSession._instantiatedSession
    if session is not None:
        session.stop()
    gateway = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:
            proc.stdin.close()  # the JVM exits when its stdin closes
            proc.wait(timeout=60)
        SparkContext._gateway = SparkContext._jvm = None


def _duckdb_build(homes: dict[str, Path], split: str) -> Path:
    warehouse = homes["tmp"] / f"duckdb-{split}.duckdb"
    shutil.copy(homes["home"] / "warehouse.duckdb", warehouse)
    target = homes["tmp"] / f"duckdb-target-{split}"
    env = dict(os.environ, RECSYS_WAREHOUSE=str(warehouse), DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    cmd = [DBT, "run", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
           "--target-path", str(target), "--log-path", str(target)]  # fmt: skip
    cmd += ["--vars", json.dumps({"split": split})]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    return warehouse


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE main.{table}").fetchall()}


def _checksums(con: duckdb.DuckDBPyConnection, table: str, columns: list[str]) -> dict[str, tuple]:
    """count and order-independent hash sum of each column (DuckDB's hash on both sides)."""
    sql = ", ".join(f"count({c}), coalesce(sum(hash({c})::HUGEINT), 0)" for c in columns)
    row = con.execute(f"SELECT count(*), {sql} FROM main.{table}").fetchall()[0]
    return {"rows": row[0], **{c: (row[1 + 2 * i], row[2 + 2 * i]) for i, c in enumerate(columns)}}


def _key(columns: dict[str, str]) -> list[str]:
    for keys in (["event_id"], ["user_idx"], ["item_idx"], ["user_id"], ["item_id"], ["feature", "value"]):
        if all(k in columns for k in keys):
            return keys
    return []  # one-row tables


def _float_gap(duck: duckdb.DuckDBPyConnection, spark_con: duckdb.DuckDBPyConnection, table: str,
               floats: list[str], key: list[str]) -> dict[str, float]:  # fmt: skip
    """Largest absolute difference of each float column, rows matched on ``key``."""
    query = f"SELECT {', '.join(key + floats)} FROM main.{table} ORDER BY {', '.join(key) or '1'}"
    left, right = duck.execute(query).fetchall(), spark_con.execute(query).fetchall()
    assert [r[: len(key)] for r in left] == [r[: len(key)] for r in right], f"{table}: keys differ"
    gaps = {}
    for i, column in enumerate(floats, start=len(key)):
        pairs = [(a[i], b[i]) for a, b in zip(left, right, strict=True)]
        assert all((a is None) == (b is None) for a, b in pairs), f"{table}.{column}: NULLs differ"
        gaps[column] = max((abs(a - b) for a, b in pairs if a is not None), default=0.0)
    return gaps


def compare(duck: duckdb.DuckDBPyConnection, spark_con: duckdb.DuckDBPyConnection, table: str) -> dict:
    columns = _columns(duck, table)
    assert _columns(spark_con, table) == columns, f"{table}: column names or types differ"
    floats = [c for c, t in columns.items() if t in ("DOUBLE", "FLOAT")]
    exact = [c for c in columns if c not in floats]  # integers, strings, integer lists
    left, right = _checksums(duck, table, exact), _checksums(spark_con, table, exact)
    assert left == right, f"{table}: {[c for c in left if left[c] != right[c]]} differ"
    gaps = _float_gap(duck, spark_con, table, floats, _key(columns)) if floats else {}
    assert all(g <= FLOAT_TOLERANCE for g in gaps.values()), f"{table}: float gaps {gaps}"
    return {"rows": left["rows"], "float_gaps": gaps}


@pytest.mark.parametrize("split", SPLITS)
def test_every_model_matches_duckdb(homes, spark_dbt, split):
    invoke, settings = spark_dbt
    invoke(["run"], split)
    invoke(["test", "--select", *RULE_TESTS], split)  # leakage and split rules hold on Spark
    warehouse = _duckdb_build(homes, split)
    duck = duckdb.connect(str(warehouse), read_only=True)
    spark_con = parquet_connection(settings)
    try:
        report = {table: compare(duck, spark_con, table) for table in MODELS}
        # the split itself, event by event (the stratified one orders by md5 on both engines)
        query = "SELECT event_id, user_id, item_id, ts, split FROM main.int_split ORDER BY event_id"
        assert duck.execute(query).fetchall() == spark_con.execute(query).fetchall()
        histories = "SELECT event_id, history_item_idx FROM main.fct_ctr_samples ORDER BY event_id"
        assert duck.execute(histories).fetchall() == spark_con.execute(histories).fetchall()
        assert spark_con.execute("SELECT split FROM main.mart_build_info").fetchall() == [(split,)]
    finally:
        duck.close()
        spark_con.close()
    print(f"\n{split}: " + json.dumps(report, sort_keys=True))
    n_events = report["int_split"]["rows"]
    assert n_events > 1000 and report["fct_ctr_samples"]["rows"] == n_events


def test_dbt_tests_and_unit_tests_pass_on_spark(homes, spark_dbt):
    invoke, _ = spark_dbt
    invoke(["build"], "stratified")  # every model, data test and unit test, on Spark


def test_contracts_pass_on_the_spark_marts(homes, spark_dbt):
    from data_contracts import run_suite
    from orchestration.assets.contracts import MARTS, contract_parameters
    from pipeline.snapshot import read_build_info

    invoke, settings = spark_dbt
    invoke(["run"], "temporal")
    con = parquet_connection(settings)
    try:
        parameters = contract_parameters(settings, read_build_info(con))
        results = {mart: run_suite(con, mart, parameters=parameters) for mart in MARTS}
    finally:
        con.close()
    failed = {mart: [o.expectation for o in r.failed()] for mart, r in results.items() if not r.success}
    assert not failed, failed
    assert all(r.n_rows > 0 for r in results.values())


def test_recsys_run_on_spark_reaches_a_blessed_model(tmp_path):
    """Ingest -> dbt on Spark -> contracts -> snapshot -> train -> ONNX -> evaluate -> registry,
    through the Dagster graph that `recsys run` launches."""
    import dagster as dg

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_"))}
    env.update(RECSYS_HOME=str(home), RECSYS_WAREHOUSE="spark", RECSYS_FAMILIES="wals",
               RECSYS_SYNTH_USERS="100", RECSYS_SYNTH_ITEMS="400", RECSYS_SYNTH_EVENTS="5000",
               RECSYS_SPARK_SHUFFLE_PARTITIONS="2", DBT_SEND_ANONYMOUS_USAGE_STATS="false",
               GX_ANALYTICS_ENABLED="false")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "run", "--select", "*registry_wals"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert (home / "registry" / "wals" / "CURRENT").is_file(), "wals was not blessed"
    assert (home / "spark" / "tables" / "fct_ratings").is_dir() and (home / "spark" / "metastore_db").is_dir()
    for stray in ("metastore_db", "spark-warehouse", "derby.log"):
        assert not (REPO / stray).exists() and not (REPO / "transforms" / stray).exists(), stray
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        for key in ("fct_ratings", "training_snapshot"):
            record = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert record is not None, key
            assert record.asset_materialization.metadata["warehouse"].value == "spark", key
