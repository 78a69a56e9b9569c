"""Operating the pipeline for real: a Dagster daemon and webserver against a temporary
DAGSTER_HOME, the schedule and the landing sensor ticking, runs queueing, cheap re-runs on
unchanged data, and a training run killed midway.

One story drives the daemon tests (real processes, each in its own session, always stopped):

1. ``nightly_refresh`` ticks for real. The test sets ``RECSYS_REFRESH_CRON="* * * * *"`` (read
   by orchestration/automation.py when the code location loads), so the daemon's scheduler
   launches a run at the next minute boundary exactly as it would at 02:00: a real tick of
   the real schedule, without a fake clock. The schedule is then stopped through the
   webserver's GraphQL API (the UI's toggle), so no second tick queues behind.
2. While that run works, a csv lands in ``$RECSYS_HOME/landing`` (copied under a dot-name,
   then renamed, as the README asks); ``landing_sensor`` requests a run, which waits in the
   run queue (``concurrency.runs.max_concurrent_runs: 1`` in the generated dagster.yaml).
3. As soon as the sensor's run starts, a manual run of ``refresh_all`` on the same landing
   data is launched through GraphQL (the UI's Launchpad): it queues behind, then re-runs on
   unchanged data and reuses the checkpoint, the ONNX export and the metrics.

Everything asserted about the story is read back through the webserver's GraphQL API (what
the UI shows) before the processes stop; the files on disk are checked afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from dagster_processes import dagster_env, start_dagster_daemon, start_dagster_webserver

from export.registry import REQUIRED_FILES, current_version
from orchestration.cli import DAGSTER_YAML
from pipeline.reuse import StepCache, model_key_parts, reuse_key, snapshot_key

REPO = Path(__file__).resolve().parent.parent
MODULE = "orchestration.definitions"
SIZES = {
    "RECSYS_FAMILIES": "wals",
    # small, but enough that WALS beats the popularity baseline and is blessed
    "RECSYS_SYNTH_USERS": "300",
    "RECSYS_SYNTH_ITEMS": "400",
    "RECSYS_SYNTH_EVENTS": "20000",
    # The scheduled run (synthetic data) and the landing data are different data sets; the
    # regression gate between them is not what these tests are about.
    "RECSYS_BLESS_TOLERANCE": "0.4",
    "RECSYS_MAX_CONCURRENT": "1",
}
CLEARED = ("RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_COLUMN_MAP", "RECSYS_SPLIT", "RECSYS_MODEL_CONFIG",
           "RECSYS_REFRESH_CRON")  # fmt: skip
MARTS = ("fct_ratings", "fct_ctr_samples", "dim_users", "dim_items", "user_stats", "item_stats")
DONE = {"SUCCESS", "FAILURE", "CANCELED"}
# The webserver answers slowly while a run uses both cores; a launch validates the run config
# through the code server first.
GRAPHQL_TIMEOUT = 120

RUNS_QUERY = """
query Runs($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId status creationTime startTime endTime jobName tags { key value } } }
  ... on PythonError { message } } }
"""
MATERIALIZATIONS_QUERY = """
query Mats($key: AssetKeyInput!) { assetOrError(assetKey: $key) { __typename
  ... on Asset { assetMaterializations(limit: 50) { runId timestamp tags { key value }
    metadataEntries { label __typename
      ... on BoolMetadataEntry { boolValue } ... on TextMetadataEntry { text }
      ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
      ... on PathMetadataEntry { path } ... on JsonMetadataEntry { jsonString } } } } } }
"""
REPOSITORY_QUERY = (
    "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
)
SCHEDULE_QUERY = """
query S($selector: ScheduleSelector!) { scheduleOrError(scheduleSelector: $selector) { __typename
  ... on Schedule { id scheduleState { id status } } ... on PythonError { message } } }
