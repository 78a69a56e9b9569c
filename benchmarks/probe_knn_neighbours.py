"""Why item_knn and user_knn trail Surprise's KNNWithMeans: which neighbours a prediction averages.

    python benchmarks/probe_knn_neighbours.py --snapshot $RECSYS_HOME/snapshots/<hash>
    python benchmarks/probe_knn_neighbours.py --home $RECSYS_HOME --widen 1 2.5 5 10 0

Test RMSE on the evaluator's rows (warm test rows: user and item seen in train) of the
families' own formulas, with their own similarities (``item_similarity_topk`` /
``user_similarity_topk`` at the family's Config), changing one thing at a time:

- the neighbour rule. The families keep each item's (user's) k most similar neighbours,
  then average those the user rated (the other users who rated the item); with k = 40 of
  thousands, few of them did. Surprise's KNNWithMeans (and Sarwar 2001 / Koren 2008) takes
  the k most similar *among* the items the user rated (users who rated the item). Here the
  families' lists are widened to ``candidates`` entries (0 = every positive neighbour) and
  the prediction averages the first k of them that qualify: ``--widen`` gives the list sizes
  as multiples of k, 1 being the family as it is and 0 every neighbour (Surprise's rule).
- item_knn only: the item-mean damping (Config.mean_damping) against plain means (Surprise's).

The first row of each block must equal the family's own test RMSE from bench_peers.py (the
evaluator on the same rows): the probe computes exactly the family's formula.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_peers import family_config, newest_snapshot  # noqa: E402

from common.metrics import rmse  # noqa: E402
from models import item_knn, user_knn  # noqa: E402
from models.data import Snapshot  # noqa: E402


def first_k(nbr_idx, nbr_sim, lookup, rows, targets, k: int, centre_rows: np.ndarray, lo_hi) -> np.ndarray:
    """``mean[row] + sum w (r - mean[nbr]) / sum w`` over the first ``k`` positive neighbours of
    ``rows`` (lists sorted by similarity) for which ``lookup(nbr, target)`` holds a rating."""
    nbr, sim = nbr_idx[rows], nbr_sim[rows]  # [N, K]
    rating = np.asarray(lookup[nbr.ravel(), np.repeat(targets, nbr.shape[1])]).reshape(nbr.shape)
    found = (rating != 0) & (sim > 0) & (nbr > 0)
    keep = found & (np.cumsum(found, axis=1) <= k)
    w = np.where(keep, sim, 0.0)
    num = (w * (rating - centre_rows[nbr])).sum(1)
    den = w.sum(1)
    pred = centre_rows[rows] + np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.clip(pred, *lo_hi)


def sizes(widen: list[float], k: int, n: int) -> list[int]:
    """List sizes ``m * k`` (0 = all ``n``), the family's own (m = 1) first."""
    return list(dict.fromkeys([k, *(min(int(m * k), n) if m else n for m in widen)]))


def probe(snapshot: Path, widen: list[float]) -> None:
    snap = Snapshot(snapshot)
    train = snap.train_matrix("rating").tocsr()
    test = snap.ratings("test")
    warm = (test.user_idx > 0) & (test.item_idx > 0)
    users, items, y = test.user_idx[warm], test.item_idx[warm], test.rating[warm]
    lo_hi = tuple(float(x) for x in snap.meta.get("rating_range", (1.0, 5.0)))
    print(f"{snapshot}: {train.nnz:,} train ratings, {len(y):,} warm test rows")

    cfg = family_config("item_knn")
    r = snap.ratings("train")
    mu = float(r.rating.mean())
    counts = np.bincount(r.item_idx, minlength=snap.n_items)
    sums = np.bincount(r.item_idx, weights=r.rating, minlength=snap.n_items)
    by_item = train.T.tocsr()  # lookup[item j, user u] = r_uj
    print(f"\nitem_knn (k={cfg.k}, shrink={cfg.shrink}, mean_damping={cfg.mean_damping}):")
    print("| candidates per item | damping | test RMSE |\n|---:|---:|---:|")
    for size in sizes(widen, cfg.k, snap.n_items - 1):
        nbr_idx, nbr_sim = item_knn.item_similarity_topk(train, size, cfg.shrink, cfg.block_size)
        for damping in dict.fromkeys((cfg.mean_damping, 0.0)):
            mean = np.where(counts > 0, (sums + damping * mu) / np.maximum(counts + damping, 1e-12), mu)
            mean[0] = mu
            pred = first_k(nbr_idx, nbr_sim, by_item, items, users, cfg.k, mean, lo_hi)
            print(f"| {size} | {damping:g} | {rmse(y, pred):.4f} |", flush=True)

    cfg = family_config("user_knn")
    if cfg.prediction != "seed":
        raise SystemExit(f"user_knn prediction={cfg.prediction!r}: this probe writes the seed formula only")
    base = user_knn.baseline(train, cfg)
    print(f"\nuser_knn (k={cfg.k}, shrink={cfg.shrink}, {cfg.similarity}, prediction={cfg.prediction}):")
    print("| candidates per user | test RMSE |\n|---:|---:|")
    for size in sizes(widen, cfg.k, snap.n_users - 1):
        nbr_idx, nbr_sim = user_knn.user_similarity_topk(
            train, size, cfg.shrink, cfg.similarity, cfg.block_size
        )
        pred = first_k(nbr_idx, nbr_sim, train, users, items, cfg.k, base.user_offset, lo_hi)
        print(f"| {size} | {rmse(y, pred):.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--snapshot")
    where.add_argument("--home")
    parser.add_argument("--widen", type=float, nargs="+", default=[2.5, 5, 10, 0],
                        help="list sizes as multiples of the family's k; 0 = every neighbour")  # fmt: skip
    args = parser.parse_args()
    probe(Path(args.snapshot) if args.snapshot else newest_snapshot(Path(args.home)), args.widen)


if __name__ == "__main__":
    main()
