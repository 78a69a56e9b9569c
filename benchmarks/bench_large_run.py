"""The large-data benchmark as a user runs it: the whole Dagster graph on an ML-25M-shaped log,
resumable, in the background.

    python benchmarks/bench_large_run.py --home ~/recsys-25m            # starts in the background
    python benchmarks/bench_large_run.py --home ~/recsys-25m --lanes 2  # two groups at a time
    python benchmarks/bench_large_run.py --home ~/recsys-25m --status   # progress and the table
    python benchmarks/bench_large_run.py --home ~/recsys-25m --families cdae  # one family again
    python benchmarks/bench_large_run.py --home ~/recsys-200k --events 200000 --users 2000 \\
        --items 3000 --wait                                             # small, in the foreground
    python benchmarks/bench_large_run.py --home ~/recsys-25m-data --prepare-only --wait  # data stages only

It prepares the warehouse and the snapshot once (`recsys run --select
'*training_snapshot,baseline_metrics'`: ingest, `dbt build`, mart contracts, snapshot,
baselines), then runs the families in groups, each a `recsys run` of its model chains with
`RECSYS_FAMILIES` set to the group, one log file per group under `<home>/bench/`, and finally
the leaderboard over every family. With `--lanes N` the groups run in N lanes side by side (each
family trains on one thread by default, so 2 lanes use a 2-core machine): a free lane takes the
next group, longest first, emb_knn's group right after mf's in the same lane, and the home's
instance lets N model steps train at once (its `model_training` pool; the project's default is
one at a time). Run it again (after a crash, a
reboot or an edit to one family) and the data stages are skipped while the reuse keys skip
every family already trained, exported and evaluated on the same snapshot, config and code.

Budgets: `--model-config` (default `benchmarks/large_run_models.toml`) becomes
RECSYS_MODEL_CONFIG; it sets only `max_minutes` per gradient-trained family.

The table comes from the Dagster instance under `<home>/dagster`: each step's wall time (its
start and success events), the model assets' metadata (epochs, fit seconds, budget hit, rows
per second of every epoch) and the eval assets' (main metric, popularity on the same rows,
blessed). For a family reused on a rerun it shows the run that trained it. Peak RSS is sampled
every 0.5 s over the `recsys run` process tree into `<home>/bench/rss.csv`; all steps of a run
share one process, so a step's peak is that process's resident memory while the step ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RECSYS = Path(sys.executable).with_name("recsys")
DEFAULT_MODELS = ROOT / "benchmarks" / "large_run_models.toml"
PREPARE = "*training_snapshot,baseline_metrics"
DATA_STEPS = ("raw_tables", "transforms", "mart_contracts", "training_snapshot", "baseline_metrics")
# Families in groups of a kind, cheapest first, so a partial run already has a leaderboard of
# the CF families; emb_knn last, as it builds on the embeddings of others.
GROUPS = {
    "cf": ("item_knn", "user_knn", "user_knn_topk", "wals"),
    "mf": ("mf_sgd", "mf_implicit", "gmf", "ncf_mlp", "neumf", "cdae"),
    "ctr": ("deepfm", "wide_deep", "dlrm", "dcn_stacked", "dcn_parallel", "mmoe"),
    "sequence": ("din", "bst"),
    "embedding": ("emb_knn",),
}
SHAPE_25M = {"events": 25_000_000, "users": 162_541, "items": 59_047}
# Minutes each group took at ML-25M shape on one thread (BENCHMARKS.md, the second 25M run, with
# the budgets of large_run_models.toml): how --lanes shares the groups out between cores.
GROUP_MINUTES = {"cf": 50, "mf": 74, "ctr": 21, "sequence": 16, "embedding": 10}
# A group that builds on another's models runs after it, in the same lane.
AFTER = {"embedding": "mf"}


# -- running ----------------------------------------------------------------------------------


def _env(home: Path, shape: dict, model_config: Path, families: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RECSYS_HOME=str(home),
        RECSYS_SOURCE="synthetic",
        RECSYS_SYNTH_EVENTS=str(shape["events"]),
        RECSYS_SYNTH_USERS=str(shape["users"]),
        RECSYS_SYNTH_ITEMS=str(shape["items"]),
        RECSYS_MODEL_CONFIG=str(model_config),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        GX_ANALYTICS_ENABLED="false",
    )
    env.pop("DAGSTER_HOME", None)  # recsys keeps the instance under the home
    env.pop("RECSYS_FAMILIES", None)
    if families:
        env["RECSYS_FAMILIES"] = ",".join(families)
    return env


def _recsys_run(select: str, env: dict[str, str], log: Path, rss_csv: Path, label: str) -> int:
    """`recsys run --select` with its output in ``log``; the process tree's RSS goes to ``rss_csv``."""
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} recsys run --select {select!r}\n")
        out.flush()
        proc = subprocess.Popen([str(RECSYS), "run", "--select", select], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        done = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, rss_csv, label, done), daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    return code