"""
STOP_SCHEDULE = """
mutation Stop($id: String) { stopRunningSchedule(id: $id) { __typename
  ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }
"""
LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId status } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }
"""


# -- fast checks of the reuse key --------------------------------------------------------------


def test_reuse_key_changes_with_data_config_code_and_upstream():
    base = {"family": "wals", "code_version": "c1", "config": {"dim": 32}, "snapshot": "s1",
            "upstream": {}}  # fmt: skip
    key = reuse_key("model", model_key_parts(**base))
    assert key == reuse_key("model", model_key_parts(**base)), "the key must be deterministic"
    for change in ({"code_version": "c2"}, {"config": {"dim": 64}}, {"snapshot": "s2"},
                   {"upstream": {"model_wals": "/a/run2/model"}}):  # fmt: skip
        assert reuse_key("model", model_key_parts(**{**base, **change})) != key, change
    assert reuse_key("onnx", model_key_parts(**base)) != key, "stages must not share keys"


def test_snapshot_key_ignores_float_noise_but_not_inputs(tmp_path):
    meta = {"fingerprint": "aaaa", "upstream": {"raw_interactions": "r1", "fct_ratings": "m1"},
            "dbt_manifest_sha256": "d1", "split": "temporal", "history_len": 50,
            "split_rows": {"train": 80, "valid": 10, "test": 10}, "n_users": 11, "n_items": 21}  # fmt: skip
    keys = []
    for name, change in (("a", {}), ("b", {"fingerprint": "bbbb"}), ("c", {"split_rows": {"train": 81}}),
                         ("d", {"upstream": {"raw_interactions": "r2", "fct_ratings": "m1"}})):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({**meta, **change}))
        keys.append(snapshot_key(str(tmp_path / name)))
    assert keys[0] == keys[1], "a rebuild of the same inputs (float noise in the marts) is the same snapshot"
    assert len({keys[0], keys[2], keys[3]}) == 3, "other rows or other raw data are another snapshot"


def test_step_cache_ignores_a_pointer_to_an_incomplete_folder(tmp_path):
    warnings = []

    class Log:
        def warning(self, message):
            warnings.append(message)

    cache = StepCache(tmp_path / "artifacts", "wals", "model", ("model.pt", "config.json"))
    folder = tmp_path / "artifacts" / "wals" / "run1" / "model"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    cache.record("k1", folder, "run1")
    assert cache.lookup("k1", Log()) is None, "config.json is missing: the checkpoint is not complete"
    assert "config.json" in warnings[-1]
    (folder / "config.json").write_text("{}")
    assert cache.lookup("k1", Log())["run_id"] == "run1"
    assert cache.lookup("k2", Log()) is None


# -- helpers -----------------------------------------------------------------------------------


def _poll(check, timeout: float, what: str, context=lambda: "", interval: float = 1.0):
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:.0f} s (last: {last!r})\n{context()}")


def _runs(web, tags: dict[str, str] | None = None) -> list[dict]:
    variables = {"filter": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}}
    data = web.graphql(RUNS_QUERY, variables, timeout=GRAPHQL_TIMEOUT)["runsOrError"]
    assert data["__typename"] == "Runs", data
    for run in data["results"]:
        run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
    return data["results"]


def _materializations(web, asset: str) -> list[dict]:
    data = web.graphql(MATERIALIZATIONS_QUERY, {"key": {"path": [asset]}}, timeout=GRAPHQL_TIMEOUT)[
        "assetOrError"
    ]
    if data["__typename"] != "Asset":
        return []
    result = []
    for mat in data["assetMaterializations"]:
        meta = {}
        for entry in mat["metadataEntries"]:
            value = next((entry[k] for k in ("boolValue", "text", "intValue", "floatValue", "path",
                                             "jsonString") if k in entry), None)  # fmt: skip
            meta[entry["label"]] = value
        result.append({"run_id": mat["runId"], "tags": {t["key"]: t["value"] for t in mat["tags"]},
                       "metadata": meta})  # fmt: skip
    return result


def _landing_csv(folder: Path) -> tuple[Path, int]:
    """New interactions from another seed of the embedded generator, as a user's csv file."""
    from ingest.synthetic import SyntheticConfig, generate

    scratch = folder.parent / "generated_landing"
    out = generate(SyntheticConfig(n_users=300, n_items=400, n_events=20000, seed=7), scratch)
    frame = pd.concat([pd.read_parquet(p) for p in out.interactions], ignore_index=True)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / ".ratings.csv.part"  # hidden while it is copied: the sensor skips it
    frame[["user_id", "item_id", "rating", "timestamp"]].to_csv(partial, index=False)
    final = folder / "ratings.csv"
    partial.rename(final)
    return final, len(frame)


