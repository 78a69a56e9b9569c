"""Model backbone: fit time and peak memory per family, and the whole pipeline stage by stage.

    python benchmarks/bench_models.py                      # item_knn + wals at 1M and 10M events
    python benchmarks/bench_models.py --sizes 1000000      # one size
    python benchmarks/bench_models.py --home /tmp/bench    # keep / reuse the warehouses there
    python benchmarks/bench_models.py --stages             # refresh_all through Dagster, 100k events

Fit mode: a synthetic warehouse per size (users x items as in bench_ingest_dbt.py), `dbt run`
(models only, no tests) and a snapshot, each prepared once. Then every family's fit runs in
its own process; wall time and peak RSS of that process tree (sampled every 0.1 s) are
reported beside the fit time the process measured itself (the rest is imports and reading
the snapshot). Configs are the family defaults (`parse_config(cls, {})`) except the caps in
CAPS, which the table prints.

Stages mode: `refresh_all` executed in process on the default synthetic data (943 x 1,682,
100k events) with RECSYS_HOME and DAGSTER_HOME in a temp dir; per-step wall times come from
the run's step stats (STEP_START -> STEP_SUCCESS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest_dbt import INGEST, _measure, bench_env  # noqa: E402

DEFAULT_FAMILIES = ("item_knn", "wals")

# Config overrides per size, so the 10M runs fit the benchmark's ~5 minute budget. Every cap
# is printed in the table; nothing is skipped silently.
# WALS runs its default 10 sweeps at 10M since the conjugate-gradient solve (about 2 minutes
# on two cores; the exact solve ran past 3 minutes and was capped at 3 sweeps).
# The neural top-K families at 10M (about 8M train positives, 4-5 sampled negatives each) are
# capped at 2 epochs (cdae: 3, its epochs are one pass over users, not cells): enough to time
# an epoch and see the metric move, not a converged model.
CAPS: dict[int, dict[str, dict]] = {
    10_000_000: {
        "cdae": {"epochs": 3},
        "gmf": {"epochs": 2},
        "ncf_mlp": {"epochs": 2},
    }
}

SNAPSHOT = """
import duckdb
from pipeline.settings import load_settings
from pipeline.snapshot import write_snapshot
s = load_settings()
con = duckdb.connect(str(s.warehouse), read_only=True)
path = write_snapshot(con, s.home / "snapshots", {"split": s.split, "history_len": s.history_len})
con.close()
print("SNAPSHOT", path)
"""

FIT = """
import json, sys, time
from models.config import parse_config
from models.data import Snapshot
from models.catalogue import FAMILIES
family = FAMILIES[sys.argv[1]]
config = parse_config(family.config_cls, json.loads(sys.argv[3]))
snapshot = Snapshot(sys.argv[2])
start = time.perf_counter()
model = family.fit(snapshot, config, lambda msg: print(msg, flush=True))
seconds = time.perf_counter() - start
last = model.history[-1] if model.history else {}
best = max((h.get("valid_metric") for h in model.history if h.get("valid_metric") is not None),
           default=None)
print("RESULT", json.dumps({"fit_s": seconds, "epochs": len(model.history),
      "metric": last.get("valid_metric_name"), "best": best}))
