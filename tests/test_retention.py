"""Storage retention (pipeline/retention.py, the prune_storage job): the last N registry
versions and CURRENT stay with what their lineage names, the rest goes, and nothing a running
step holds is touched."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from test_models import write_tiny_snapshot
from test_registry import release

from evaluation.evaluate import evaluate_baselines
from export.registry import current_version, promote
from models.catalogue import FAMILIES
from pipeline import retention, steps
from pipeline.reuse import source_version
from pipeline.settings import Settings, SettingsError, load_settings

LOG = logging.getLogger("test_retention")
FAMILY = FAMILIES["item_knn"]  # trains in well under a second on the tiny snapshot


def settings_for(home: Path, keep: int) -> Settings:
    return load_settings({"RECSYS_HOME": str(home), "RECSYS_KEEP_VERSIONS": str(keep)})


def stamp(day: int) -> str:
    return f"202601{day:02d}T000000Z-{day:08x}"


def age(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def snapshot_at(s: Settings, name: str, seconds_ago: float = 0, seed: int = 0) -> str:
    """A tiny snapshot written where training_snapshot writes, named by its fingerprint."""
    folder = write_tiny_snapshot(s.home / "snapshots" / name, seed)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "fingerprint": name}))
    age(folder, seconds_ago)
    return str(folder)


def chain(s: Settings, snapshot: str, run_id: str, model_run: str | None = None):
    """train -> export -> evaluate -> promote, as the family's four assets run them; the
    checkpoint comes from ``model_run`` when given (a re-export of an earlier run's model)."""
    version = source_version(FAMILY.fit)
    trained = steps.train(FAMILY, snapshot, s, model_run or run_id, LOG, version)
    exported = steps.export(FAMILY, str(trained.out), snapshot, s, run_id, LOG, version)
    popularity = evaluate_baselines(Path(snapshot), FAMILY.task.value)["popularity"]
    evaluated = steps.evaluate(FAMILY, str(exported.out), snapshot, popularity, s, run_id, LOG)
    return steps.promote(FAMILY, evaluated.record(FAMILY, str(exported.out)), s, run_id, LOG)


def hand_made(s: Settings, versions: int = 3) -> None:
    """Registry versions of `mf` (stamped names, oldest first), an old and a new snapshot, and an
    item_knn run folder no version names."""
    for day in range(1, versions + 1):
        promote("mf", release(s.home / "releases", f"r{day}", {"ndcg@10": 0.3}), s.registry_dir, stamp(day))
    for name, seconds_ago in (("old", 3600), ("new", 0)):
        (s.home / "snapshots" / name).mkdir(parents=True)
        (s.home / "snapshots" / name / "meta.json").write_text("{}")
        age(s.home / "snapshots" / name, seconds_ago)
    run = s.artifacts_dir / "item_knn" / "run0" / "model"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"x" * 1000)


def on_disk(s: Settings) -> set[str]:
    return {str(p.relative_to(s.home)) for p in s.home.rglob("*") if ".trash-" not in str(p)}


def test_keeps_the_last_n_versions_and_current_even_when_older(tmp_path):
    s = settings_for(tmp_path / "home", keep=2)
    hand_made(s, versions=5)
    (s.registry_dir / "mf" / "CURRENT").write_text(stamp(1) + "\n")  # rolled back to the oldest

    outcome = retention.prune(s)

    assert sorted(p.name for p in (s.registry_dir / "mf").iterdir() if p.is_dir()) == [
        stamp(1), stamp(4), stamp(5)]  # fmt: skip
    assert current_version("mf", s.registry_dir) == stamp(1)
    reasons = {e.path.name: e.reason for e in outcome.plan.keep if e.kind == "version"}
    assert "CURRENT of mf" in reasons[stamp(1)] and "last 2 versions" in reasons[stamp(5)]
    gone = sorted(e.path.name for e in outcome.deleted if e.kind == "version")
    assert gone == [stamp(2), stamp(3)] and not list((s.registry_dir / "mf").glob(".trash-*"))
    assert outcome.bytes_freed > 0 and not outcome.skipped


