"""CPU training throughput by thread count (RECSYS_TORCH_THREADS), and streamed vs in-memory rows.

    python benchmarks/bench_threads.py --snapshot PATH           # an existing snapshot folder
    python benchmarks/bench_threads.py                           # builds the default data first
    python benchmarks/bench_threads.py --threads 1 2 --rounds 3 --families deepfm din mf_sgd
    python benchmarks/bench_threads.py --paths                   # stream vs memory, 1 thread
    python benchmarks/bench_threads.py --rss --snapshot A B      # peak RSS, stream vs memory, per size
    python benchmarks/bench_threads.py --fingerprint --snapshot S --families deepfm din
    python benchmarks/bench_threads.py --precisions fp32 bf16 --epochs 0   # autocast, full fits

Each measurement fits one family for ``--epochs`` epochs (default 1) in this process inside
``use_runtime(Runtime(threads=t, stream=...))`` and records the fit's wall time and the epoch's
rows/s (the history row: training plus that epoch's validation). The variants are alternated
inside each round (A B A B ...), as STACK.md asks on a noisy shared machine, and the table gives
the median per (family, variant) and its ratio to the first variant. The load average before and
after is printed: compare ratios inside one run, not absolute seconds across runs.

``--rss`` fits each family for one epoch in a fresh process per (snapshot, path) and reports the
process's peak RSS (``ru_maxrss``) beside that of a process that only imports the same modules,
so the difference is what training held; run it on snapshots of different sizes to see whether
peak memory grows with the row count.

``--precisions`` compares the training autocast (RECSYS_PRECISION: ``fp32``, ``bf16``; one thread
each) instead of thread counts; with ``--epochs 0`` every fit runs at the family's defaults (early
stopping included), so the last column compares the models' quality as well as their speed.
``--minutes M`` gives every fit that time budget (``max_minutes``): on a large snapshot the first
epoch is cut there, and its rows/s (validation of the weights so far included) is the throughput.

``--fingerprint`` fits each family at its defaults and prints a sha256 of its weights and of its
history (epoch, train loss, valid metric): run it in two checkouts to show they train the same model.

Without ``--snapshot`` the default synthetic data (943 users x 1,682 items, 100k events) is
ingested, built with ``dbt run`` and snapshotted under ``--home`` (reused when there), as
``bench_models.py`` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(
    family: str, snapshot, epochs: int, runtime, minutes: float | None = None
) -> tuple[float, float, float]:
    from models.catalogue import FAMILIES
    from models.config import parse_config
    from models.runtime import use_runtime

    fam = FAMILIES[family]
    values = ({"epochs": epochs} if epochs else {}) | ({"max_minutes": minutes} if minutes else {})
    config = parse_config(fam.config_cls, values)  # epochs 0: the defaults
    start = time.perf_counter()
    with use_runtime(runtime):
        model = fam.fit(snapshot, config, lambda _: None)
    wall = time.perf_counter() - start
    metrics = [r["valid_metric"] for r in model.history if r["valid_metric"] is not None]
    lower = model.history and model.history[0].get("valid_metric_name") in ("rmse", "mae")
    best = (min if lower else max)(metrics, default=float("nan"))  # the kept epoch's
    return wall, statistics.median(r["rows_per_s"] for r in model.history), best


RSS = """
import resource, sys, time
from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import Snapshot
from models.runtime import Runtime, use_runtime
if sys.argv[1] != "-":
    fam = FAMILIES[sys.argv[1]]
    start = time.perf_counter()
    with use_runtime(Runtime(stream=sys.argv[3] == "stream", buffer_rows=int(sys.argv[4]))):
        fam.fit(Snapshot(sys.argv[2]), parse_config(fam.config_cls, {"epochs": 1}), lambda _: None)
    print("SECONDS", time.perf_counter() - start)
print("RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _rss(*argv: str) -> tuple[float, float]:
    """(peak RSS MiB, fit seconds) of a fresh process running RSS with ``argv``."""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", RSS, *argv], capture_output=True, text=True, check=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root}).stdout  # fmt: skip
    value = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if " " in line}
    return value["RSS_KIB"] / 1024, value.get("SECONDS", 0.0)


def fingerprint(snapshot, families: list[str]) -> None:
    import hashlib
    import json

    from models.catalogue import FAMILIES
    from models.config import parse_config

    for family in families:
        fam = FAMILIES[family]
        model = fam.fit(snapshot, parse_config(fam.config_cls, {}), lambda _: None)
        weights = hashlib.sha256()
        for name, value in sorted(model.module.state_dict().items()):
            weights.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
        curve = [(r["epoch"], r["train_loss"], r["valid_metric"]) for r in model.history]
        history = hashlib.sha256(json.dumps(curve).encode()).hexdigest()[:12]
        print(
            f"{family:14s} weights {weights.hexdigest()[:16]} history {history} epochs {len(curve)}",
            flush=True,
        )


