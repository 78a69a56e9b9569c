"""Full-catalogue top-K scoring: onnxruntime vs PyTorch eager, users/s, every top-K family.

    python benchmarks/bench_topk_throughput.py                           # 1M events (6,040 x 3,706)
    python benchmarks/bench_topk_throughput.py --events 100000           # the default data
    python benchmarks/bench_topk_throughput.py --snapshot DIR            # reuse a snapshot folder
    python benchmarks/bench_topk_throughput.py --home /tmp/bench-models  # reuse bench_models' warehouses
    python benchmarks/bench_topk_throughput.py --families wals,cdae

A request is what a serving system sends: a batch of user indices and their seen-item mask
(``seen_mask [batch, n_items]``, the train interactions), answered with the best K=100 unseen
items over the whole catalogue. Each family is fitted briefly (``--epochs``: throughput does
not depend on the weights), its top-K graph exported with ``export.onnx_export.export_topk_onnx``,
and the same ``TopKScorer`` module is timed in PyTorch eager (``torch.no_grad()``) and
onnxruntime (CPU provider, default options). Both use this machine's default thread count.

After a warm-up the two runtimes take turns in blocks of calls (ort, torch, ort, ...) over the
same user batches, so machine noise lands on both. Batch 1 gives the median latency of one
user's request; batch ``--batch`` gives users/s. Before timing, the two runtimes' top-K
scores are compared on one batch, so a broken file cannot look fast.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_models import prepare  # noqa: E402
from bench_onnx_latency import interleaved  # noqa: E402

K = 100


def _brief(config_cls, epochs: int) -> dict:
    """Shorten training where the Config has an epoch/iteration knob (speed is weight-independent)."""
    names = {f.name for f in fields(config_cls)}
    return {knob: epochs for knob in ("epochs", "iterations", "pretrain_epochs") if knob in names}


def fit_family(name: str, snapshot, epochs: int, fitted: dict):
    from models.catalogue import FAMILIES
    from models.config import parse_config

    family = FAMILIES[name]
    config = parse_config(family.config_cls, _brief(family.config_cls, epochs))
    upstream = {}
    for source in getattr(family, "upstream", ()) or ():
        if source not in fitted:
            fitted[source] = fit_family(source, snapshot, epochs, fitted)
        upstream[source] = fitted[source]
    start = time.perf_counter()
    if upstream:
        model = family.fit(snapshot, config, lambda msg: None, upstream=upstream)
    else:
        model = family.fit(snapshot, config, lambda msg: None)
    brief = _brief(family.config_cls, epochs) or "defaults"
    print(f"{name}: fit {time.perf_counter() - start:.1f} s ({brief})", flush=True)
    fitted[name] = model
    return model


def topk_inputs(model, train, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seen = np.zeros((len(users), train.shape[1]), dtype=bool)
    rows = train[users]
    for r in range(len(users)):
        seen[r, rows.indices[rows.indptr[r] : rows.indptr[r + 1]]] = True
    return users.astype(np.int64), seen


def bench_family(name: str, model, snapshot, out: Path, args) -> dict:
    import onnxruntime as ort
    import torch

    from export.onnx_export import TopKScorer, export_topk_onnx

    scorer, spec = model.scorer(), model.export_spec()
    path = export_topk_onnx(scorer, spec, K, out / f"{name}_topk.onnx")
    wrapped = TopKScorer(scorer, K, spec).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def ort_call(arrays):
        return session.run(None, dict(zip(names, arrays)))

    def torch_call(arrays):
        with torch.no_grad():
            return wrapped(*(torch.from_numpy(a) for a in arrays))

    train = snapshot.train_matrix("ones")
    active = np.flatnonzero(np.diff(train.indptr) > 0)
    rng = np.random.default_rng(0)
    probe = topk_inputs(model, train, rng.choice(active, min(args.batch, len(active)), replace=False))
    ort_scores, torch_scores = ort_call(probe)[1], torch_call(probe)[1].numpy()
    diff = float(np.max(np.abs(ort_scores - torch_scores)))
    b1 = [topk_inputs(model, train, rng.choice(active, 1)) for _ in range(64)]
    bn = [topk_inputs(model, train, rng.choice(active, args.batch, replace=False)) for _ in range(4)]
    def same_threads():  # both runtimes keep this machine's default thread count
        return None

    callers = {"ort": (ort_call, same_threads), "torch": (torch_call, same_threads)}
    t1 = interleaved(callers, b1, args.calls1, block=20, warmup=10)
    tn = interleaved(callers, bn, args.calls_batch, block=2, warmup=2)
    return {
        "n_items": train.shape[1],
        "diff": diff,
        "lat1": {k: float(np.median(v)) for k, v in t1.items()},
        "ups": {k: args.batch * len(v) / float(np.sum(v)) for k, v in tn.items()},
        "bytes": path.stat().st_size,
    }


def main() -> None:
    from models.catalogue import FAMILIES

    topk = [n for n, f in FAMILIES.items() if f.task.value == "topk"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, help="a snapshot folder (meta.json + parquet)")
    parser.add_argument("--home", type=Path, help="build/reuse the synthetic warehouse under HOME/EVENTS")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--families", default=",".join(topk), help=f"comma-separated, from {topk}")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="users per throughput request")
    parser.add_argument("--calls1", type=int, default=200, help="batch-1 calls per runtime")
    parser.add_argument("--calls-batch", type=int, default=20, help="batch calls per runtime")
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(topk))
    if unknown:
        raise SystemExit(f"--families: {unknown} are not top-K families; choose from {topk}")

    import torch

    from models.data import Snapshot

    with tempfile.TemporaryDirectory(prefix="recsys-bench-topk-") as tmp:
        tmp = Path(tmp)
        if args.snapshot:
            snap_dir = args.snapshot
        else:
            base = (args.home.resolve() / str(args.events)) if args.home else tmp / "home"
            snap_dir = prepare(args.events, base)
        snapshot = Snapshot(snap_dir)
        print(f"snapshot {snap_dir}: {snapshot.n_users:,} users x {snapshot.n_items:,} items; "
              f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
        fitted: dict = {}
        results = {}
        for name in families:
            model = fit_family(name, snapshot, args.epochs, fitted)
            results[name] = bench_family(name, model, snapshot, tmp, args)
            r = results[name]
            print(f"{name}: {r['ups']['ort']:,.0f} vs {r['ups']['torch']:,.0f} users/s", flush=True)

    print()
    print(f"K={K}; batch-1 median over {args.calls1} calls and batch {args.batch} users/s over "
          f"{args.calls_batch} calls per runtime, interleaved")  # fmt: skip
    print()
    print("| family | items | ONNX MiB | max abs diff top_scores | batch 1 ms ORT | batch 1 ms torch "
          "| ORT/torch latency | users/s ORT | users/s torch | ORT/torch throughput |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        lat, ups = r["lat1"], r["ups"]
        print(
            f"| {name} | {r['n_items']:,} | {r['bytes'] / 2**20:.1f} | {r['diff']:.1e} | "
            f"{lat['ort'] * 1e3:.2f} | {lat['torch'] * 1e3:.2f} | {lat['ort'] / lat['torch']:.2f} | "
            f"{ups['ort']:,.0f} | {ups['torch']:,.0f} | {ups['ort'] / ups['torch']:.2f} |"
        )


if __name__ == "__main__":
    main()