"""


def prepare(n_events: int, home: Path, log=print) -> Path:
    """Synthetic ingest -> `dbt run` -> snapshot under ``home``; reused when already there."""
    marker = home / "snapshot_path.txt"
    if marker.exists() and (Path(marker.read_text().strip()) / "meta.json").exists():
        log(f"{n_events:,} events: reusing {marker.read_text().strip()}")
        return Path(marker.read_text().strip())
    home.mkdir(parents=True, exist_ok=True)
    env = bench_env(home, n_events)
    wall, peak, _ = _measure([sys.executable, "-c", INGEST], env)
    log(f"{n_events:,} events: ingest {wall:.1f} s, {peak:.2f} GiB")
    dbt = str(Path(sys.executable).with_name("dbt"))
    tdir = home / "dbt_target"
    cmd = [dbt, "run", "--project-dir", "transforms", "--profiles-dir", "transforms",
           "--target-path", str(tdir), "--log-path", str(tdir)]  # fmt: skip
    wall, peak, _ = _measure(cmd, env)
    log(f"{n_events:,} events: dbt run (models only) {wall:.1f} s, {peak:.2f} GiB")
    wall, peak, out = _measure([sys.executable, "-c", SNAPSHOT], env)
    path = Path(next(line for line in out.splitlines() if line.startswith("SNAPSHOT ")).split(" ", 1)[1])
    log(f"{n_events:,} events: snapshot {wall:.1f} s, {peak:.2f} GiB -> {path}")
    marker.write_text(str(path))
    return path


def fit_one(family: str, snapshot: Path, overrides: dict, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-c", FIT, family, str(snapshot), json.dumps(overrides)]
    wall, peak, out = _measure(cmd, env)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    return {**result, "wall_s": wall, "peak_gib": peak}


def run_fits(sizes: list[int], families: list[str], home: Path | None) -> None:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="recsys-bench-models-") as tmp:
            base = (home / str(n)) if home else Path(tmp)
            snapshot = prepare(n, base)
            env = bench_env(base, n)
            for family in families:
                overrides = CAPS.get(n, {}).get(family, {})
                r = fit_one(family, snapshot, overrides, env)
                note = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
                rows.append((n, family, note, r))
                print(
                    f"{n:,} {family}: fit {r['fit_s']:.1f} s, process {r['wall_s']:.1f} s, "
                    f"{r['peak_gib']:.2f} GiB ({note})",
                    flush=True,
                )
    print()
    print("| events | family | config | epochs | fit s | process wall s | peak RSS GiB | last valid metric |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for n, family, note, r in rows:
        metric = f"{r['metric']} {r['best']:.4f}" if r["best"] is not None else "–"
        print(
            f"| {n:,} | {family} | {note} | {r['epochs']} | {r['fit_s']:.1f} | {r['wall_s']:.1f} | "
            f"{r['peak_gib']:.2f} | {metric} |"
        )


# --- stages mode -----------------------------------------------------------------------------
def _stage_of(step_key: str) -> tuple[str, str]:
    """(stage, family or '') of a step key of refresh_all."""
    prefixes = (("model_", "train"), ("onnx_", "onnx"), ("eval_", "eval"), ("registry_", "registry"))
    for prefix, stage in prefixes:
        if step_key.startswith(prefix):
            return stage, step_key[len(prefix) :]
    if step_key.startswith("raw_"):
        return "ingest", ""
    if "contract" in step_key:
        return "contracts", ""
    if step_key.startswith("training_snapshot"):
        return "snapshot", ""
    if step_key.startswith("baseline"):
        return "baselines", ""
    if step_key.startswith("leaderboard"):
        return "leaderboard", ""
    return "dbt", ""


def run_stages() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-stages-"))
    (tmp / "dagster").mkdir()
    (tmp / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ.update(
        RECSYS_HOME=str(tmp / "home"),
        DAGSTER_HOME=str(tmp / "dagster"),
        DAGSTER_DISABLE_TELEMETRY="1",
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
    )
    for var in ("RECSYS_SYNTH_USERS", "RECSYS_SYNTH_ITEMS", "RECSYS_SYNTH_EVENTS", "RECSYS_WAREHOUSE"):
        os.environ.pop(var, None)
    t0 = time.perf_counter()
    import dagster as dg

    from orchestration.definitions import defs

    job = defs.resolve_job_def("refresh_all")
    load_s = time.perf_counter() - t0
    instance = dg.DagsterInstance.ephemeral()
    t1 = time.perf_counter()
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    run_s = time.perf_counter() - t1
    stats = instance.get_run_step_stats(result.run_id)
    rows = []
    for s in sorted(stats, key=lambda s: s.start_time or 0):
        stage, family = _stage_of(s.step_key)
        dur = (s.end_time or 0) - (s.start_time or 0)
        rows.append((stage, family, s.step_key, str(s.status.value if s.status else "?"), dur))
    order = ["ingest", "dbt", "contracts", "snapshot", "baselines", "train", "onnx", "eval", "registry",
             "leaderboard"]  # fmt: skip
    rows.sort(key=lambda r: (order.index(r[0]), r[1], r[2]))
    print(f"refresh_all success={result.success}, RECSYS_HOME={tmp / 'home'}")
    print()
    print("| stage | family | step | status | wall s |")
    print("|---|---|---|---|---:|")
    for stage, family, key, status, dur in rows:
        print(f"| {stage} | {family or '–'} | `{key}` | {status} | {dur:.1f} |")
    steps = sum(r[4] for r in rows)
    print(f"| **sum of steps** | | | | **{steps:.1f}** |")
    print(f"| **execute_in_process wall** | | | | **{run_s:.1f}** |")
    print(f"| (import + load definitions, before the run) | | | | {load_s:.1f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\npeak RSS: this process {peak:.2f} GiB, largest child (dbt) {peak_children:.2f} GiB")
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        raise SystemExit(f"refresh_all failed at {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES))
    parser.add_argument("--home", type=Path, help="keep warehouses/snapshots here (reused if present)")
    parser.add_argument("--stages", action="store_true", help="whole refresh_all via Dagster, per stage")
    args = parser.parse_args()
    if args.stages:
        run_stages()
    else:
        run_fits(args.sizes, args.families, args.home.resolve() if args.home else None)


if __name__ == "__main__":
    main()