def _sample_rss(pid: int, csv: Path, label: str, done: threading.Event) -> None:
    root = psutil.Process(pid)
    with csv.open("a") as out:
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
            except psutil.Error:
                rss = None
            if rss:
                out.write(f"{time.time():.2f},{rss},{label}\n")
                out.flush()
            done.wait(0.5)


def plan_units(groups: list[str], lanes: int) -> list[list[str]]:
    """The work units the lanes take in turn: each group with the groups that build on it
    (AFTER) right after it, longest first (GROUP_MINUTES), so that the free lane takes the next
    and the lanes end close together. One lane: every group in one unit, in the order asked."""
    units = [[g] for g in groups if AFTER.get(g) not in groups]
    for group in groups:
        if AFTER.get(group) in groups:
            next(u for u in units if AFTER[group] in u).append(group)
    if lanes <= 1:
        return [[g for unit in units for g in unit]] if units else []
    return sorted(units, key=lambda u: -sum(GROUP_MINUTES.get(g, 0) for g in u))


def drive(home: Path, shape: dict, model_config: Path, groups: list[str], lanes: int = 1,
          only: frozenset[str] = frozenset()) -> int:  # fmt: skip
    """Prepare once, then every group (in ``lanes`` side by side), then the leaderboard.
    ``only``: just these families of the groups (all when empty)."""
    bench = home / "bench"
    state = _load_state(home)
    rss = bench / "rss.csv"
    if not state.get("prepared"):
        print(f"[{time.strftime('%H:%M:%S')}] prepare: {PREPARE}", flush=True)
        code = _recsys_run(PREPARE, _env(home, shape, model_config), bench / "prepare.log", rss, "prepare")
        if code != 0:
            print(f"prepare failed (exit {code}); see {bench / 'prepare.log'}", flush=True)
            return code
        _save_state(home, {**state, "prepared": True})
    else:
        print("prepare: done earlier (warehouse and snapshot kept); skipped", flush=True)
    if not groups:
        print(report(home), flush=True)
        return 0
    failed: list[str] = []

    units = plan_units(groups, lanes)
    queue = list(units)
    taking = threading.Lock()

    def run_lane() -> None:
        while True:
            with taking:  # the next unit to whichever lane is free
                if not queue:
                    return
                unit = queue.pop(0)
            for group in unit:
                families = [f for f in GROUPS[group] if not only or f in only]
                select = ",".join(f"model_{f}*" for f in families)
                print(f"[{time.strftime('%H:%M:%S')}] {group}: {', '.join(families)}", flush=True)
                env = _env(home, shape, model_config, families)
                code = _recsys_run(select, env, bench / f"{group}.log", rss, group)
                if code != 0:
                    failed.append(group)
                    print(f"{group} failed (exit {code}); see {bench / f'{group}.log'}; going on", flush=True)

    n_lanes = max(1, min(lanes, len(units)))
    _training_slots(home, n_lanes)
    if n_lanes > 1:
        shown = " | ".join(", ".join(unit) for unit in units)
        print(f"{n_lanes} lanes, each taking the next of: {shown}", flush=True)
    threads = [threading.Thread(target=run_lane) for _ in range(n_lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"[{time.strftime('%H:%M:%S')}] leaderboard over every family", flush=True)
    code = _recsys_run(
        "leaderboard", _env(home, shape, model_config), bench / "leaderboard.log", rss, "leaderboard"
    )
    print(report(home), flush=True)
    return 1 if failed or code != 0 else 0


def _training_slots(home: Path, slots: int) -> None:
    """Let ``slots`` model steps train at once on this home's instance. The project's instance
    runs one step at a time per pool across runs (``default_limit: 1``: one training at a time on
    a small machine), so without this the lanes would only overlap exports and evaluations."""
    import dagster as dg

    from orchestration.assets.families import TRAINING_POOL

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        instance.event_log_storage.set_concurrency_slots(TRAINING_POOL, slots)
    print(f"pool {TRAINING_POOL}: {slots} step(s) at once on this home's instance", flush=True)


def _load_state(home: Path) -> dict:
    path = home / "bench" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(home: Path, state: dict) -> None:
    path = home / "bench" / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)  # atomic: a status reader never sees half a file