def _registry_whole(registry: Path) -> None:
    """No leftover temp folder or file, and every CURRENT names a complete version folder."""
    leftovers = [str(p) for p in registry.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == [], f"half-written files in the registry: {leftovers}"
    for family_dir in (p for p in registry.iterdir() if p.is_dir()):
        version = current_version(family_dir.name, registry)
        assert version is not None, f"{family_dir} has version folders but no CURRENT"
        missing = [f for f in REQUIRED_FILES if not (family_dir / version / f).is_file()]
        assert missing == [], f"{family_dir / version} lacks {missing}"
    index = json.loads((registry / "index.json").read_text())
    for family, entry in index["families"].items():
        assert entry["version"] == current_version(family, registry), f"index.json disagrees on {family}"


def _warehouse_whole(home: Path, instance: dg.DagsterInstance) -> dict[str, int]:
    """The DuckDB file opens, and every raw table and mart holds the rows its latest
    materialisation recorded (nothing half-written, nothing lost)."""
    counts = {}
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        for asset, relation in [("raw_interactions", "raw.interactions"), ("raw_users", "raw.users"),
                                ("raw_items", "raw.items"), *[(m, f"main.{m}") for m in MARTS]]:  # fmt: skip
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None, f"{asset} was never materialised"
            expected = event.asset_materialization.metadata["dagster/row_count"].value
            counts[asset] = con.execute(f"SELECT count(*) FROM {relation}").fetchone()[0]
            assert counts[asset] == expected, (
                f"{relation}: {counts[asset]} rows, its materialisation said {expected}"
            )
    finally:
        con.close()
    return counts


# -- the daemon story --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("operate").resolve()
    home, dagster_home = root / "recsys_home", root / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)  # what `recsys run/ui` generate
    (home / "landing").mkdir(parents=True)
    env = {**SIZES, "RECSYS_REFRESH_CRON": "* * * * *"}
    with pytest.MonkeyPatch.context() as mp:
        for var in CLEARED:
            mp.delenv(var, raising=False)
        # Create the instance's sqlite storage once: a webserver and a daemon starting together
        # on an empty DAGSTER_HOME race to create it ("alembic_version has more than one head").
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.get_runs(limit=1)
            instance.all_instigator_state()
        web = daemon = None
        try:
            web = start_dagster_webserver(
                home, dagster_home, env=env, log_path=root / "webserver.log", wait=False
            )
            daemon = start_dagster_daemon(
                home, dagster_home, env=env, log_path=root / "daemon.log", wait=False
            )
            web.wait_ready(timeout=240)
            daemon.wait_ready(timeout=240)
            facts = _drive(web, daemon, home)
        finally:
            for process in (daemon, web):
                if process is not None:
                    process.stop()
        yield {"home": home, "dagster_home": dagster_home, **facts}


def _drive(web, daemon, home: Path) -> dict:
    def logs() -> str:
        return f"daemon log:\n{daemon.log_tail(4000)}"

    repo = web.graphql(REPOSITORY_QUERY, timeout=GRAPHQL_TIMEOUT)["repositoriesOrError"]["nodes"][0]
    selector = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"]}

    # 1. a real tick of the real schedule (every minute here), then the UI's toggle turns it off
    schedule_run = _poll(lambda: _runs(web, {"dagster/schedule_name": "nightly_refresh"}), 150,
                         "nightly_refresh launched no run", logs)[-1]  # fmt: skip
    schedule = web.graphql(
        SCHEDULE_QUERY, {"selector": {**selector, "scheduleName": "nightly_refresh"}}, timeout=GRAPHQL_TIMEOUT
    )
    stopped = web.graphql(
        STOP_SCHEDULE, {"id": schedule["scheduleOrError"]["scheduleState"]["id"]}, timeout=GRAPHQL_TIMEOUT
    )
    assert stopped["stopRunningSchedule"]["scheduleState"]["status"] == "STOPPED", stopped

    # 2. a file lands while the scheduled run works; the sensor's run waits in the queue
    landed, rows = _landing_csv(home / "landing")
    sensor_run = _poll(lambda: _runs(web, {"dagster/sensor_name": "landing_sensor"}), 120,
                       "landing_sensor launched no run for the landed file", logs)[-1]  # fmt: skip

    # 3. once the sensor's run is going, a manual run on the same data (the Launchpad's request)
    def sensor_run_state():
        run = next(r for r in _runs(web) if r["runId"] == sensor_run["runId"])
        return run if run["status"] in ("STARTING", "STARTED") else None

    _poll(sensor_run_state, 240, "the sensor's run never started", logs, interval=0.5)
    run_config = {"ops": {"raw_tables": {"config": {"source": "files", "data_path": str(home / "landing")}}}}
    params = {"selector": {**selector, "jobName": "refresh_all"}, "runConfigData": run_config,
              "executionMetadata": {"tags": [{"key": "recsys/trigger", "value": "manual"}]}}  # fmt: skip
    launched = web.graphql(LAUNCH_RUN, {"params": params}, timeout=GRAPHQL_TIMEOUT)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    manual_id = launched["run"]["runId"]

    ids = {"schedule": schedule_run["runId"], "sensor": sensor_run["runId"], "manual": manual_id}

    def all_done():
        runs = {r["runId"]: r for r in _runs(web)}
        return runs if all(runs.get(i, {}).get("status") in DONE for i in ids.values()) else None

    runs = _poll(all_done, 420, "the three runs did not all finish", logs, interval=2.0)
    assets = ("raw_interactions", "model_wals", "onnx_wals", "eval_wals", "registry_wals")
    return {
        "ids": ids,
        "runs": {name: runs[run_id] for name, run_id in ids.items()},
        "all_runs": list(runs.values()),
        "mats": {asset: _materializations(web, asset) for asset in assets},
        "landed": landed,
        "landed_rows": rows,
    }


