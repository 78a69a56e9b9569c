"""When the graph runs: a nightly refresh of everything, a sensor on the landing folder, and the
nightly storage retention (``prune_storage``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg

from ingest.layouts import FILE_SUFFIXES
from orchestration.assets.retention import prune_storage
from pipeline.settings import SettingsError, load_settings

# When the nightly refresh runs: a cron string in UTC. A deployment moves it without a code
# change (RECSYS_REFRESH_CRON="30 4 * * *"); tests make it tick every minute.
DEFAULT_REFRESH_CRON = "0 2 * * *"


def refresh_cron(env: dict[str, str] | None = None) -> str:
    """``RECSYS_REFRESH_CRON`` (default 02:00 UTC daily), checked so a typo fails at load time
    with the variable's name rather than as a schedule that never ticks."""
    from dagster._utils.schedules import is_valid_cron_string

    env = os.environ if env is None else env
    value = (env.get("RECSYS_REFRESH_CRON") or DEFAULT_REFRESH_CRON).strip()
    if not is_valid_cron_string(value):
        raise SettingsError(
            f"RECSYS_REFRESH_CRON={value!r} is not a cron string; give five fields "
            "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *' for 02:00 UTC daily."
        )
    return value


refresh_all = dg.define_asset_job(
    "refresh_all",
    selection=dg.AssetSelection.all(),
    description="Ingest, dbt build and every contract check: the whole graph.",
)

nightly_refresh = dg.ScheduleDefinition(
    name="nightly_refresh",
    job=refresh_all,
    cron_schedule=refresh_cron(),
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Re-ingests the configured source and rebuilds everything downstream (02:00 UTC unless "
        "RECSYS_REFRESH_CRON says otherwise). Steps whose inputs did not change reuse their "
        "earlier output (metadata `reused`), so a refresh on unchanged data is cheap."
    ),
)

# Three hours after the default refresh: a prune that finds a run still in flight skips, saying
# so, and the next day's tick tries again.
PRUNE_CRON = "0 5 * * *"

nightly_prune = dg.ScheduleDefinition(
    name="nightly_prune",
    job=prune_storage,
    cron_schedule=PRUNE_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Storage retention at 05:00 UTC (`prune_storage`): keeps the last RECSYS_KEEP_VERSIONS "
        "registry versions per family, CURRENT and what they need, deletes the rest."
    ),
)

# A file still being copied changes size and mtime; wait until it has been quiet this long.
SETTLE_SECONDS = 5.0


def landing_files(folder: Path, now: float | None = None) -> dict[str, list[float]]:
    """Settled data files in the landing folder: name -> [mtime, size]. A symbolic link out of
    the folder is no landed file (the run would refuse it too)."""
    if not folder.is_dir():
        return {}
    now = time.time() if now is None else now
    top = folder.resolve()
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not p.name.lower().endswith(FILE_SUFFIXES) or not p.resolve().is_relative_to(top):
            continue
        stat = p.stat()
        if now - stat.st_mtime < SETTLE_SECONDS:
            continue
        found[p.name] = [stat.st_mtime, stat.st_size]
    return found


LANDING_TAG = {"recsys/trigger": "landing"}
IN_FLIGHT = (
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
)  # fmt: skip


def _landing_run_in_flight(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags=LANDING_TAG, statuses=list(IN_FLIGHT)), limit=1)
    return runs[0] if runs else None


@dg.sensor(
    name="landing_sensor",
    job=refresh_all,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches $RECSYS_HOME/landing. When a csv/tsv/parquet file appears or changes, runs the "
        "whole graph with the landing folder as the `files` source (users.* and items.* there "
        "are the side tables). Copy files in under a dot-name and rename them when complete. The "
        "run reads exactly the files this tick saw settled (its `files` config: name, size, "
        "mtime) and stops, keeping the previous raw tables, if one changed since; the next tick "
        "picks it up. Symbolic links out of the folder are ignored here and refused by the run."
    ),
)
def landing_sensor(context: dg.SensorEvaluationContext):
    folder = load_settings().landing_dir
    current = landing_files(folder)
    previous = json.loads(context.cursor) if context.cursor else {}
    if not current or current == previous:
        return dg.SkipReason(f"no new or changed file in {folder}")
    changed = sorted(name for name, stat in current.items() if previous.get(name) != stat)
    busy = _landing_run_in_flight(context.instance)
    if busy is not None:
        # The cursor stays: the change is seen again on the first tick after that run ends, so
        # a file that keeps changing queues one run at a time, not one per change.
        return dg.SkipReason(
            f"{', '.join(changed) or 'a removal'} changed in {folder}, but run {busy.run_id} from "
            f"landed files is still {busy.status.value}; the next tick after it ends picks the change up"
        )
    context.update_cursor(json.dumps(current))
    if not changed:
        return dg.SkipReason(f"only removals in {folder}")
    run_key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:16]
    # The run reads exactly the files seen settled here, and refuses one that changed since.
    settled = [{"name": name, "size": int(size), "mtime": mtime} for name, (mtime, size) in current.items()]
    config = {"source": "files", "data_path": str(folder), "files": settled}
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {"raw_tables": {"config": config}}},
        tags={**LANDING_TAG, "recsys/files": ",".join(changed)[:200]},
    )