def test_deletes_what_no_kept_version_needs_and_keeps_what_its_lineage_names(tmp_path):
    s = settings_for(tmp_path / "home", keep=1)
    version = source_version(FAMILY.fit)
    steps.train(FAMILY, snapshot_at(s, "old", seconds_ago=7200, seed=1), s, "run_old", LOG, version)
    used = snapshot_at(s, "used", seconds_ago=3600)
    promoted = chain(s, used, "run1", model_run="run0")  # exported in run1 from run0's checkpoint
    assert promoted.promoted
    steps.train(FAMILY, snapshot_at(s, "newest", seed=2), s, "run2", LOG, version)  # not promoted

    outcome = retention.prune(s)

    kept = {e.path.name: e.reason for e in outcome.plan.keep}
    lineage = f"lineage of registry item_knn/{promoted.version}"
    assert lineage in kept["used"] and lineage in kept["run1"] and lineage in kept["run0"]
    assert "newest model of the reuse cache" in kept["run2"] and "newest snapshot" in kept["newest"]
    deleted = {(e.kind, e.path.name) for e in outcome.deleted}
    assert {("snapshot", "old"), ("run", "run_old")} <= deleted
    assert any(kind == "pointer" for kind, _ in deleted)  # run_old's model pointer went with it
    assert not (s.home / "snapshots" / "old").exists()
    assert not (s.artifacts_dir / "item_knn" / "run_old").exists()
    assert (s.registry_dir / "item_knn" / promoted.version / "model.onnx").is_file()
    for pointer in (s.artifacts_dir / "item_knn" / "by_key").glob("*.json"):
        assert Path(json.loads(pointer.read_text())["path"]).is_dir()  # no pointer is left dangling

    # A run on the deleted snapshot's inputs finds no pointer and recomputes.
    again = steps.train(FAMILY, snapshot_at(s, "old", seed=1), s, "run3", LOG, version)
    assert not again.reuse.reused and again.out == s.artifacts_dir / "item_knn" / "run3" / "model"


def test_a_run_folder_gone_under_its_pointer_makes_the_step_recompute(tmp_path):
    """A prune killed between moving a folder to the trash and deleting its pointers leaves a
    pointer to nothing: the next step misses and recomputes, and the next prune cleans up."""
    s = settings_for(tmp_path / "home", keep=1)
    snapshot = snapshot_at(s, "snap")
    first = steps.train(FAMILY, snapshot, s, "run1", LOG, source_version(FAMILY.fit))
    first.out.parent.rename(first.out.parent.with_name(".trash-run1.123.abc"))

    dangling = [e for e in retention.plan_retention(s).delete if e.kind == "pointer"]
    assert dangling and "no longer exists" in dangling[0].reason
    second = steps.train(FAMILY, snapshot, s, "run2", LOG, source_version(FAMILY.fit))
    assert not second.reuse.reused and (second.out / "model.pt").is_file()

    outcome = retention.prune(s)
    assert outcome.swept == ("artifacts/item_knn/.trash-run1.123.abc",)
    assert not list((s.artifacts_dir / "item_knn").glob(".trash-*"))
    assert (s.artifacts_dir / "item_knn" / "run2").is_dir()  # the newest model of the cache