def _mat(story, asset: str, run: str) -> dict:
    found = [m for m in story["mats"][asset] if m["run_id"] == story["ids"][run]]
    assert found, f"the {run} run ({story['ids'][run]}) did not materialise {asset}"
    return found[0]


@pytest.mark.slow
def test_sensor_run_ingests_the_landed_file_and_retrains(story):
    run = story["runs"]["sensor"]
    assert run["status"] == "SUCCESS", run
    assert run["tags"].get("recsys/trigger") == "landing"
    raw = _mat(story, "raw_interactions", "sensor")["metadata"]
    assert raw["source"] == "files"
    assert str(story["landed"]) in raw["source_files"], raw["source_files"]
    assert raw["dagster/row_count"] + raw["rejected_rows"] == story["landed_rows"]
    assert raw["rejected_rows"] == 0
    model = _mat(story, "model_wals", "sensor")["metadata"]
    assert model["reused"] is False, model["reuse"]  # new data: trained, not reused
    assert _mat(story, "registry_wals", "sensor")["metadata"]["promoted"] is True


@pytest.mark.slow
def test_schedule_tick_launches_a_full_refresh(story):
    run = story["runs"]["schedule"]
    assert run["status"] == "SUCCESS", run
    assert run["jobName"] == "refresh_all"
    assert run["tags"]["dagster/schedule_name"] == "nightly_refresh"
    assert _mat(story, "raw_interactions", "schedule")["metadata"]["source"] == "synthetic"
    assert _mat(story, "model_wals", "schedule")["metadata"]["reused"] is False
    # the UI's toggle stopped it: exactly one scheduled run
    scheduled = [r for r in story["all_runs"] if r["tags"].get("dagster/schedule_name") == "nightly_refresh"]
    assert len(scheduled) == 1, scheduled


@pytest.mark.slow
def test_rerun_on_unchanged_data_reuses_work_and_says_so(story):
    run = story["runs"]["manual"]
    assert run["status"] == "SUCCESS", run
    for asset in ("model_wals", "onnx_wals", "eval_wals"):
        first, again = _mat(story, asset, "sensor"), _mat(story, asset, "manual")
        assert again["metadata"]["reused"] is True, (asset, again["metadata"].get("reuse"))
        assert story["ids"]["sensor"] in again["metadata"]["reuse"], again["metadata"]["reuse"]
        # same data version: downstream sees unchanged inputs
        assert again["tags"]["dagster/data_version"] == first["tags"]["dagster/data_version"], asset
    registry = _mat(story, "registry_wals", "manual")["metadata"]
    assert registry["promoted"] is False and "identical" in registry["reason"], registry
    # one version per distinct model: the schedule's and the landing data's; no duplicate
    versions = sorted(p for p in (story["home"] / "registry" / "wals").iterdir() if p.is_dir())
    digests = [(v / "model.onnx").read_bytes() for v in versions]
    assert len(versions) == 2 and len(set(digests)) == 2, versions
    assert current_version("wals", story["home"] / "registry") == registry["version"]