def run_rss(snapshots: list[Path], families: list[str], modes: list[str], buffer_rows: int) -> None:
    from models.data import Snapshot

    base, _ = _rss("-")
    print(f"imports alone: {base:.0f} MiB peak RSS; streaming buffer {buffer_rows:,} rows; "
          f"load average {os.getloadavg()}", flush=True)  # fmt: skip
    print()
    print("| family | train rows | rows | peak RSS MiB | over imports MiB | fit s (1 epoch) |")
    print("|---|---:|---|---:|---:|---:|")
    for family in families:
        for path in snapshots:
            rows = Snapshot(path).meta["split_rows"]["train"]
            for mode in modes:
                peak, seconds = _rss(family, str(path), mode, str(buffer_rows))
                print(f"| {family} | {rows:,} | {mode} | {peak:.0f} | {peak - base:.0f} | {seconds:.1f} |",
                      flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, nargs="+", help="snapshot folder(s) (meta.json + parquet)")
    ap.add_argument("--home", type=Path, help="where to build/reuse the default-data snapshot")
    ap.add_argument("--families", nargs="+", default=["deepfm", "din", "mf_sgd"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per fit; 0: the family's defaults")
    ap.add_argument("--precisions", nargs="+", help="compare autocast precisions (fp32 bf16) on 1 thread")
    ap.add_argument("--minutes", type=float, help="max_minutes of each fit (a large snapshot's epoch is cut)")
    ap.add_argument("--paths", action="store_true", help="compare streamed and in-memory rows (1 thread)")
    ap.add_argument("--rss", action="store_true", help="peak RSS per snapshot, streamed vs in-memory")
    ap.add_argument("--fingerprint", action="store_true", help="hash of each family's trained weights")
    ap.add_argument("--modes", nargs="+", default=["stream", "memory"], help="--rss: which row paths")
    ap.add_argument(
        "--buffer-rows", type=int, default=None, help="the streaming buffer (default: the runtime's)"
    )
    args = ap.parse_args()

    from models.data import Snapshot

    paths = args.snapshot
    if not paths:
        from bench_models import prepare

        home = args.home or Path(tempfile.mkdtemp(prefix="recsys-bench-threads-"))
        paths = [prepare(100_000, home)]
    if args.rss:
        from models.runtime import DEFAULT_BUFFER_ROWS

        return run_rss(paths, args.families, args.modes, args.buffer_rows or DEFAULT_BUFFER_ROWS)
    path = paths[0]
    snapshot = Snapshot(path)
    if args.fingerprint:  # before importing models.runtime: runs on checkouts older than it, too
        return fingerprint(snapshot, args.families)
    from models.runtime import Runtime

    if args.paths:
        variants = {"stream": Runtime(stream=True), "memory": Runtime(stream=False)}
    elif args.precisions:
        variants = {p: Runtime(precision=p) for p in args.precisions}
    else:
        variants = {f"{t} thread{'s' if t > 1 else ''}": Runtime(threads=t) for t in args.threads}
    print(f"snapshot {path} ({snapshot.meta['split_rows']}), load average {os.getloadavg()}", flush=True)
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for family in args.families:
        # warm-up: imports, first parquet read, allocator (a short budget on a large snapshot)
        measure(family, snapshot, 1, Runtime(), args.minutes and min(args.minutes, 0.25))
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                wall, rps, best = measure(family, snapshot, args.epochs, variants[name], args.minutes)
                results.setdefault((family, name), []).append((wall, rps, best))
                line = f"round {r + 1} {family} {name}: fit {wall:.1f} s, {rps:,.0f} rows/s"
                print(f"{line}, best valid {best:.4f}", flush=True)
    print(f"load average after {os.getloadavg()}")
    print()
    first = next(iter(variants))
    print(f"| family | variant | fit s (median of {args.rounds}) | rows/s (median) | fit time vs {first} | "
          "best valid metric |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for family in args.families:
        base = statistics.median(w for w, _, _ in results[(family, first)])
        for name in variants:
            wall = statistics.median(w for w, _, _ in results[(family, name)])
            rps = statistics.median(x for _, x, _ in results[(family, name)])
            best = results[(family, name)][0][2]  # the same in every round (seeded)
            print(f"| {family} | {name} | {wall:.1f} | {rps:,.0f} | {wall / base:.2f} | {best:.4f} |")


if __name__ == "__main__":
    main()
