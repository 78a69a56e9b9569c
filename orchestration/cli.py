"""``recsys``: the newcomer's entry points around Dagster's own CLI.

``recsys run`` materialises the asset graph (or ``--select``) headless through Dagster's
Python API (``execute_job`` on the code location's reconstructable asset job) against the
persistent Dagster instance, so the run is then visible in the UI that ``recsys ui``
(``dagster dev``) opens on the same instance. The terminal shows one line per step; the full
event log goes to ``$RECSYS_HOME/logs/run-<run_id>.log``.

Both first settle runs whose process died (killed, out of memory, a machine that went
down): such a run stays "in progress" in the instance forever and keeps its pool slots
(``duckdb_warehouse``, ``model_training``), so every later run would wait for them. It is
marked failed with the reason and its slots are freed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from orchestration import launch
from pipeline.settings import SettingsError, ensure_writable, load_settings

DAGSTER_YAML = """\
# Written by `recsys`; edit freely, it is only created when missing.
telemetry:
  enabled: false
concurrency:
  runs:
    # Runs started by the schedule, the sensor or the UI wait in the queue (the daemon
    # launches them one at a time): two whole-graph runs on one small machine only compete.
    max_concurrent_runs: 1
  pools:
    # Across runs, also those that bypass the queue (`recsys run`): one step at a time per
    # pool. duckdb_warehouse: DuckDB allows one writing process per file. model_training:
    # one training at a time.
    default_limit: 1
run_monitoring:
  enabled: true
  # Slots a finished run still holds are released after this many seconds.
  free_slots_after_run_end_seconds: 30
"""
IN_FLIGHT = ("STARTING", "STARTED", "CANCELING")


def _dagster_env() -> dict[str, str]:
    settings = load_settings()
    ensure_writable(settings.home)  # a read-only or full RECSYS_HOME stops here, not mid-run
    env = dict(os.environ)
    home = Path(env.get("DAGSTER_HOME") or settings.home / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    env["DAGSTER_HOME"] = str(home)
    env["RECSYS_HOME"] = str(settings.home)
    env.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


def _worker_pid(instance, run_id: str) -> int | None:
    """The pid of the process executing a run, from its first engine event that records one."""
    import dagster as dg

    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        if pid is not None:
            try:
                return int(getattr(pid, "value", pid))
            except (TypeError, ValueError):
                return None
    return None


def _process_alive(pid: int, run_started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # a pid reused by a process that started after the run is not the run's worker
        return run_started is None or process.create_time() <= run_started + 1.0
    except psutil.NoSuchProcess:
        return False


def reap_dead_runs(dagster_home: Path) -> list[str]:
    """Mark in-progress runs whose worker process is gone as failed and free their pool slots.

    Only for the local instance (``DAGSTER_HOME`` on this machine, sqlite storage), where a
    pid names a process of this machine. Returns the run ids it settled."""
    import dagster as dg
    from dagster._core.storage.runs import SqliteRunStorage

    settled = []
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        if not isinstance(instance.run_storage, SqliteRunStorage):
            return settled
        statuses = [dg.DagsterRunStatus[name] for name in IN_FLIGHT]
        for record in instance.get_run_records(filters=dg.RunsFilter(statuses=statuses)):
            run = record.dagster_run
            pid = _worker_pid(instance, run.run_id)
            if pid is None or _process_alive(pid, record.start_time):
                continue
            instance.report_run_failed(
                run,
                message=(
                    f"The process running this run (pid {pid}) is gone: it was killed or crashed. "
                    "`recsys` marked the run failed and freed its pool slots so later runs can "
                    "start; its partial outputs were never published (registry and warehouse "
                    "writes are atomic). Rerun it."
                ),
            )
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            settled.append(run.run_id)
    return settled


def _settle_dead_runs(env: dict[str, str]) -> None:
    for run_id in reap_dead_runs(Path(env["DAGSTER_HOME"])):
        print(f"recsys: run {run_id} had died mid-way; marked it failed and freed its slots", file=sys.stderr)


def _dagster(args: list[str], env: dict[str, str]) -> int:
    exe = Path(sys.executable).with_name("dagster")
    return subprocess.call([str(exe), *args, "-m", "orchestration.definitions"], env=env)


def _summary(env: dict[str, str]) -> None:
    import duckdb

    warehouse = Path(env["RECSYS_HOME"]) / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT schema_name, table_name, estimated_size FROM duckdb_tables() "
            "WHERE schema_name IN ('raw', 'main') ORDER BY 1, 2"
        ).fetchall()
        print(f"\nwarehouse: {warehouse}")
        for schema, name, _ in tables:
            n = con.execute(f'SELECT count(*) FROM "{schema}"."{name}"').fetchone()[0]
            print(f"  {schema}.{name:<28} {n:>12,} rows")
        if ("main", "fct_ratings") in {
            (schema, name) for schema, name, _ in tables
        }:  # not built by every --select
            splits = con.execute(
                "SELECT split, count(*) FROM main.fct_ratings GROUP BY split ORDER BY split"
            ).fetchall()
            print("  split sizes: " + ", ".join(f"{s}={n:,}" for s, n in splits))
    finally:
        con.close()
    board = Path(env["RECSYS_HOME"]) / "reports" / "leaderboard.json"
    if board.exists():
        _print_leaderboard(board)


def _print_leaderboard(path: Path) -> None:
    """Each task's main metric for every model and baseline, best first."""
    import json

    data = json.loads(path.read_text())
    main = data["main_metric"]
    print(f"\nleaderboard ({path}):")
    for task, (metric, direction) in main.items():
        rows = [r for r in data["records"] if r["task"] == task and r["metric"] == metric]
        if not rows:
            continue
        rows.sort(key=lambda r: r["value"], reverse=direction == "max")
        print(f"  {task} ({metric}, {'higher' if direction == 'max' else 'lower'} is better)")
        for r in rows:
            print(f"    {r['model']:<24} {r['value']:.4f}")
    registry = path.parent.parent / "registry" / "index.json"
    if registry.exists():
        print(f"registry: {registry.parent}")


def _lineage(paths: list[Path]) -> int:
    from export.lineage import describe

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob("*.onnx"))
            if not found:
                print(f"recsys lineage: no .onnx file under {path}", file=sys.stderr)
                return 2
            files += found
        elif path.is_file():
            files.append(path)
        else:
            print(f"recsys lineage: {path} does not exist; pass an ONNX file or a folder", file=sys.stderr)
            return 2
    for path in files:
        try:
            print(describe(path))
        except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
            print(f"recsys lineage: {path} cannot be read as ONNX ({exc})", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialise every asset headless, then print a summary")
    run.add_argument(
        "--select",
        default="*",
        help="Dagster asset selection (default '*': everything), e.g. 'model_wals*' for one family "
        "chain from training on",
    )
    ui = sub.add_parser("ui", help="open the Dagster UI (dagster dev) on the same instance")
    ui.add_argument("--port", default="3000")
    lineage = sub.add_parser(
        "lineage", help="print where a model.onnx came from: raw data, dbt models, snapshot, config, code"
    )
    lineage.add_argument("paths", nargs="+", type=Path, help="ONNX files, or folders to search for *.onnx")
    args = parser.parse_args(argv)
    if args.command == "lineage":
        return _lineage(args.paths)
    try:
        env = _dagster_env()
    except SettingsError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 2
    _settle_dead_runs(env)
    if args.command == "run":
        code = launch.run(args.select, env)
        if code == 0:
            _summary(env)
        return code
    return _dagster(["dev", "--port", args.port], env)


if __name__ == "__main__":
    raise SystemExit(main())
