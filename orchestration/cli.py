"""``recsys``: the newcomer's entry points around Dagster's own CLI.

``recsys run`` materialises the whole asset graph headless through ``dagster asset
materialize`` against a persistent Dagster instance, so the run is then visible in the UI
that ``recsys ui`` (``dagster dev``) opens on the same instance.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from orchestration.settings import SettingsError, load_settings

DAGSTER_YAML = """\
# Written by `recsys`; edit freely, it is only created when missing.
telemetry:
  enabled: false
concurrency:
  pools:
    # duckdb_warehouse: DuckDB allows one writing process per file.
    default_limit: 1
"""


def _dagster_env() -> dict[str, str]:
    settings = load_settings()
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
    sub.add_parser("run", help="materialise every asset headless, then print a summary")
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
    if args.command == "run":
        code = _dagster(["asset", "materialize", "--select", "*"], env)
        if code == 0:
            _summary(env)
        return code
    return _dagster(["dev", "--port", args.port], env)


if __name__ == "__main__":
    raise SystemExit(main())