def _driver_alive(home: Path) -> int | None:
    pid_file = home / "bench" / "driver.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        proc = psutil.Process(pid)
        # the script may have been started by a relative path: compare resolved paths
        here, cwd = Path(__file__).resolve(), Path(proc.cwd())
        alive = proc.is_running() and any((cwd / arg).resolve() == here for arg in proc.cmdline())
    except (psutil.Error, OSError):
        return None
    return pid if alive else None


# -- the table --------------------------------------------------------------------------------


@dataclass
class Step:
    run_id: str
    start: float
    end: float | None = None
    status: str = "running"
    metadata: dict = field(default_factory=dict)


def _steps(instance) -> dict[str, list[Step]]:
    """Every execution of every step key over the instance's runs, oldest first."""
    import dagster as dg

    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
             dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.ASSET_MATERIALIZATION}  # fmt: skip
    found: dict[str, list[Step]] = {}
    for run in reversed(instance.get_runs()):
        current: dict[str, Step] = {}
        for entry in instance.all_logs(run.run_id, of_type=kinds):
            event, key = entry.dagster_event, entry.step_key
            if event is None or key is None:
                continue
            kind = event.event_type
            if kind == dg.DagsterEventType.STEP_START:
                current[key] = Step(run.run_id, entry.timestamp)
                found.setdefault(key, []).append(current[key])
            elif key in current and kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
                meta = event.event_specific_data.materialization.metadata
                current[key].metadata = {k: getattr(v, "value", v) for k, v in meta.items()}
            elif key in current:
                current[key].end = entry.timestamp
                current[key].status = "ok" if kind == dg.DagsterEventType.STEP_SUCCESS else "failed"
    return found


def _pick(runs: list[Step]) -> Step | None:
    """The execution that did the work: the latest one that was not a reuse, else the latest."""
    worked = [s for s in runs if s.status == "ok" and not s.metadata.get("reused")]
    ok = [s for s in runs if s.status == "ok"]
    return (worked or ok or runs or [None])[-1]


def _rss_samples(home: Path) -> list[tuple[float, int, str]]:
    path = home / "bench" / "rss.csv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        stamp, rss, label = line.split(",", 2)
        rows.append((float(stamp), int(rss), label))
    return rows


