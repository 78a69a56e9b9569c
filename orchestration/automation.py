"""When the graph runs: a nightly refresh of everything, and a sensor on the landing folder."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dagster as dg

from orchestration.settings import load_settings
from orchestration.sources.layouts import FILE_SUFFIXES

refresh_all = dg.define_asset_job(
    "refresh_all",
    selection=dg.AssetSelection.all(),
    description="Ingest, dbt build and every contract check: the whole graph.",
)

nightly_refresh = dg.ScheduleDefinition(
    name="nightly_refresh",
    job=refresh_all,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-ingests the configured source and rebuilds everything downstream at 02:00 UTC.",
)

# A file still being copied changes size and mtime; wait until it has been quiet this long.
SETTLE_SECONDS = 5.0


def landing_files(folder: Path, now: float | None = None) -> dict[str, list[float]]:
    """Settled data files in the landing folder: name -> [mtime, size]."""
    if not folder.is_dir():
        return {}
    now = time.time() if now is None else now
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not p.name.lower().endswith(FILE_SUFFIXES):
            continue
        stat = p.stat()
        if now - stat.st_mtime < SETTLE_SECONDS:
            continue
        found[p.name] = [stat.st_mtime, stat.st_size]
    return found


@dg.sensor(
    name="landing_sensor",
    job=refresh_all,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches $RECSYS_HOME/landing. When a csv/tsv/parquet file appears or changes, runs the "
        "whole graph with the landing folder as the `files` source (users.* and items.* there "
        "are the side tables). Copy files in under a dot-name and rename them when complete."
    ),
)
def landing_sensor(context: dg.SensorEvaluationContext):
    folder = load_settings().landing_dir
    current = landing_files(folder)
    previous = json.loads(context.cursor) if context.cursor else {}
    if not current or current == previous:
        return dg.SkipReason(f"no new or changed file in {folder}")
    changed = sorted(name for name, stat in current.items() if previous.get(name) != stat)
    context.update_cursor(json.dumps(current))
    if not changed:
        return dg.SkipReason(f"only removals in {folder}")
    run_key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {"raw_tables": {"config": {"source": "files", "data_path": str(folder)}}}},
        tags={"recsys/trigger": "landing", "recsys/files": ",".join(changed)[:200]},
    )
