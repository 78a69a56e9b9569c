"""Hostile or careless configuration and concurrent promotions (issue: harden it).

Each test names the item of the hardening review it covers."""

from __future__ import annotations

import json
import os
import stat

import pytest

from export.registry import Blessing, bless, current_version, promote_blessed
from ingest.guards import SourceError
from ingest.loader import connect
from pipeline.settings import SettingsError, load_settings

INJECTION = "1GB'; COPY (SELECT 42 AS x) TO '{target}' (FORMAT csv); SET memory_limit = '1GB"


# --- 1. RECSYS_DUCKDB_MEMORY_LIMIT reaches DuckDB, never as SQL ------------------------------
@pytest.mark.parametrize("value", ["lots", "2 GB; DROP TABLE raw.interactions", "1GB'", ""])
def test_memory_limit_setting_is_validated_naming_the_variable(value, tmp_path):
    env = {"RECSYS_HOME": str(tmp_path), "RECSYS_DUCKDB_MEMORY_LIMIT": value}
    if value == "":
        assert load_settings(env).duckdb_memory_limit == "2GB"  # unset or empty: the default
        return
    refused = r"RECSYS_DUCKDB_MEMORY_LIMIT=.* is not a memory size.*e\.g\. 2GB"
    with pytest.raises(SettingsError, match=refused):
        load_settings(env)


@pytest.mark.parametrize("value", ["2GB", "512MB", "1.5GiB", "750 MiB"])
def test_memory_limit_accepts_sizes(value, tmp_path):
    env = {"RECSYS_HOME": str(tmp_path), "RECSYS_DUCKDB_MEMORY_LIMIT": value}
    assert load_settings(env).duckdb_memory_limit == value


def test_a_memory_limit_cannot_smuggle_a_statement_into_the_warehouse_connection(tmp_path):
    """The loader passes its options as connection config: an injected COPY writes nothing."""
    target = tmp_path / "leak.csv"
    with pytest.raises(SourceError, match=r"refused the connection options.*RECSYS_DUCKDB_MEMORY_LIMIT"):
        connect(tmp_path / "warehouse.duckdb", INJECTION.format(target=target), tmp_path / "spill")
    assert not target.exists()
    con = connect(tmp_path / "warehouse.duckdb", "1GB", tmp_path / "spill")
    try:
        memory, order, spill = con.execute(
            "SELECT current_setting('memory_limit'), current_setting('preserve_insertion_order'), "
            "current_setting('temp_directory')"
        ).fetchall()[0]
    finally:
        con.close()
    assert memory.endswith("MiB") and order is True and spill == str(tmp_path / "spill")


# --- 11. The blessing is decided again under the registry lock ------------------------------
def _release(folder, model: bytes, ndcg: float):
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model)
    for name in ("signature.json", "lineage.json"):
        (folder / name).write_text("{}\n")
    (folder / "metrics.json").write_text(json.dumps({"ndcg@10": ndcg}))
    return folder


def _verdict(registry, ndcg: float):
    """What the evaluation step computes: the blessing against the registry as it is now."""
    return lambda: bless("wals", "topk", {"ndcg@10": ndcg}, {"ndcg@10": 0.10}, registry, 0.02)


def test_overlapping_runs_cannot_promote_past_a_version_promoted_in_between(tmp_path):
    """Two runs both blessed against V0; the first promotes a much better model; the second,
    promoting later, must be compared with that one, not with V0."""
    registry = tmp_path / "registry"
    v0 = promote_blessed("wals", _release(tmp_path / "r0", b"v0", 0.20), tmp_path / "r0" / "metrics.json",
                         registry, tmp_path / "s0", recheck=_verdict(registry, 0.20))  # fmt: skip
    early, late = _verdict(registry, 0.30)(), _verdict(registry, 0.22)()
    assert early.blessed and late.blessed and late.previous_version == v0.version  # both pass against V0

    first = promote_blessed("wals", _release(tmp_path / "r1", b"v1", 0.30), tmp_path / "r1" / "metrics.json",
                            registry, tmp_path / "s1", recheck=_verdict(registry, 0.30))  # fmt: skip
    assert first.promoted and current_version("wals", registry) == first.version
    second = promote_blessed("wals", _release(tmp_path / "r2", b"v2", 0.22), tmp_path / "r2" / "metrics.json",
                             registry, tmp_path / "s2", recheck=_verdict(registry, 0.22))  # fmt: skip
    assert not second.promoted and current_version("wals", registry) == first.version
    assert "regresses" in second.note and first.version in second.note
    assert isinstance(second.blessing, Blessing) and not second.blessing.blessed


# --- 13. A handed-off model is readable by other users (the umask applies) ------------------
def test_registry_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        registry = tmp_path / "registry"
        release = _release(tmp_path / "r", b"model", 0.3)
        from common.io import atomic_write_json

        atomic_write_json(release / "signature.json", {"inputs": []})  # written through mkstemp
        done = promote_blessed("wals", release, release / "metrics.json", registry, tmp_path / "staging")
    finally:
        os.umask(old)
    assert done.promoted
    for path in [done.version_dir, *done.version_dir.rglob("*"), registry / "wals" / "CURRENT",
                 registry / "index.json"]:  # fmt: skip
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o755 if path.is_dir() else 0o644
        assert mode == want, f"{path} has mode {oct(mode)}, want {oct(want)} (umask 022)"


# --- 12. Reuse pointers are verified, not trusted --------------------------------------------
class _Log:
    def __init__(self):
        self.warnings: list[str] = []

    def info(self, message):
        pass

    def warning(self, message):
        self.warnings.append(message)


