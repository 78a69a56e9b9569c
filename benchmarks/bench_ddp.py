"""Training samples/s with 1 vs N data-parallel processes (DDP under torchrun), DeepFM and DIN.

    python benchmarks/bench_ddp.py                               # CPU, gloo: 1 vs 2 processes
    python benchmarks/bench_ddp.py --procs 1 2 --rounds 2 --rows 131072 --families deepfm din
    python benchmarks/bench_ddp.py --device cuda --procs 1 2 4   # GPUs, NCCL: one GPU per process
    python benchmarks/bench_ddp.py --snapshot PATH               # an existing snapshot folder

Every measurement is a real ``torchrun`` group started by the pipeline's own launcher
(``pipeline.torchrun.launch``, as ``RECSYS_TRAIN_PROCS=N`` does; N = 1 is a group of one, so
every variant pays the same process start-up). Each fit runs ``--epochs`` epochs; the figure is the
median over rounds of the last epoch's samples/s from the saved history (train rows over every
rank / the epoch's wall time on rank 0, validation included: the valid split is 2% of the rows
so training dominates). The wall time of the whole launch (start-up, imports, rendezvous, every
epoch, saving) is printed beside it. Variants alternate inside each round (1 2 1 2 ...), as
STACK.md asks on a noisy shared machine; compare the ratios, and read them beside the load
averages printed before and after.

Without ``--snapshot`` a CTR snapshot of ``--rows`` rows with planted structure is written under
``--home`` (50 history items per row for DIN), in row groups of ``--row-group`` rows: with at
least 4 groups per process each rank reads only its own row groups (``models.distributed``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPARSE = {"user_idx": 20_001, "item_idx": 5_001, "gender_idx": 3, "age_idx": 8, "occupation_idx": 22,
          "genre_idx": 19, "year_idx": 8, "hour_idx": 25, "weekday_idx": 8}  # fmt: skip
DENSE = ("dense_user_activity", "dense_item_popularity", "dense_item_age")
HISTORY = 50


def write_snapshot(out: Path, rows: int, row_group: int, seed: int = 0) -> Path:
    """A snapshot folder whose clicks follow user and item biases, a dense feature and whether the
    target shares the last history item's genre (the tables the CTR families do not read are
    written with their keys only)."""
    if (out / "meta.json").exists():
        return out
    rng = np.random.default_rng(seed)
    n_users, n_items = SPARSE["user_idx"], SPARSE["item_idx"]
    bu, bi = rng.normal(0, 1, n_users), rng.normal(0, 1, n_items)
    genre = rng.integers(1, SPARSE["genre_idx"], n_items)
    cols = {f: rng.integers(1, card, rows).astype(np.int32) for f, card in SPARSE.items()}
    cols["genre_idx"] = genre[cols["item_idx"]].astype(np.int32)
    dense = {f: rng.normal(size=rows).astype(np.float32) for f in DENSE}
    lengths = rng.integers(0, HISTORY + 1, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    items = rng.integers(1, n_items, int(offsets[-1])).astype(np.int32)
    last = np.where(lengths > 0, items[np.maximum(offsets[1:] - 1, 0)], 0)
    same = (lengths > 0) & (genre[last] == genre[cols["item_idx"]])
    logit = bu[cols["user_idx"]] + bi[cols["item_idx"]] + dense["dense_user_activity"] + 0.5 * same
    like = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    split = np.where(rng.random(rows) < 0.96, "train", np.where(rng.random(rows) < 0.5, "valid", "test"))
    order = np.argsort(split, kind="stable")  # sorted by split, as a warehouse export often is
    table = pa.table({"event_id": np.arange(rows), "split": split, "ts": np.arange(rows),
                      "label_like": like, "label_love": like * (rng.random(rows) < 0.4), **cols, **dense,
                      "history_item_idx": pa.ListArray.from_arrays(offsets, items),
                      "history_len": lengths.astype(np.int32)}).take(order)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "fct_ctr_samples.parquet", row_group_size=row_group)
    keys = {"fct_ratings": "event_id", "dim_users": "user_idx", "dim_items": "item_idx",
            "user_stats": "user_idx", "item_stats": "item_idx"}  # fmt: skip
    for name, key in keys.items():
        pq.write_table(pa.table({key: np.arange(1, 3, dtype=np.int32), "split": ["train", "train"]}),
                       out / f"{name}.parquet")  # fmt: skip
    meta = {"fingerprint": f"bench-{rows}", "n_users": n_users, "n_items": n_items,
            "sparse_fields": list(SPARSE), "sparse_cardinality": SPARSE, "dense_fields": list(DENSE),
            "split_rows": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
            "rating_range": [1.0, 5.0], "max_history_len": HISTORY}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def measure(family: str, snapshot: Path, procs: int, device: str, epochs: int,
            work: Path) -> tuple[float, float]:  # fmt: skip
    """(last epoch's samples/s, launch wall seconds) of one torchrun fit."""
    from pipeline.torchrun import Job, launch

    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{family}-{procs}-"))
    job = Job(family, str(snapshot), {"epochs": epochs, "patience": epochs + 1}, str(out / "model"), device,
              1, 1 << 18, procs)  # fmt: skip
    quiet = logging.getLogger("bench_ddp.child")
    start = time.perf_counter()
    launch(job, out / "torchrun", quiet)
    wall = time.perf_counter() - start
    history = json.loads((out / "model" / "config.json").read_text())["history"]
    return history[-1]["rows_per_s"], wall


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--snapshot", type=Path)
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "recsys_bench_ddp")
    parser.add_argument("--rows", type=int, default=131_072)
    parser.add_argument("--row-group", type=int, default=16_384)
    parser.add_argument("--families", nargs="+", default=["deepfm", "din"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    snapshot = args.snapshot or write_snapshot(args.home / f"snapshot-{args.rows}-{args.row_group}",
                                               args.rows, args.row_group)  # fmt: skip
    work = Path(tempfile.mkdtemp(dir=args.home.parent if args.snapshot else args.home, prefix="runs-"))
    meta = json.loads((snapshot / "meta.json").read_text())
    groups = pq.ParquetFile(snapshot / "fct_ctr_samples.parquet").metadata.num_row_groups
    print(f"snapshot {snapshot}: {meta['split_rows']} rows, {groups} row groups; device {args.device}; "
          f"cpus {os.cpu_count()}; load before {os.getloadavg()}", flush=True)  # fmt: skip
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for family in args.families:
            for procs in args.procs:
                rate, wall = measure(family, snapshot, procs, args.device, args.epochs, work)
                results.setdefault((family, procs), []).append((rate, wall))
                print(f"round {r + 1} {family:7s} procs {procs}: {rate:10,.0f} samples/s  "
                      f"launch {wall:6.1f}s  load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print(f"\nload after {os.getloadavg()}\n")
    print("| family | processes | samples/s (median) | vs 1 process | launch wall s (median) |")
    print("|---|---|---|---|---|")
    for family in args.families:
        base = statistics.median(x[0] for x in results[(family, args.procs[0])])
        for procs in args.procs:
            rate = statistics.median(x[0] for x in results[(family, procs)])
            wall = statistics.median(x[1] for x in results[(family, procs)])
            print(f"| {family} | {procs} | {rate:,.0f} | {rate / base:.2f}x | {wall:.1f} |")


if __name__ == "__main__":
    main()