def _peak_gib(samples: list[tuple[float, int, str]], step: Step, label: str) -> str:
    """Peak RSS of the `recsys run` labelled ``label`` (its group, or prepare) while ``step`` ran:
    with --lanes two runs overlap, and each step belongs to one of them."""
    end = step.end or time.time()
    inside = [rss for stamp, rss, lab in samples if lab == label and step.start - 0.5 <= stamp <= end + 0.5]
    return f"{max(inside) / 2**30:.2f}" if inside else "-"


def _samples_per_s(history) -> str:
    rows = [(r.get("rows_per_s"), r.get("seconds")) for r in history or [] if isinstance(r, dict)]
    rows = [(rate, secs) for rate, secs in rows if rate and secs]
    if not rows:
        return "-"
    return f"{sum(rate * secs for rate, secs in rows) / sum(secs for _, secs in rows):,.0f}"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def report(home: Path) -> str:
    """The per-stage and per-family table from the instance, the RSS samples and the warehouse."""
    import dagster as dg

    dagster_home = home / "dagster"
    if not (dagster_home / "dagster.yaml").exists():
        return f"no run yet under {home} (no Dagster instance at {dagster_home})"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        steps = _steps(instance)
    samples = _rss_samples(home)
    lines = [f"large run under {home} ({time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f})"]
    state = _load_state(home)
    if state:
        shape = state["shape"]
        lines.append(f"data: {shape['events']:,} events, {shape['users']:,} users, {shape['items']:,} items; "
                     f"budgets {state['model_config']}")  # fmt: skip
    lines += ["", f"{'stage':<20} {'status':<8} {'wall':>7} {'peak RSS GiB':>13}"]
    total = 0.0
    for key in DATA_STEPS:
        step = _pick(steps.get(key, []))
        if step is None:
            lines.append(f"{key:<20} {'pending':<8}")
            continue
        wall = step.end - step.start if step.end else None
        total += (wall or 0.0) if key != "baseline_metrics" else 0.0  # the target's four stages
        peak = _peak_gib(samples, step, "prepare")
        lines.append(f"{key:<20} {step.status:<8} {_clock(wall):>7} {peak:>13}")
    lines.append(f"{'ingest..snapshot':<20} {'':<8} {_clock(total):>7}  (the four stages before baselines)")
    warehouse = home / "warehouse.duckdb"
    if warehouse.exists():
        lines.append(f"warehouse {warehouse.stat().st_size / 2**30:.2f} GiB")
    head = (f"{'family':<14} {'status':<8} {'fit':>7} {'epochs':>6} {'budget':>6} {'samples/s':>10} "
            f"{'peak RSS GiB':>12} {'export':>7} {'eval':>7}  {'main metric':<24} {'popularity':>10} "
            f"{'blessed':>7}")  # fmt: skip
    lines += ["", head]
    for families in GROUPS.values():
        for name in families:
            lines.append(_family_line(name, steps, samples))
    return "\n".join(lines)


def _family_line(name: str, steps: dict[str, list[Step]], samples) -> str:
    group = next(g for g, families in GROUPS.items() if name in families)
    model = _pick(steps.get(f"model_{name}", []))
    if model is None:
        return f"{name:<14} pending"
    onnx = _pick(steps.get(f"onnx_{name}", []))
    evaluation = _pick(steps.get(f"eval_{name}", []))
    m = model.metadata
    fit = m.get("fit_seconds") if model.status == "ok" else None
    epochs = m.get("epochs", "-")
    budget = "hit" if m.get("budget_hit") else ("-" if model.status != "ok" else "no")
    e = evaluation.metadata if evaluation is not None else {}
    metric = f"{e['main_metric']} {e['value']:.4f}" if "value" in e else "-"
    popularity = f"{e['popularity']:.4f}" if "popularity" in e else "-"
    blessed = str(e.get("blessed", "-"))
    status = model.status if model.status != "ok" else "trained" if evaluation is None else evaluation.status
    return (f"{name:<14} {status:<8} {_clock(fit):>7} {epochs!s:>6} {budget:>6} "
            f"{_samples_per_s(m.get('history')):>10} {_peak_gib(samples, model, group):>12} "
            f"{_clock(_wall(onnx)):>7} {_clock(_wall(evaluation)):>7}  {metric:<24} {popularity:>10} "
            f"{blessed:>7}")  # fmt: skip


