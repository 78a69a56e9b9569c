"""Ranking families: training samples/s, and onnxruntime vs PyTorch eager scoring on CPU
(batch 1 latency, batch 1024 throughput), for every ``ctr``/``multitask`` family.

    python benchmarks/bench_onnx_latency.py                       # builds the default data in a temp dir
    python benchmarks/bench_onnx_latency.py --snapshot DIR        # reuse a snapshot folder
    python benchmarks/bench_onnx_latency.py --home /tmp/bench-onnx  # keep / reuse the built data there
    python benchmarks/bench_onnx_latency.py --families deepfm,din  # a subset

Each family is trained briefly (1 epoch by default: speed does not depend on the weights) on
the default synthetic snapshot (943 x 1,682, 100k events: generate -> ingest -> `dbt run` ->
snapshot, via bench_models.prepare); its training samples/s is that epoch's ``rows_per_s``
(single-threaded, as the pipeline trains). It is exported with ``export.onnx_export.export_onnx``
and scored on real test rows (``sparse``, ``dense`` and, for sequence families, ``history``,
fed by the graph's input names) by:

- ``ort``: ``onnxruntime.InferenceSession`` on the CPU provider, default session options;
- ``ort-1t``: the same with ``intra_op_num_threads=1``;
- ``torch``: the same scorer module, ``torch.no_grad()``, torch's default thread count;
- ``torch-1t``: the same with ``torch.set_num_threads(1)`` set around its blocks.

After a warm-up, the runtimes take turns in blocks of calls (ort, ort-1t, torch, torch-1t,
ort, ...) so machine noise lands on all of them. Batch 1: per-call latency (median, p90) over
``--calls1`` calls per runtime; batch 1024: rows/s over ``--calls1024`` calls per runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_models import prepare  # noqa: E402

RUNTIMES = ("ort", "ort-1t", "torch", "torch-1t")


def build_model(family_name: str, snapshot: Path, epochs: int, out: Path):
    from export.onnx_export import export_onnx
    from models.catalogue import FAMILIES
    from models.config import parse_config
    from models.data import Snapshot

    family = FAMILIES[family_name]
    config = parse_config(family.config_cls, {"epochs": epochs})
    start = time.perf_counter()
    model = family.fit(Snapshot(snapshot), config, lambda msg: None)
    fit_s = time.perf_counter() - start
    rows_per_s = float(model.history[0]["rows_per_s"]) if model.history else float("nan")
    print(f"{family_name} fit: {fit_s:.1f} s ({epochs} epoch(s)), {rows_per_s:,.0f} samples/s", flush=True)
    scorer, spec = model.scorer(), model.export_spec()
    start = time.perf_counter()
    path = export_onnx(scorer, spec, out / f"{family_name}.onnx")
    print(
        f"export_onnx: {time.perf_counter() - start:.1f} s -> {path} ({path.stat().st_size / 2**20:.1f} MiB)"
    )
    return scorer, spec, path, rows_per_s


def make_callers(scorer, path: Path, input_names: list[str]):
    import onnxruntime as ort
    import torch

    default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    single = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    print(f"onnxruntime {ort.__version__}")
    torch_threads = torch.get_num_threads()

    def ort_call(session):
        def call(arrays):
            return session.run(None, dict(zip(input_names, arrays)))[0]

        return call

    def torch_call(arrays):
        with torch.no_grad():
            return scorer(*(torch.from_numpy(a) for a in arrays)).numpy()

    def threads(n):
        return lambda: torch.set_num_threads(n)

    # runtime -> (call, setup before its block)
    return {
        "ort": (ort_call(default), threads(torch_threads)),
        "ort-1t": (ort_call(single), threads(torch_threads)),
        "torch": (torch_call, threads(torch_threads)),
        "torch-1t": (torch_call, threads(1)),
    }, threads(torch_threads)


def interleaved(callers, batches: list[tuple[np.ndarray, ...]], calls: int, block: int, warmup: int):
    """Per runtime: list of per-call seconds; runtimes alternate in blocks of ``block`` calls."""
    for call, setup in callers.values():
        setup()
        for i in range(warmup):
            call(batches[i % len(batches)])
    times = {name: [] for name in callers}
    for start in range(0, calls, block):
        n = min(block, calls - start)
        for name, (call, setup) in callers.items():
            setup()
            acc = times[name]
            for i in range(start, start + n):
                arrays = batches[i % len(batches)]
                t = time.perf_counter()
                call(arrays)
                acc.append(time.perf_counter() - t)
    return times


def bench_family(name: str, snapshot: Path, args, tmp: Path) -> dict:
    from models.data import Snapshot

    scorer, spec, path, rows_per_s = build_model(name, snapshot, args.epochs, tmp)
    names = [t.name for t in spec.inputs]
    widths = [t.shape[1] for t in spec.inputs if t.name == "history" and isinstance(t.shape[1], int)]
    snap = Snapshot(snapshot)
    ctr = snap.ctr("test", max_history=widths[0] if widths else None)
    if len(ctr) < 1024:
        ctr = snap.ctr("train", max_history=widths[0] if widths else None)
    columns = {"sparse": ctr.sparse, "dense": ctr.dense, "history": ctr.history}
    missing = sorted(set(names) - set(columns))
    if missing:
        raise SystemExit(f"{name}: this benchmark cannot build inputs {missing}")
    data = [np.ascontiguousarray(columns[n]) for n in names]
    callers, restore = make_callers(scorer, path, names)

    # identical outputs first (the parity gate's job, checked here so a broken file cannot look fast)
    probe = tuple(a[:1024] for a in data)
    ref = callers["torch"][0](probe)
    diff = max(float(np.max(np.abs(callers[k][0](probe) - ref))) for k in ("ort", "ort-1t"))

    rng = np.random.default_rng(0)
    rows1 = rng.integers(0, len(ctr), 512)
    b1 = [tuple(a[i : i + 1] for a in data) for i in rows1]
    starts = rng.integers(0, len(ctr) - 1024 + 1, 16)
    b1024 = [tuple(a[s : s + 1024] for a in data) for s in starts]
    t1 = interleaved(callers, b1, args.calls1, block=100, warmup=200)
    t1024 = interleaved(callers, b1024, args.calls1024, block=10, warmup=10)
    restore()
    return {
        "train_rows_per_s": rows_per_s,
        "diff": diff,
        "med": {k: float(np.median(v)) for k, v in t1.items()},
        "p90": {k: float(np.percentile(v, 90)) for k, v in t1.items()},
        "tput": {k: 1024 * len(v) / float(np.sum(v)) for k, v in t1024.items()},
    }


def main() -> None:
    from models.catalogue import FAMILIES

    ranking = [n for n, f in FAMILIES.items() if f.task.value in ("ctr", "multitask")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, help="a snapshot folder (meta.json + parquet)")
    parser.add_argument("--home", type=Path, help="build/reuse the default synthetic warehouse here")
    parser.add_argument("--families", default=",".join(ranking), help=f"comma-separated, from {ranking}")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calls1", type=int, default=2000, help="batch-1 calls per runtime")
    parser.add_argument("--calls1024", type=int, default=200, help="batch-1024 calls per runtime")
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(ranking))
    if unknown:
        raise SystemExit(f"--families: {unknown} are not ranking families; choose from {ranking}")

    import onnxruntime as ort
    import torch

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} (default threads {threads}), onnxruntime {ort.__version__}")
    load_start = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="recsys-bench-onnx-") as tmp:
        tmp = Path(tmp)
        snapshot = args.snapshot or prepare(100_000, (args.home.resolve() if args.home else tmp / "home"))
        for name in families:
            results[name] = bench_family(name, snapshot, args, tmp)

    # Ratios inside one run are what this measures; the load says how far to trust them.
    print()
    loads = " ".join(f"{x:.2f}" for x in load_start), " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load averages (1, 5, 15 min): {loads[0]} at start, {loads[1]} at end, on {os.cpu_count()} CPUs")
    print()
    print(f"batch 1: {args.calls1} calls per runtime (blocks of 100, interleaved); "
          f"batch 1024: {args.calls1024} calls per runtime (blocks of 10, interleaved)")  # fmt: skip
    print()
    print("| family | train samples/s | max abs diff | runtime | batch 1 median us | batch 1 p90 us "
          "| batch 1024 rows/s |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, r in results.items():
        for k in RUNTIMES:
            print(f"| {name} | {r['train_rows_per_s']:,.0f} | {r['diff']:.1e} | {k} "
                  f"| {r['med'][k] * 1e6:.0f} | {r['p90'][k] * 1e6:.0f} | {r['tput'][k]:,.0f} |")  # fmt: skip
    print()
    print("| family | batch 1 speed-up ORT vs torch (median) | batch 1024 throughput ORT/torch "
          "| same, 1 thread each | target (>= 2x at 1, >= 1x at 1024) |")  # fmt: skip
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        med, tput = r["med"], r["tput"]
        speed1 = med["torch"] / med["ort"]
        thr = tput["ort"] / tput["torch"]
        thr1 = tput["ort-1t"] / tput["torch-1t"]
        verdict = "met" if speed1 >= 2 and thr >= 1 else "**missed**"
        print(f"| {name} | {speed1:.2f}x | {thr:.2f}x | {thr1:.2f}x | {verdict} |")


if __name__ == "__main__":
    main()