def _complete_folder(folder, weights: bytes = b"weights"):
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(weights)
    (folder / "config.json").write_text('{"family": "wals"}')
    return folder


def test_a_reuse_pointer_to_a_folder_outside_artifacts_is_ignored(tmp_path):
    from pipeline.reuse import StepCache

    cache = StepCache(tmp_path / "artifacts", "wals", "model", ("model.pt", "config.json"))
    elsewhere = _complete_folder(tmp_path / "elsewhere")
    cache.record("k", elsewhere, "run0")
    log = _Log()
    assert cache.lookup("k", log) is None and "outside" in log.warnings[-1]


def test_a_file_changed_in_place_invalidates_its_pointer(tmp_path):
    from pipeline.reuse import StepCache

    cache = StepCache(tmp_path / "artifacts", "wals", "model", ("model.pt", "config.json"))
    folder = _complete_folder(tmp_path / "artifacts" / "wals" / "run1" / "model")
    cache.record("k", folder, "run1")
    assert cache.lookup("k", _Log())["run_id"] == "run1"
    (folder / "model.pt").write_bytes(b"")  # truncated in place: same name, other bytes
    log = _Log()
    assert cache.lookup("k", log) is None and "model.pt" in log.warnings[-1] and "changed" in log.warnings[-1]

    # a pointer edited by hand to drop the hashes is not trusted either
    pointer = cache.pointer("k")
    record = json.loads(pointer.read_text())
    del record["files"]
    pointer.write_text(json.dumps(record))
    assert cache.lookup("k", _Log()) is None


def test_an_onnx_file_changed_in_place_is_evaluated_again(tmp_path, monkeypatch):
    """Metrics are never reused for a model file whose bytes changed since they were computed."""
    import onnx
    from test_models import write_tiny_snapshot

    from evaluation.evaluate import evaluate_baselines
    from models.catalogue import FAMILIES
    from pipeline import steps
    from pipeline.reuse import source_version

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_MODEL_CONFIG", raising=False)
    settings = load_settings()
    snapshot = str(write_tiny_snapshot(tmp_path / "snap"))
    family, log = FAMILIES["item_knn"], _Log()
    version = source_version(family.fit)
    trained = steps.train(family, snapshot, settings, "run1", log, version)
    exported = steps.export(family, str(trained.out), snapshot, settings, "run1", log, version)
    popularity = evaluate_baselines(tmp_path / "snap", "rating")["popularity"]
    first = steps.evaluate(family, str(exported.out), snapshot, popularity, settings, "run1", log)
    assert steps.evaluate(family, str(exported.out), snapshot, popularity, settings, "run2", log).reuse.reused

    model = onnx.load(exported.out / "model.onnx")
    onnx.helper.set_model_props(model, {"edited": "in place"})
    onnx.save(model, exported.out / "model.onnx")
    again = steps.evaluate(family, str(exported.out), snapshot, popularity, settings, "run3", log)
    assert not again.reuse.reused and again.reuse.key != first.reuse.key


# --- 5. Two side tables for one role are refused, naming both ------------------------------
def test_two_user_tables_in_a_files_folder_are_refused_with_both_names(tmp_path):
    from ingest.layouts import files_plan

    (tmp_path / "ratings.csv").write_text("user_id,item_id,rating,timestamp\n1,1,4,100\n")
    (tmp_path / "users.csv").write_text("user_id,gender\n1,F\n")
    (tmp_path / "Users.tsv").write_text("user_id\tgender\n1\tM\n")
    with pytest.raises(SourceError, match=r"two users tables, Users\.tsv and users\.csv: keep one"):
        files_plan(tmp_path)
    (tmp_path / "Users.tsv").unlink()
    assert files_plan(tmp_path).users is not None


# --- 10. A file that keeps changing queues one landing run at a time ---------------------
def test_landing_sensor_skips_while_a_landing_run_is_queued_or_running(tmp_path, monkeypatch):
    import time as clock

    import dagster as dg

    from orchestration.automation import SETTLE_SECONDS, landing_sensor

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    landing = tmp_path / "home" / "landing"
    landing.mkdir(parents=True)
    path = landing / "events.csv"
    path.write_text("user_id,item_id,rating,timestamp\n1,2,4,1600000000\n")
    old = clock.time() - SETTLE_SECONDS - 10
    os.utime(path, (old, old))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor=None):
        with dg.build_sensor_context(cursor=cursor, instance=instance) as ctx:
            return landing_sensor.evaluate_tick(ctx)

    first = tick()
    assert len(first.run_requests) == 1
    tags = first.run_requests[0].tags
    started = dg.DagsterRunStatus.STARTED
    running = dg.DagsterRun(job_name="refresh_all", run_id="landing-run-1", status=started, tags=tags)
    instance.add_run(running)

    path.write_text("user_id,item_id,rating,timestamp\n1,2,4,1600000000\n1,3,5,1600000100\n")
    os.utime(path, (old + 1, old + 1))
    busy = tick(first.cursor)
    assert not busy.run_requests and busy.cursor in (None, first.cursor)  # the change is kept for later
    assert "landing-run-1" in busy.skip_message and "STARTED" in busy.skip_message
    assert "events.csv" in busy.skip_message

    instance.report_run_failed(instance.get_run_by_id("landing-run-1"))
    after = tick(first.cursor)
    assert len(after.run_requests) == 1, "the change made while the run was in flight is picked up after it"
