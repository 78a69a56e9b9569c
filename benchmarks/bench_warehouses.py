"""The data stages on DuckDB and on Spark: ingest -> dbt build -> contracts, wall time and
peak memory per stage, the engines alternating.

    python benchmarks/bench_warehouses.py                         # 1M events, duckdb then spark
    python benchmarks/bench_warehouses.py --sizes 1000000 10000000 --repeat 2

Each stage runs as its own process tree and its peak RSS is the largest sum of resident
memory over that tree, sampled every 0.1 s, so the dbt subprocess and Spark's JVM (started by
pyspark inside dbt) count. Stages:

- ingest: synthetic generator + validating loader into DuckDB's raw.* (the same code for both
  engines: Spark reads what DuckDB validated);
- export (spark only): raw.* to the parquet files Spark's sources read;
- dbt build: every model, data test and unit test (`RECSYS_WAREHOUSE` picks the target);
- contracts: the six mart GX suites, on DuckDB's tables or on the parquet folders Spark wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_ingest_dbt import INGEST, SHAPES, _measure

ROOT = Path(__file__).resolve().parent.parent
DBT = str(Path(sys.executable).with_name("dbt"))

EXPORT = """
from ingest.loader import connect
from pipeline.settings import load_settings
from pipeline.warehouse_spark import export_raw
s = load_settings()
con = connect(s.warehouse, s.duckdb_memory_limit, s.scratch_dir / "duckdb_tmp")
print(export_raw(con, s))
con.close()
"""

CONTRACTS = """
import duckdb
from data_contracts import run_suite
from orchestration.assets.contracts import MARTS, contract_parameters
from pipeline.settings import load_settings
from pipeline.snapshot import read_build_info
from pipeline.warehouse_spark import parquet_connection
s = load_settings()
con = parquet_connection(s) if s.warehouse_engine == "spark" else duckdb.connect(
    str(s.warehouse), read_only=True, config={"memory_limit": s.duckdb_memory_limit})
params = contract_parameters(s, read_build_info(con))
failed = [m for m in MARTS if not run_suite(con, m, parameters=params).success]
con.close()
assert not failed, failed
print("contracts passed")
"""


def _env(home: Path, n_events: int, engine: str) -> dict[str, str]:
    users, items = SHAPES.get(n_events, (max(50, n_events // 140), max(100, n_events // 900)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(
        RECSYS_HOME=str(home), RECSYS_WAREHOUSE=engine, RECSYS_SYNTH_USERS=str(users),
        RECSYS_SYNTH_ITEMS=str(items), RECSYS_SYNTH_EVENTS=str(n_events),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false", GX_ANALYTICS_ENABLED="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )  # fmt: skip
    sys.path.insert(0, str(ROOT))
    from pipeline.settings import load_settings

    env.update(load_settings(env).dbt_env())  # the dbt profile's variables, as Dagster sets them
    return env


def run(engine: str, n_events: int, home: Path) -> list[tuple[str, float, float]]:
    env = _env(home, n_events, engine)
    stages = [("ingest", [sys.executable, "-c", INGEST])]
    if engine == "spark":
        stages.append(("export", [sys.executable, "-c", EXPORT]))
    project = str(ROOT / "transforms")
    dbt = [DBT, "build", "--project-dir", project, "--profiles-dir", project,
           "--target-path", str(home / "dbt_target"), "--log-path", str(home / "dbt_target")]  # fmt: skip
    stages += [("dbt build", dbt), ("contracts", [sys.executable, "-c", CONTRACTS])]
    rows = []
    for name, cmd in stages:
        wall, peak, out = _measure(cmd, env)
        # pyspark 4.3 without its `connect` extra makes a `python -c` that imports GX exit 0 silently
        if name == "contracts" and "contracts passed" not in out:
            raise SystemExit(f"the contracts stage ended without its verdict:\n{out[-3000:]}")
        rows.append((name, wall, peak))
        print(f"  {engine:6s} {n_events:>11,d} {name:10s} {wall:8.1f} s  {peak:5.2f} GiB  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--repeat", type=int, default=1, help="rounds of duckdb, spark (alternating)")
    args = parser.parse_args()
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    results: dict[str, list] = {}
    for n_events in args.sizes:
        for round_ in range(args.repeat):
            order = ("duckdb", "spark") if round_ % 2 == 0 else ("spark", "duckdb")
            for engine in order:
                with tempfile.TemporaryDirectory(prefix=f"recsys-bench-{engine}-") as tmp:
                    rows = run(engine, n_events, Path(tmp) / "home")
                results.setdefault(f"{engine}/{n_events}", []).append(rows)
    print("\n| events | engine | stage | wall s | peak GiB |\n|---|---|---|---|---|")
    for key, runs in results.items():
        engine, n = key.split("/")
        for rows in runs:
            total = sum(w for _, w, _ in rows)
            for name, wall, peak in rows:
                print(f"| {int(n):,} | {engine} | {name} | {wall:.1f} | {peak:.2f} |")
            print(f"| {int(n):,} | {engine} | **total** | {total:.1f} | {max(p for *_, p in rows):.2f} |")
    for n_events in args.sizes:
        duck = [sum(w for _, w, _ in r) for r in results.get(f"duckdb/{n_events}", [])]
        spark = [sum(w for _, w, _ in r) for r in results.get(f"spark/{n_events}", [])]
        if duck and spark:
            ratio = min(spark) / min(duck)
            print(f"{n_events:,} events: spark/duckdb total wall = {ratio:.1f}x (best of each)")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
