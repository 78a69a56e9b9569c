"""WALS (models/wals.py) against `implicit`'s CPU ALS: seconds per sweep and valid NDCG@10.

    python benchmarks/bench_wals_vs_implicit.py                          # 1M events, 32 and 64 factors
    python benchmarks/bench_wals_vs_implicit.py --events 10000000 --rounds 3
    python benchmarks/bench_wals_vs_implicit.py --snapshot $RECSYS_HOME/snapshots/<hash>
    python benchmarks/bench_wals_vs_implicit.py --exact-sweeps 1        # also time the exact solve

Needs the `bench` extra (`pip install -e '.[bench]'`: implicit 0.7.3).

Data: the synthetic generator at the size's users x items (as bench_ingest_dbt.py), split in
time like the pipeline's default `temporal` split (the last 10 % of events test, the 10 % before
valid, the rest train), straight into a CSR (no warehouse); or a pipeline snapshot's train and
valid splits with --snapshot.

Both solve the same objective (SEED.md): WALS minimises sum_obs w (1 - u.v)^2 + w0 sum_unobs
(u.v)^2 + lam (|U|^2 + |V|^2); implicit minimises sum_obs c (1 - u.v)^2 + sum_unobs (u.v)^2 +
reg (|U|^2 + |V|^2), which is the same divided by w0 with c = w / w0 and reg = lam / w0. Both
start from the same factors (U = 0, V as wals.fit draws it) and take 3 CG steps per row per
half-sweep (implicit's default; wals' cg_steps), except that WALS, as wals.fit does, takes
twice that in its first cg_warmup_sweeps (2) sweeps. Both run on the same number of
threads (implicit's OpenMP threads; WALS' threads over row blocks, torch on one intra-op
thread each), BLAS limited to one thread. The two alternate sweep by sweep in one process
(their order flips every round); a sweep's time is implicit's own per-iteration clock (the fit
callback, which leaves out its per-call transpose) and WALS' cg_sweep call (its row blocks are
built once, timed as setup). "Steady" figures leave out WALS' warm-up rounds; the "all"
ratio divides the sums over every round. After the last round both are scored on the same valid users with
wals.fit's protocol (NDCG@10, full catalogue, train items excluded) and with the seed's
objective (per observed cell).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_ingest_dbt import SHAPES  # noqa: E402

from common.metrics import ranking_metrics  # noqa: E402
from models import wals  # noqa: E402


def synthetic_split(n_events: int, seed: int = 42) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(train counts, valid relevance) users x items from the generator, temporal 80/10/10."""
    import pyarrow.parquet as pq

    from ingest.synthetic import SyntheticConfig, generate

    users, items = SHAPES.get(n_events, (max(50, n_events // 140), max(100, n_events // 900)))
    with tempfile.TemporaryDirectory(prefix="bench-wals-") as tmp:
        out = generate(SyntheticConfig(users, items, n_events, seed), Path(tmp))
        cols = {"user_id": [], "item_id": [], "rating": [], "timestamp": []}
        for part in out.interactions:
            table = pq.read_table(part, columns=list(cols))
            for name in cols:
                cols[name].append(table[name].to_numpy())
    u, i, r, ts = (np.concatenate(cols[c]) for c in ("user_id", "item_id", "rating", "timestamp"))
    order = np.argsort(ts, kind="stable")
    n_test = n_valid = int(np.ceil(0.1 * len(order)))
    train, valid = order[: len(order) - n_test - n_valid], order[len(order) - n_test - n_valid : -n_test]
    shape = (users + 1, items + 1)  # ids are 1-based; row/column 0 stays empty like the padding index
    counts = sp.csr_matrix((r[train], (u[train], i[train])), shape=shape)
    relevant = sp.csr_matrix((np.ones(len(valid)), (u[valid], i[valid])), shape=shape)
    return counts, relevant


def snapshot_split(path: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    from models.data import Snapshot

    snap = Snapshot(path)
    valid = snap.ratings("valid")
    relevant = sp.csr_matrix(
        (np.ones(len(valid)), (valid.user_idx, valid.item_idx)), shape=(snap.n_users, snap.n_items)
    )
    return snap.train_matrix("rating"), relevant


def eval_users(counts: sp.csr_matrix, relevant: sp.csr_matrix, n: int, seed: int) -> np.ndarray:
    candidates = np.flatnonzero((np.diff(relevant.indptr) > 0) & (np.diff(counts.indptr) > 0))
    candidates = candidates[candidates > 0]
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


def ndcg(u, v, counts, relevant, users) -> float:
    return ranking_metrics(np.asarray(u)[users] @ np.asarray(v).T, counts, users, relevant)["ndcg@10"]


def bench_one(counts, relevant, cfg: wals.Config, threads: int, rounds: int, exact_sweeps: int, log=print):
    from implicit.cpu.als import AlternatingLeastSquares

    dim = cfg.dim
    weights = wals.confidence_weights(counts, cfg.alpha, cfg.eps)
    weights_t = weights.T.tocsr()
    rng = np.random.default_rng(cfg.seed)
    u0 = np.zeros((counts.shape[0], dim), np.float32)
    v0 = rng.normal(0.0, cfg.init_std, size=(counts.shape[1], dim)).astype(np.float32)
    v0[np.diff(weights_t.indptr) == 0] = 0.0
    users = eval_users(counts, relevant, cfg.eval_users, cfg.seed)

    t0 = time.perf_counter()
    cells = max(1, cfg.block_floats // dim)
    blocks = (wals.RowBlocks(weights, cfg.omega0, cells), wals.RowBlocks(weights_t, cfg.omega0, cells))
    setup = time.perf_counter() - t0

    conf = weights.astype(np.float32)
    conf.data /= cfg.omega0
    imp = AlternatingLeastSquares(
        factors=dim, regularization=cfg.lam / cfg.omega0, alpha=1.0, iterations=1,
        num_threads=threads, calculate_training_loss=False, random_state=cfg.seed,
    )  # fmt: skip
    imp.cg_steps = cfg.cg_steps
    imp.user_factors, imp.item_factors = u0.copy(), v0.copy()
    clock: list[float] = []

    def implicit_sweep():
        imp.fit(conf, show_progress=False, callback=lambda _it, seconds, _loss: clock.append(seconds))
        return clock[-1]

    u, v = u0, v0
    ours, theirs = [], []
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:

        def our_sweep(steps):
            nonlocal u, v
            t = time.perf_counter()
            u, v = wals.cg_sweep(u, v, blocks, cfg.omega0, cfg.lam, steps, pool)
            return time.perf_counter() - t

        for r in range(rounds):
            steps = cfg.cg_steps * (2 if r < cfg.cg_warmup_sweeps else 1)  # as wals.fit
            if r % 2 == 0:
                ours.append(our_sweep(steps))
                theirs.append(implicit_sweep())
            else:
                theirs.append(implicit_sweep())
                ours.append(our_sweep(steps))
            log(
                f"  {dim} factors, round {r + 1}: wals {ours[-1]:.3f} s ({steps} CG steps), "
                f"implicit {theirs[-1]:.3f} s"
            )

    exact = []
    ue, ve = u0.astype(np.float64), v0.astype(np.float64)
    for _ in range(exact_sweeps):
        t = time.perf_counter()
        ue, ve = wals.sweep(ue, ve, weights, cfg.omega0, cfg.lam, cfg.chunk_nnz, weights_t)
        exact.append(time.perf_counter() - t)
        log(f"  {dim} factors, exact float64 solve: {exact[-1]:.2f} s")
    steady = slice(min(cfg.cg_warmup_sweeps, rounds - 1), None)
    result = {
        "dim": dim,
        "threads": threads,
        "setup_s": setup,
        "ours_s": statistics.median(ours[steady]),
        "implicit_s": statistics.median(theirs[steady]),
        "ratio": statistics.median(o / t for o, t in zip(ours[steady], theirs[steady])),
        "ratio_all": sum(ours) / sum(theirs),
        "ours_ndcg": ndcg(u, v, counts, relevant, users),
        "implicit_ndcg": ndcg(imp.user_factors, imp.item_factors, counts, relevant, users),
        "ours_loss": wals.objective(u, v, weights, cfg.omega0, cfg.lam) / weights.nnz,
        "implicit_loss": wals.objective(imp.user_factors, imp.item_factors, weights, cfg.omega0, cfg.lam)
        / weights.nnz,
        "exact_s": statistics.median(exact) if exact else None,
    }
    if exact_sweeps == rounds:
        result["exact_ndcg"] = ndcg(ue, ve, counts, relevant, users)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--snapshot", help="a pipeline snapshot folder instead of the generator")
    parser.add_argument("--factors", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=2, help="for both libraries (default 2: this machine)")
    parser.add_argument("--rounds", type=int, default=6, help="sweeps of each, alternated")
    parser.add_argument("--block-floats", type=int, default=wals.Config.block_floats)
    parser.add_argument(
        "--cg-warmup-sweeps",
        type=int,
        default=wals.Config.cg_warmup_sweeps,
        help="0: WALS takes implicit's 3 steps from the start, so both run the same algorithm",
    )
    parser.add_argument("--exact-sweeps", type=int, default=0, help="also time the exact float64 solve")
    args = parser.parse_args()

    import implicit.cpu.als  # noqa: F401  (loads its BLAS before the limit below)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    t = time.perf_counter()
    counts, relevant = snapshot_split(args.snapshot) if args.snapshot else synthetic_split(args.events)
    source = args.snapshot or f"synthetic {args.events:,} events"
    print(
        f"{source}: {counts.shape[0] - 1:,} users x {counts.shape[1] - 1:,} items, {counts.nnz:,} train "
        f"cells, {relevant.nnz:,} valid ({time.perf_counter() - t:.1f} s to build)",
        flush=True,
    )
    rows = []
    with threadpool_limits(1, "blas"):
        for dim in args.factors:
            cfg = wals.Config(dim=dim, block_floats=args.block_floats, cg_warmup_sweeps=args.cg_warmup_sweeps)
            rows.append(bench_one(counts, relevant, cfg, args.threads, args.rounds, args.exact_sweeps))
    print(
        f"\n{platform.node()}, torch {torch.__version__}, implicit {implicit.__version__}, "
        f"{args.threads} threads each, {args.rounds} alternated sweeps, block_floats {args.block_floats}, "
        f"cg_warmup_sweeps {args.cg_warmup_sweeps}\n"
    )
    print(
        "| factors | wals s/sweep (steady) | implicit s/sweep | ratio (steady) | ratio (all) | "
        "wals setup s | valid NDCG@10 wals | valid NDCG@10 implicit | objective wals | "
        "objective implicit | exact solve s/sweep |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        exact = f"{r['exact_s']:.2f}" if r["exact_s"] is not None else "–"
        print(
            f"| {r['dim']} | {r['ours_s']:.3f} | {r['implicit_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['ratio_all']:.2f} | {r['setup_s']:.2f} | {r['ours_ndcg']:.4f} | {r['implicit_ndcg']:.4f} | "
            f"{r['ours_loss']:.5f} | {r['implicit_loss']:.5f} | {exact} |"
        )


if __name__ == "__main__":
    main()