# Another process plays a running step of item_knn on the old snapshot until it reads a line.
HOLDER = """
import sys
from pipeline.settings import load_settings
from pipeline.steps import in_use
with in_use(load_settings(), "item_knn", sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_skips_what_a_running_step_holds(tmp_path):
    s = settings_for(tmp_path / "home", keep=1)
    hand_made(s)
    old = s.home / "snapshots" / "old"
    env = {**os.environ, "RECSYS_HOME": str(s.home)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(old)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held", "the step holding the locks did not start"
        busy = retention.prune(s)
        skipped = {e.path.name: why for e, why in busy.skipped}
        assert skipped["old"] == retention.BUSY
        assert "running step of item_knn" in skipped["run0"]
        assert old.is_dir() and (s.artifacts_dir / "item_knn" / "run0" / "model" / "model.pt").is_file()
        assert {e.path.name for e in busy.deleted} == {stamp(1), stamp(2)}  # the registry is free
    finally:
        holder.stdin.write("done\n")
        holder.stdin.flush()
        holder.wait(60)
    free = retention.prune(s)
    assert {e.path.name for e in free.deleted} == {"old", "run0"} and not free.skipped
    assert not old.exists() and not (s.artifacts_dir / "item_knn" / "run0").exists()


def test_dry_run_deletes_nothing(tmp_path):
    s = settings_for(tmp_path / "home", keep=1)
    hand_made(s)
    before = on_disk(s)

    outcome = retention.prune(s, dry_run=True)

    assert outcome.dry_run and outcome.counts()["deleted"] == 4 and outcome.bytes_freed > 1000
    assert {e.path.name for e in outcome.plan.delete} == {stamp(1), stamp(2), "old", "run0"}
    assert "would delete 4" in outcome.summary()
    assert on_disk(s) == before and not list(s.home.rglob(".trash-*"))


@pytest.fixture(scope="module")
def defs():
    from orchestration.definitions import defs

    return defs


def test_prune_storage_job_runs_in_dagster_and_reports(tmp_path, monkeypatch, defs):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_KEEP_VERSIONS", "1")
    s = load_settings()
    hand_made(s)
    run9 = s.artifacts_dir / "item_knn" / "run9"
    (run9 / "model").mkdir(parents=True)
    assert "nightly_prune" in {schedule.name for schedule in defs.schedules}
    job = defs.resolve_job_def("prune_storage")
    instance = dg.DagsterInstance.ephemeral()
    # the latest materialisation names run9: a partial run would load it, so it stays
    checkpoint = {"checkpoint_dir": dg.MetadataValue.path(str(run9 / "model"))}
    instance.report_runless_asset_event(dg.AssetMaterialization("model_item_knn", metadata=checkpoint))

    result = job.execute_in_process(instance=instance)

    assert result.success
    event = instance.get_latest_materialization_event(dg.AssetKey("storage_retention"))
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    assert meta["deleted"] == 4 and meta["kept"] >= 3 and meta["bytes_freed"] > 1000
    assert meta["skipped_in_use"] == 0 and meta["dry_run"] is False
    assert "older than the last 1 versions" in meta["reasons"]
    assert "latest materialisation of model_item_knn" in meta["reasons"]
    assert run9.is_dir() and not (s.artifacts_dir / "item_knn" / "run0").exists()

    # While another run is in flight the job skips, says why, and deletes nothing.
    (s.home / "snapshots" / "stale").mkdir()
    age(s.home / "snapshots" / "stale", 7200)
    started = dg.DagsterRunStatus.STARTED
    instance.add_run(dg.DagsterRun(job_name="refresh_all", run_id="busy-run", status=started))
    skipped = job.execute_in_process(instance=instance)
    assert skipped.success and (s.home / "snapshots" / "stale").is_dir()
    output = next(e for e in skipped.all_events if e.event_type_value == "STEP_OUTPUT")
    message = output.event_specific_data.metadata["skipped"].value
    assert "busy-run" in message and "STARTED" in message


@pytest.mark.parametrize("value", ["0", "-3", "five"])
def test_a_bad_keep_versions_is_refused_naming_the_variable(tmp_path, value):
    with pytest.raises(SettingsError, match="RECSYS_KEEP_VERSIONS"):
        load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_KEEP_VERSIONS": value})
    assert load_settings({"RECSYS_HOME": str(tmp_path)}).keep_versions == 5