def _wall(step: Step | None) -> float | None:
    return None if step is None or step.end is None else step.end - step.start


# -- command line -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", type=Path, required=True, help="RECSYS_HOME of the run (kept between reruns)"
    )
    parser.add_argument("--events", type=int, default=SHAPE_25M["events"])
    parser.add_argument("--users", type=int, default=SHAPE_25M["users"])
    parser.add_argument("--items", type=int, default=SHAPE_25M["items"])
    parser.add_argument("--model-config", type=Path, default=DEFAULT_MODELS, help="the budgets TOML")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--families", default="",
                        help="only these families (comma-separated), e.g. what a change touched")  # fmt: skip
    parser.add_argument("--lanes", type=int, default=1,
                        help="groups side by side in this many lanes (2 on a 2-core machine)")  # fmt: skip
    parser.add_argument("--status", action="store_true", help="print progress and the table so far")
    parser.add_argument("--prepare-only", action="store_true", help="only the data stages (benchmark them)")
    parser.add_argument("--wait", action="store_true", help="run in the foreground")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)  # the background driver
    args = parser.parse_args()
    home = args.home.expanduser().resolve()
    if args.status:
        pid = _driver_alive(home)
        print(f"driver: {'running, pid ' + str(pid) if pid else 'not running'}")
        print(report(home))
        return 0
    groups = [] if args.prepare_only else [g.strip() for g in args.groups.split(",") if g.strip()]
    if args.lanes < 1:
        parser.error(f"--lanes must be at least 1, got {args.lanes}")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; known: {', '.join(GROUPS)}")
    only = frozenset(f.strip() for f in args.families.split(",") if f.strip())
    known = {f for g in groups for f in GROUPS[g]}
    if only - known:
        parser.error(f"--families: {sorted(only - known)} not in the groups {groups}")
    groups = [g for g in groups if not only or only & set(GROUPS[g])]
    shape = {"events": args.events, "users": args.users, "items": args.items}
    model_config = args.model_config.expanduser().resolve()
    if not model_config.is_file():
        parser.error(f"--model-config {model_config} is not a file")
    (home / "bench").mkdir(parents=True, exist_ok=True)
    state = _load_state(home)
    if state.get("shape", shape) != shape:
        parser.error(f"{home} holds a run of {state['shape']}, not {shape}: pass the same sizes to "
                     "resume it, or another --home for a new run")  # fmt: skip
    if args.drive or args.wait:
        if args.wait and (pid := _driver_alive(home)):
            parser.error(f"a background run (pid {pid}) is working on {home}; wait for it or use --status")
        _save_state(home, {**state, "shape": shape, "model_config": str(model_config)})
        (home / "bench" / "driver.pid").write_text(str(os.getpid()))
        return drive(home, shape, model_config, groups, args.lanes, only)
    if pid := _driver_alive(home):
        print(f"already running in the background (pid {pid}); progress: --status")
        return 0
    log = home / "bench" / "driver.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--drive", "--home", str(home),
            "--events", str(args.events), "--users", str(args.users), "--items", str(args.items),
            "--model-config", str(model_config), "--groups", ",".join(groups),
            "--lanes", str(args.lanes), "--families", ",".join(sorted(only))]  # fmt: skip
    if args.prepare_only:
        argv.append("--prepare-only")
    with log.open("a") as out:  # a new session: closing the terminal does not stop it (nohup)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ROOT, start_new_session=True)  # fmt: skip
    print(f"started in the background (pid {proc.pid}); driver log {log}, one log per group in "
          f"{home / 'bench'}; progress: {Path(__file__).name} --home {home} --status")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
