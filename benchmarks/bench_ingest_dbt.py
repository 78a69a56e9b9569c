"""Ingest + dbt build on synthetic data: wall time and peak memory per stage.

    python benchmarks/bench_ingest_dbt.py                  # 1M and 10M events
    python benchmarks/bench_ingest_dbt.py --sizes 1000000  # one size

Each stage runs as its own process tree (ingest: generator + validation into DuckDB;
dbt: `dbt build` with its tests and unit tests) and its peak RSS is the largest sum of
resident memory over that tree, sampled every 0.1 s, so dbt's subprocess counts. The
target on a 2-core machine: 10M events through ingest and all marts in under 3 minutes,
peak RSS under 4 GB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# users and items grow with events, like the MovieLens releases (100k, 1M, 10M, 25M).
SHAPES = {
    100_000: (943, 1_682),
    1_000_000: (6_040, 3_706),
    10_000_000: (69_878, 10_677),
}

INGEST = """
import sys
from pathlib import Path
from pipeline.settings import load_settings
from ingest.plan import build_plan
from ingest.loader import connect, ingest
s = load_settings()
plan = build_plan("synthetic", None, s.scratch_dir / "bench", synthetic=dict(
    n_users=s.synth_users, n_items=s.synth_items, n_events=s.synth_events, seed=s.synth_seed))
con = connect(s.warehouse, s.duckdb_memory_limit, s.scratch_dir / "duckdb_tmp")
report = ingest(con, plan)
con.close()
print(report.interactions.rows, "interactions ingested")
"""


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak tree RSS in GiB, output) of one command."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, peak / 2**30, text


def bench_env(home: Path, n_events: int) -> dict[str, str]:
    """Environment of one benchmark size: synthetic shape, warehouse path, telemetry off."""
    users, items = SHAPES.get(n_events, (max(50, n_events // 140), max(100, n_events // 900)))
    env = dict(os.environ)
    env.update(
        RECSYS_HOME=str(home),
        RECSYS_SYNTH_USERS=str(users),
        RECSYS_SYNTH_ITEMS=str(items),
        RECSYS_SYNTH_EVENTS=str(n_events),
        RECSYS_WAREHOUSE=str(home / "warehouse.duckdb"),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.setdefault("RECSYS_DUCKDB_MEMORY_LIMIT", "2GB")  # the default of settings
    return env


def run(n_events: int, home: Path) -> list[tuple[str, float, float]]:
    env = bench_env(home, n_events)
    rows = []
    wall, peak, out = _measure([sys.executable, "-c", INGEST], env)
    rows.append(("ingest (generate + validate)", wall, peak))
    dbt = str(Path(sys.executable).with_name("dbt"))
    tdir = home / "dbt_target"
    cmd = [dbt, "build", "--project-dir", "transforms", "--profiles-dir", "transforms",
           "--target-path", str(tdir), "--log-path", str(tdir)]  # fmt: skip
    wall, peak, out = _measure(cmd, env)
    rows.append(("dbt build (models + tests)", wall, peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args()
    print(f"{'events':>12}  {'stage':<30} {'wall s':>8} {'peak RSS GiB':>13}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
            rows = run(n, Path(tmp))
        for stage, wall, peak in rows:
            print(f"{n:>12,}  {stage:<30} {wall:>8.1f} {peak:>13.2f}")
        total = sum(r[1] for r in rows)
        print(f"{n:>12,}  {'total':<30} {total:>8.1f} {max(r[2] for r in rows):>13.2f}", flush=True)


if __name__ == "__main__":
    main()
