"""Neighbour families against their peers on the same rows: fit + predict seconds and the metric.

    python benchmarks/bench_knn_vs_peers.py                              # 1M events, 3 rounds
    python benchmarks/bench_knn_vs_peers.py --events 10000000 --only user_knn --rounds 1 --no-peers
    python benchmarks/bench_knn_vs_peers.py --cache /tmp/knn-data        # keep the generated events

Needs `implicit` (0.7.3) and `scikit-surprise` for the peers; a peer that is not installed is
skipped and the table says so.

Data: the synthetic generator at the size's users x items (as bench_ingest_dbt.py), split in
time like the pipeline's default `temporal` split (last 10 % of events test, the 10 % before
valid, the rest train), straight into arrays (no warehouse). Valid rows are not used: our fits
then skip their in-fit validation, so both sides do exactly fit + predict.

Pairs (our defaults on both sides where the peer has the knob):
- `user_knn` vs Surprise `KNNWithMeans(k=50, user_based=True)`, `item_knn` vs
  `KNNWithMeans(k=40, user_based=False)`, both `sim = pearson` (Surprise's centred similarity;
  ours is the shrunk mean-centred cosine, SEED.md). Fit, then predict every test row; RMSE.
- `user_knn_topk` (k=50, binary votes) vs `implicit.nearest_neighbours.CosineRecommender(K=50)`
  (item-item cosine on the binary train matrix). Fit, then the top-20 of every test user with
  train items excluded (ours: the scorer's full-catalogue scores, then top-20); NDCG@10.
Each round runs ours and the peer back to back, the order flipping every round, on one
process (the machine's load moves both alike); the table gives the median and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_ingest_dbt import SHAPES  # noqa: E402

from common.metrics import ranking_metrics, rmse  # noqa: E402
from models import item_knn, user_knn, user_knn_topk  # noqa: E402
from models.config import parse_config  # noqa: E402
from models.data import RatingArrays  # noqa: E402

TOP_N = 20
IMPLICIT_THREADS = 0  # implicit's default: every core; --threads sets it with torch's


def events(n_events: int, cache: Path | None, seed: int = 42) -> dict[str, np.ndarray]:
    """The generator's events (user_id, item_id, rating, timestamp), cached as .npz if asked."""
    users, items = SHAPES.get(n_events, (max(50, n_events // 140), max(100, n_events // 900)))
    path = cache / f"events_{n_events}_{seed}.npz" if cache else None
    if path and path.exists():
        return dict(np.load(path))
    import pyarrow.parquet as pq

    from ingest.synthetic import SyntheticConfig, generate

    cols = {c: [] for c in ("user_id", "item_id", "rating", "timestamp")}
    with tempfile.TemporaryDirectory(prefix="bench-knn-") as tmp:
        out = generate(SyntheticConfig(users, items, n_events, seed), Path(tmp))
        for part in out.interactions:
            table = pq.read_table(part, columns=list(cols))
            for name in cols:
                cols[name].append(table[name].to_numpy())
    data = {c: np.concatenate(v) for c, v in cols.items()} | {"shape": np.array([users + 1, items + 1])}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **data)
    return data


class ArraySnapshot:
    """The part of models.data.Snapshot the neighbour families read, over in-memory splits."""

    def __init__(self, ev: dict[str, np.ndarray]):
        order = np.argsort(ev["timestamp"], kind="stable")
        n_test = int(np.ceil(0.1 * len(order)))
        parts = {"train": order[: len(order) - 2 * n_test], "test": order[len(order) - n_test :]}
        self.splits = {
            name: RatingArrays(
                ev["user_id"][rows].astype(np.int64),
                ev["item_id"][rows].astype(np.int64),
                ev["rating"][rows].astype(np.float32),
                ev["timestamp"][rows].astype(np.int64),
            )
            for name, rows in parts.items()
        }
        empty = np.zeros(0, np.int64)
        self.splits["valid"] = RatingArrays(empty, empty, np.zeros(0, np.float32), empty)
        self.n_users, self.n_items = (int(x) for x in ev["shape"])
        self.meta = {"n_users": self.n_users, "n_items": self.n_items, "rating_range": [1.0, 5.0]}
        self.path = Path(f"<synthetic {len(order):,} events>")

    def ratings(self, split: str) -> RatingArrays:
        return self.splits[split]

    def train_matrix(self, values: str = "rating") -> sp.csr_matrix:
        r = self.ratings("train")
        data = r.rating if values == "rating" else np.ones(len(r), dtype=np.float32)
        return sp.csr_matrix((data, (r.user_idx, r.item_idx)), shape=(self.n_users, self.n_items))

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.ratings("train").item_idx, minlength=self.n_items).astype(np.float32)


def test_relevance(snap: ArraySnapshot) -> tuple[np.ndarray, sp.csr_matrix]:
    test, train = snap.ratings("test"), snap.train_matrix("ones")
    rel = sp.csr_matrix(
        (np.ones(len(test)), (test.user_idx, test.item_idx)), shape=(snap.n_users, snap.n_items)
    )
    rel.data[:] = 1.0
    users = np.flatnonzero((np.diff(rel.indptr) > 0) & (np.diff(train.indptr) > 0))
    return users, rel


def ndcg_from_top(top: np.ndarray, snap: ArraySnapshot, users: np.ndarray, rel: sp.csr_matrix) -> float:
    """NDCG@10 of ranked item lists ``top [n_users, N]`` (best first) via ranking_metrics."""
    scores = np.full((len(users), snap.n_items), -1e9, dtype=np.float32)
    ok = top >= 0
    rows = np.repeat(np.arange(len(users)), ok.sum(1))
    scores[rows, top[ok]] = np.tile(np.arange(top.shape[1], 0, -1), (len(users), 1))[ok]
    return ranking_metrics(scores, snap.train_matrix("ones"), users, rel)["ndcg@10"]


# --- ours -------------------------------------------------------------------------------------
def ours_user_knn(snap):
    model = user_knn.fit(snap, parse_config(user_knn.Config, {}), lambda _: None)
    t = snap.ratings("test")
    pred = user_knn.predict(model, t.user_idx, t.item_idx)
    return lambda: rmse(t.rating, pred)


def ours_item_knn(snap):
    model = item_knn.fit(snap, parse_config(item_knn.Config, {}), lambda _: None)
    t = snap.ratings("test")
    pred = item_knn.predict(model, snap.train_matrix(), t.user_idx, t.item_idx)
    return lambda: rmse(t.rating, pred)


def ours_user_knn_topk(snap, users, rel):
    model = user_knn_topk.fit(snap, parse_config(user_knn_topk.Config, {}), lambda _: None)
    seen = snap.train_matrix("ones")
    tops = []
    with torch.no_grad():
        for lo in range(0, len(users), 256):
            batch = users[lo : lo + 256]
            scores = model.score(batch)
            s = seen[batch]
            scores[np.repeat(np.arange(len(batch)), np.diff(s.indptr)), s.indices] = -np.inf
            tops.append(torch.topk(scores, TOP_N, dim=1).indices.numpy())
    top = np.concatenate(tops)
    return lambda: ndcg_from_top(top, snap, users, rel)


# --- peers ------------------------------------------------------------------------------------
def surprise_knn(snap, user_based: bool, k: int):
    import pandas as pd
    from surprise import Dataset, KNNWithMeans, Reader

    r = snap.ratings("train")
    df = pd.DataFrame({"u": r.user_idx, "i": r.item_idx, "r": r.rating})
    trainset = Dataset.load_from_df(df, Reader(rating_scale=(1, 5))).build_full_trainset()
    algo = KNNWithMeans(k=k, sim_options={"name": "pearson", "user_based": user_based}, verbose=False)
    algo.fit(trainset)
    t = snap.ratings("test")
    est = [algo.predict(u, i).est for u, i in zip(t.user_idx.tolist(), t.item_idx.tolist())]
    return lambda: rmse(t.rating, np.asarray(est, dtype=np.float32))


def implicit_cosine(snap, users, rel):
    from implicit.nearest_neighbours import CosineRecommender

    ones = sp.csr_matrix(snap.train_matrix("ones"))
    model = CosineRecommender(K=50, num_threads=IMPLICIT_THREADS)
    model.fit(ones, show_progress=False)
    ids, _ = model.recommend(users, sp.csr_matrix(ones[users]), N=TOP_N, filter_already_liked_items=True)
    return lambda: ndcg_from_top(np.asarray(ids), snap, users, rel)


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def timed(fn, *args) -> tuple[float, float]:
    """Seconds of fit + predict; the metric is computed after the clock stops."""
    start = time.perf_counter()
    metric = fn(*args)
    return time.perf_counter() - start, metric()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["user_knn", "item_knn", "user_knn_topk"])
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="time ours only (e.g. 10M, where Surprise's dense sims do not fit)",
    )
    parser.add_argument("--cache", type=Path, help="keep/reuse the generated events here")
    parser.add_argument(
        "--threads", type=int, help="threads of both sides (torch and implicit); default: every core"
    )
    args = parser.parse_args()
    if args.threads:
        global IMPLICIT_THREADS
        IMPLICIT_THREADS = args.threads
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    snap = ArraySnapshot(events(args.events, args.cache))
    users, rel = test_relevance(snap)
    train = snap.ratings("train")
    print(
        f"{args.events:,} events: {snap.n_users - 1:,} users x {snap.n_items - 1:,} items, "
        f"{len(train):,} train rows, {len(snap.ratings('test')):,} test rows, {len(users):,} test users "
        f"(data {time.perf_counter() - t0:.1f} s); {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, implicit threads {IMPLICIT_THREADS or 'all'}",
        flush=True,
    )
    pairs = {
        "user_knn": (
            (ours_user_knn, snap),
            ("Surprise KNNWithMeans user k=50", "surprise", surprise_knn, snap, True, 50),
            "rmse",
        ),
        "item_knn": (
            (ours_item_knn, snap),
            ("Surprise KNNWithMeans item k=40", "surprise", surprise_knn, snap, False, 40),
            "rmse",
        ),
        "user_knn_topk": (
            (ours_user_knn_topk, snap, users, rel),
            ("implicit CosineRecommender K=50", "implicit", implicit_cosine, snap, users, rel),
            "ndcg@10",
        ),
    }
    rows = []
    for family, (ours, (peer_name, peer_mod, *peer), metric) in pairs.items():
        if args.only and family not in args.only:
            continue
        run_peer = not args.no_peers and available(peer_mod)
        times = {"ours": [], "peer": []}
        metrics = {}
        for rnd in range(args.rounds):
            order = ["ours", "peer"] if rnd % 2 == 0 else ["peer", "ours"]
            for who in order:
                if who == "peer" and not run_peer:
                    continue
                seconds, value = timed(*(ours if who == "ours" else peer))
                times[who].append(seconds)
                metrics[who] = value
                print(f"  {family} round {rnd + 1} {who}: {seconds:.2f} s, {metric} {value:.4f}", flush=True)
        ours_s = statistics.median(times["ours"])
        peer_s = statistics.median(times["peer"]) if times["peer"] else None
        rows.append((family, ours_s, metrics["ours"], peer_name if run_peer else f"{peer_name} (not run)",
                     peer_s, metrics.get("peer"), metric))  # fmt: skip

    print(
        "\n| ours | fit + predict s (median) | metric | peer | fit + predict s | metric | ours / peer time |"
    )
    print("|---|---:|---|---|---:|---|---:|")
    for family, ours_s, ours_m, peer_name, peer_s, peer_m, metric in rows:
        peer_cols = f"{peer_s:.2f} | {metric} {peer_m:.4f} | {ours_s / peer_s:.2f}" if peer_s else "- | - | -"
        print(f"| {family} | {ours_s:.2f} | {metric} {ours_m:.4f} | {peer_name} | {peer_cols} |")


if __name__ == "__main__":
    main()