@pytest.mark.slow
def test_runs_started_together_queue_and_leave_warehouse_and_registry_whole(story):
    runs = sorted(story["runs"].values(), key=lambda r: r["startTime"])
    assert [r["status"] for r in runs] == ["SUCCESS"] * 3, runs
    sensor, manual = story["runs"]["sensor"], story["runs"]["manual"]
    # the manual run was requested while the sensor's run was in progress, and waited for it
    assert sensor["startTime"] is not None and manual["creationTime"] < sensor["endTime"], (sensor, manual)
    assert manual["startTime"] >= sensor["endTime"], (sensor, manual)
    # the queue never started a run before the previous one had ended
    for before, after in zip(runs, runs[1:]):
        assert after["startTime"] >= before["endTime"], (before, after)
    with dg.DagsterInstance.from_config(str(story["dagster_home"])) as instance:
        _warehouse_whole(story["home"], instance)
    _registry_whole(story["home"] / "registry")


# -- kill a training run midway ----------------------------------------------------------------


def _training_under_way(instance, run_id: str) -> bool:
    """The training loop has logged an epoch (``[wals] epoch 1 ...``): the step is mid-training."""
    return any(
        e.step_key == "model_wals" and e.dagster_event is None and "epoch" in (e.user_message or "")
        for e in instance.all_logs(run_id)
    )


@pytest.mark.slow
def test_kill_during_training_keeps_the_blessed_model_and_the_next_run_succeeds(story, tmp_path):
    home, dagster_home = story["home"], story["dagster_home"]
    registry = home / "registry"
    blessed = current_version("wals", registry)
    assert blessed is not None
    # a new config, so the model really trains (the unchanged one would be reused), long
    # enough (20 ALS sweeps of 64 factors, 0.2-0.4 s each) to be killed in the middle
    config = tmp_path / "models.toml"
    config.write_text("[wals]\ndim = 64\niterations = 20\npatience = 20\n")
    env = dagster_env(home, dagster_home, {**SIZES, "RECSYS_MODEL_CONFIG": str(config)})
    started = time.time()
    log = open(tmp_path / "killed_run.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "--select", "model_wals*",
         "-m", MODULE], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        try:

            def new_run():
                records = instance.get_run_records(filters=dg.RunsFilter(created_after=_utc(started)))
                return records[0].dagster_run.run_id if records else None

            def context():
                return (tmp_path / "killed_run.log").read_text(errors="replace")[-3000:]

            killed = _poll(new_run, 90, "the training run did not start", context, interval=0.2)
            _poll(lambda: proc.poll() is not None or _training_under_way(instance, killed), 120,
                  "model_wals did not start training", context, interval=0.1)  # fmt: skip
            assert proc.poll() is None, f"the run ended before it could be killed:\n{context()}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            log.close()
        steps_done = {e.step_key for e in instance.all_logs(killed, of_type=dg.DagsterEventType.STEP_SUCCESS)}
        assert "model_wals" not in steps_done, "the kill came after training had finished"

        # the killed run published nothing: the blessed model is still served, no temp folder
        assert current_version("wals", registry) == blessed
        _registry_whole(registry)
        pointers = list((home / "artifacts" / "wals" / "by_key").glob("*.json"))
        assert not [p for p in pointers if killed in p.read_text()], "a reuse pointer names the killed run"
        _warehouse_whole(home, instance)

        # the next run: `recsys run` settles the dead run (it held the model_training slot)
        done = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", "run", "--select", "model_wals*"], env=env, cwd=REPO,
            capture_output=True, text=True, timeout=420, start_new_session=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"run {killed} had died" in done.stderr, done.stderr[-2000:]
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        after = [r for r in instance.get_run_records(filters=dg.RunsFilter(created_after=_utc(started)))
                 if r.dagster_run.run_id != killed]  # fmt: skip
        assert len(after) == 1 and after[0].dagster_run.status == dg.DagsterRunStatus.SUCCESS
        next_run = after[0].dagster_run.run_id
        model = _latest_metadata(instance, "model_wals")
        assert model[0] == next_run and model[1]["reused"].value is False, "the new config must retrain"
        registry_event = _latest_metadata(instance, "registry_wals")
        if registry_event[0] == next_run and registry_event[1]["promoted"].value:
            new_version = registry_event[1]["version"].value
            assert new_version != blessed and current_version("wals", registry) == new_version
        else:  # not blessed: the previous version stays current
            assert current_version("wals", registry) == blessed
        _registry_whole(registry)
        _warehouse_whole(home, instance)


def _utc(timestamp: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC)


def _latest_metadata(instance, asset: str):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return event.run_id, event.asset_materialization.metadata
