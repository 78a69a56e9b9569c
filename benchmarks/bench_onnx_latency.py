"""DeepFM scoring: onnxruntime vs PyTorch eager on CPU, batch 1 latency and batch 1024 throughput.

    python benchmarks/bench_onnx_latency.py                       # builds the default data in a temp dir
    python benchmarks/bench_onnx_latency.py --snapshot DIR        # reuse a snapshot folder
    python benchmarks/bench_onnx_latency.py --home /tmp/bench-onnx  # keep / reuse the built data there

DeepFM is trained briefly (1 epoch by default: speed does not depend on the weights) on the
default synthetic snapshot (943 x 1,682, 100k events: generate -> ingest -> `dbt run` ->
snapshot, via bench_models.prepare), exported with ``export.onnx_export.export_onnx`` and
scored on real test rows by:

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_models import prepare  # noqa: E402

RUNTIMES = ("ort", "ort-1t", "torch", "torch-1t")


def build_model(snapshot: Path, epochs: int, out: Path):
    import torch

    from export.onnx_export import export_onnx
    from models.config import parse_config
    from models.data import Snapshot
    from models.registry import FAMILIES

    family = FAMILIES["deepfm"]
    config = parse_config(family.config_cls, {"epochs": epochs})
    start = time.perf_counter()
    model = family.fit(Snapshot(snapshot), config, lambda msg: None)
    print(f"deepfm fit: {time.perf_counter() - start:.1f} s ({epochs} epoch(s))", flush=True)
    scorer, spec = model.scorer(), model.export_spec()
    start = time.perf_counter()
    path = export_onnx(scorer, spec, out / "model.onnx")
    print(
        f"export_onnx: {time.perf_counter() - start:.1f} s -> {path} ({path.stat().st_size / 2**20:.1f} MiB)"
    )
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}")
    return scorer, spec, path


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, help="a snapshot folder (meta.json + parquet)")
    parser.add_argument("--home", type=Path, help="build/reuse the default synthetic warehouse here")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calls1", type=int, default=2000, help="batch-1 calls per runtime")
    parser.add_argument("--calls1024", type=int, default=200, help="batch-1024 calls per runtime")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="recsys-bench-onnx-") as tmp:
        tmp = Path(tmp)
        snapshot = args.snapshot or prepare(100_000, (args.home.resolve() if args.home else tmp / "home"))
        scorer, spec, path = build_model(snapshot, args.epochs, tmp / "onnx")
        from models.data import Snapshot

        ctr = Snapshot(snapshot).ctr("test", max_history=1)
        if len(ctr) < 1024:
            ctr = Snapshot(snapshot).ctr("train", max_history=1)
        sparse, dense = np.ascontiguousarray(ctr.sparse), np.ascontiguousarray(ctr.dense)
        names = [t.name for t in spec.inputs]
        assert names == ["sparse", "dense"], names
        callers, restore = make_callers(scorer, path, names)

        # identical outputs first (the parity gate's job, checked here so a broken file cannot look fast)
        probe = (sparse[:1024], dense[:1024])
        ref = callers["torch"][0](probe)
        for name in ("ort", "ort-1t"):
            diff = float(np.max(np.abs(callers[name][0](probe) - ref)))
            print(f"max |{name} - torch| on 1024 rows: {diff:.2e}")

        rng = np.random.default_rng(0)
        rows1 = rng.integers(0, len(sparse), 512)
        b1 = [(sparse[i : i + 1], dense[i : i + 1]) for i in rows1]
        starts = rng.integers(0, len(sparse) - 1024 + 1, 16)
        b1024 = [(sparse[s : s + 1024], dense[s : s + 1024]) for s in starts]

        t1 = interleaved(callers, b1, args.calls1, block=100, warmup=200)
        t1024 = interleaved(callers, b1024, args.calls1024, block=10, warmup=10)
        restore()

    med = {k: float(np.median(v)) for k, v in t1.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in t1.items()}
    tput = {k: 1024 * len(v) / float(np.sum(v)) for k, v in t1024.items()}
    tmed = {k: 1024 / float(np.median(v)) for k, v in t1024.items()}
    print()
    print(f"batch 1: {args.calls1} calls per runtime (blocks of 100, interleaved); "
          f"batch 1024: {args.calls1024} calls per runtime (blocks of 10, interleaved)")  # fmt: skip
    print()
    print(
        "| runtime | batch 1 median us | batch 1 p90 us | batch 1024 rows/s (total) "
        "| batch 1024 rows/s (median call) |"
    )
    print("|---|---:|---:|---:|---:|")
    for k in RUNTIMES:
        print(f"| {k} | {med[k] * 1e6:.0f} | {p90[k] * 1e6:.0f} | {tput[k]:,.0f} | {tmed[k]:,.0f} |")
    print()
    print(
        "| comparison | batch 1 median latency ORT/torch | batch 1 p90 ORT/torch "
        "| batch 1024 throughput ORT/torch |"
    )
    print("|---|---:|---:|---:|")
    for o, t in (("ort", "torch"), ("ort-1t", "torch"), ("ort-1t", "torch-1t"), ("ort", "torch-1t")):
        print(f"| {o} vs {t} | {med[o] / med[t]:.2f} | {p90[o] / p90[t]:.2f} | {tput[o] / tput[t]:.2f} |")
    speed1 = med["torch"] / med["ort"]
    thr = tput["ort"] / tput["torch"]
    print()
    print(f"target (defaults): ORT >= 2x faster at batch 1 -> {speed1:.2f}x "
          f"({'met' if speed1 >= 2 else 'missed'}); not slower at 1024 -> {thr:.2f}x "
          f"({'met' if thr >= 1 else 'missed'})")  # fmt: skip


if __name__ == "__main__":
    main()
