"""Weighted alternating least squares for implicit top-K (WALS / iALS), task ``topk``.

Objective (SEED.md, preference 1 on observed cells, 0 elsewhere):

    L(U, V) = sum_{(i,j) obs} w_ij (1 - u_i.v_j)^2 + w0 sum_{(i,j) unobs} (u_i.v_j)^2 + lam (|U|^2 + |V|^2)

Observed weights: ``w_ij = 1 + alpha * log(1 + c_ij / eps)`` (Hu, Koren & Volinsky 2008,
log scaling) with ``c_ij`` the train rating (summed over repeats). A 5-star view is
stronger evidence of preference than a 1-star one, but the log keeps the spread to
~1.7x-2.8x, so a rating is still mostly a positive signal: top-K asks "will the user
watch it", not "will they like it".

Each half-sweep minimises over every row with the other side held, never touching the dense
users x items matrix (the Gramian trick): row i's normal equations are

    (w0 V^T V + V_i^T (W_i - w0) V_i + lam I) u_i = V_i^T W_i 1

where V_i are the rows of the items user i interacted with (only nnz work per row on top
of one shared d x d Gramian). Rows without interactions (index 0, cold items) solve to 0.

The default solver (``cg_steps > 0``) takes a few conjugate-gradient steps per row,
warm-started from the previous sweep's factors (Takacs, Pilaszy & Tikk 2011; ``implicit``'s
CPU ALS does the same): the matrix is never formed, each step costs ``O(nnz_i d + d^2)``
per row, in float32 torch, batched over blocks of rows of similar length
(:class:`RowBlocks`). ``cg_steps = 0`` is the exact float64 solve (:func:`solve_rows`), the
reference the tests compare the CG solve with. BENCHMARKS.md, "WALS against implicit",
measures both against ``implicit``.

Iterations are selected by valid NDCG@10 on a fixed sample of valid users (full ranking,
train items excluded); the best iteration's factors are kept.

Scorer (ONNX): ``user_idx [B]`` -> ``scores [B, n_items] = U[user] V^T``; column 0 (padding)
is -1e9. The unknown user (index 0, or out of range) gets train popularity scores
``count_j / max count`` (in [0, 1]) instead of the all-zero factor row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import ranking_metrics
from models.base import ExportSpec, Task, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.layers import UserTopKScorer
from models.runtime import current_runtime
from models.topk import popularity
from models.train import deterministic, format_row, history_row


@dataclass(frozen=True)
class Config:
    # 32 factors: the brief's budget; on MovieLens-1M iALS gains little past 64 at this scale.
    dim: int = 32
    # ALS converges in few sweeps; 10 is enough (each costs O(cg_steps (nnz d + n d^2))).
    iterations: int = 10
    # Weight of every unobserved cell relative to an observed w_ij >= 1. MovieLens
    # users see ~1-5 % of items, so with w0=0.1 the unobserved mass (~20-100x more cells)
    # is ~2-10x the observed mass: strong enough to push unseen items down, not so strong
    # that every score collapses toward 0 (Rendle et al. 2021, "Revisiting iALS").
    omega0: float = 0.1
    # Confidence scaling of observed cells (see module docstring).
    alpha: float = 1.0
    eps: float = 1.0
    # Ridge on the factors, on the scale of one user's observed mass (a MovieLens user has
    # tens of interactions of weight ~2): much smaller and users with a handful of
    # interactions over-fit them (ranking collapses onto their neighbours); much larger
    # and every user tends to the popularity direction.
    lam: float = 20.0
    # Init std of V: small so the first U-solve is dominated by the data, not noise.
    init_std: float = 0.1
    patience: int = 3
    # Users sampled from valid for model selection: full ranking costs n_items per user.
    eval_users: int = 1000
    # Conjugate-gradient steps per row and half-sweep, warm-started from the last sweep: 3 is
    # implicit's default, and with a warm start the rows track the exact solve within a few
    # sweeps (BENCHMARKS.md, "WALS against implicit"). 0 = the exact float64 solve (23-75x slower).
    cg_steps: int = 3
    # The first sweeps start far from the solution (U = 0, V random), where 3 steps trail the
    # exact solve (1M events: loss 0.666 vs 0.655 after sweep 2); these take 2 * cg_steps
    # (0.655), which kept valid NDCG@10 at the exact solve's (BENCHMARKS.md).
    cg_warmup_sweeps: int = 2
    # Gathered float32 factors per block of the CG solve (rows x longest row x dim): 2^20 (4 MiB)
    # stays in cache for the block's steps and amortises torch's per-call overhead; 4x either
    # way measured slower.
    block_floats: int = 1 << 20
    # Observed cells per chunk of the exact solve (memory ~ chunk * d^2 * 8 bytes).
    chunk_nnz: int = 8192
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1 or self.iterations < 1:
            raise ValueError("dim and iterations must be >= 1")
        if self.cg_steps < 0 or self.cg_warmup_sweeps < 0 or self.block_floats < 1 or self.chunk_nnz < 1:
            raise ValueError(
                "cg_steps and cg_warmup_sweeps must be >= 0 (cg_steps 0 = exact solve), "
                "block_floats and chunk_nnz >= 1"
            )
        if not (0 < self.omega0 <= 1):
            raise ValueError(
                f"omega0 must be in (0, 1] (relative to observed weights >= 1), got {self.omega0}"
            )
        if self.lam <= 0:
            raise ValueError(f"lam must be > 0 (it keeps the row solves well-posed), got {self.lam}")


# --- the maths ----------------------------------------------------------------------------
def confidence_weights(counts: sp.csr_matrix, alpha: float, eps: float) -> sp.csr_matrix:
    """``w_ij = 1 + alpha * log(1 + c_ij / eps)`` on the observed cells (same sparsity)."""
    w = counts.tocsr().astype(np.float64, copy=True)
    w.data = 1.0 + alpha * np.log1p(w.data / eps)
    return w


def solve_rows(
    fixed: np.ndarray, weights: sp.csr_matrix, omega0: float, lam: float, chunk_nnz: int = 8192
) -> np.ndarray:
    """Closed-form rows ``x_i`` minimising the objective with the other side ``fixed`` held."""
    fixed = np.asarray(fixed, np.float64)
    d = fixed.shape[1]
    n_rows = weights.shape[0]
    base = omega0 * (fixed.T @ fixed) + lam * np.eye(d)
    out = np.zeros((n_rows, d), dtype=np.float64)
    indptr = weights.indptr
    lo = 0
    while lo < n_rows:
        # rows [lo, hi) with at most chunk_nnz observed cells (at least one row)
        hi = int(np.searchsorted(indptr, indptr[lo] + chunk_nnz, side="right")) - 1
        hi = min(max(hi, lo + 1), n_rows)
        block = weights[lo:hi]
        y = fixed[block.indices]  # [nnz_c, d]
        if hi - lo == 1:
            # One row with many cells (a hit item at 10M events has ~10^5): Y^T W Y as one
            # matmul, never the nnz x d x d stack of outer products (~0.8 GB per 10^5 cells).
            w = block.data.astype(np.float64)
            a = base + (y * (w - omega0)[:, None]).T @ y
            out[lo] = np.linalg.solve(a, y.T @ w)
            lo = hi
            continue
        rows = np.repeat(np.arange(hi - lo), np.diff(block.indptr))
        # segment sums as sparse (rows x nnz) products: empty rows simply get 0
        seg = sp.csr_matrix((block.data - omega0, (rows, np.arange(len(rows)))), shape=(hi - lo, len(rows)))
        outer = (y[:, :, None] * y[:, None, :]).reshape(len(rows), d * d)
        a = base + (seg @ outer).reshape(hi - lo, d, d)
        seg.data = block.data.astype(np.float64)
        b = seg @ y
        out[lo:hi] = np.linalg.solve(a, b[:, :, None])[:, :, 0]
        lo = hi
    return out


def objective(u: np.ndarray, v: np.ndarray, weights: sp.csr_matrix, omega0: float, lam: float) -> float:
    """The weighted objective without the dense matrix: sum over all cells of (u.v)^2 is
    ``sum((U^T U) * (V^T V))``, from which the observed cells are subtracted."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    w = weights.tocoo()
    obs = pred_sq = 0.0
    # In chunks of cells: gathering u[row], v[col] for all 10M cells at once took ~5 GB.
    for lo in range(0, w.nnz, 1 << 20):
        sl = slice(lo, lo + (1 << 20))
        pred = np.einsum("nd,nd->n", u[w.row[sl]], v[w.col[sl]])
        obs += float(np.sum(w.data[sl] * (1.0 - pred) ** 2))
        pred_sq += float(np.sum(pred**2))
    all_sq = float(np.sum((u.T @ u) * (v.T @ v)))
    unobs = omega0 * (all_sq - pred_sq)
    return obs + unobs + lam * float(np.sum(u**2) + np.sum(v**2))


def sweep(
    u: np.ndarray,
    v: np.ndarray,
    weights: sp.csr_matrix,
    omega0: float,
    lam: float,
    chunk_nnz: int = 8192,
    weights_t: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ALS iteration: solve all users given V, then all items given the new U."""
    u = solve_rows(v, weights, omega0, lam, chunk_nnz)
    wt = weights.T.tocsr() if weights_t is None else weights_t
    v = solve_rows(u, wt, omega0, lam, chunk_nnz)
    return u, v


# --- the default solver: conjugate gradient, batched over blocks of rows ------------------
class RowBlocks:
    """A weight matrix's non-empty rows cut into blocks for :func:`solve_rows_cg`, built once
    per fit. Rows are sorted by length and grouped so that rows x the block's longest row stays
    within ``block_cells`` (a longer row is a block alone); shorter rows are padded with weight
    0, which adds nothing to either side of the normal equations."""

    def __init__(self, weights: sp.csr_matrix, omega0: float, block_cells: int):
        indptr, lengths = weights.indptr, np.diff(weights.indptr)
        rows = np.flatnonzero(lengths)
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        n = lengths[rows]
        self.n_rows = weights.shape[0]
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        k = 0
        while k < len(rows):
            lo, hi = k + 1, len(rows)  # largest j with (j - k) * n[j - 1] <= block_cells
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if (mid - k) * n[mid - 1] <= block_cells else (lo, mid - 1)
            block = rows[k:lo]
            pos = np.arange(n[lo - 1])
            pad = pos[None, :] >= lengths[block][:, None]
            cell = np.where(pad, 0, indptr[block][:, None] + pos[None, :])
            cols = np.where(pad, 0, weights.indices[cell]).astype(np.int64)
            w = np.where(pad, 0.0, weights.data[cell]).astype(np.float32)
            w_minus = np.where(pad, 0.0, w - omega0).astype(np.float32)
            self.blocks.append(
                tuple(torch.from_numpy(a) for a in (block.astype(np.int64), cols.ravel(), w, w_minus))
            )
            k = lo


def _cg_block(fixed, gram, x0, block, steps: int, out) -> None:
    """``steps`` CG steps on one block's rows from ``x0``, written into ``out`` (float32)."""
    rows, cols, w, w_minus = block
    y = fixed.index_select(0, cols).view(*w.shape, -1)  # [B, L, d] factors of the row's cells
    y_t = y.transpose(1, 2)
    x = x0.index_select(0, rows)

    def a_times(p):  # (gram + Y^T diag(w - w0) Y) p, per row
        t = torch.bmm(p.unsqueeze(1), y_t).mul_(w_minus.unsqueeze(1))
        return torch.baddbmm(torch.mm(p, gram).unsqueeze(1), t, y).squeeze(1)

    r = torch.bmm(w.unsqueeze(1), y).squeeze(1).sub_(a_times(x))  # b - A x
    p, rs = r.clone(), torch.linalg.vecdot(r, r)
    for _ in range(steps):
        ap = a_times(p)
        alpha = (rs / torch.linalg.vecdot(p, ap).clamp_min_(1e-30)).unsqueeze(1)  # 0 once r = 0
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rs_new = torch.linalg.vecdot(r, r)
        p.mul_((rs_new / rs.clamp_min(1e-30)).unsqueeze(1)).add_(r)
        rs = rs_new
    out.index_copy_(0, rows, x)


def solve_rows_cg(
    fixed: np.ndarray,
    blocks: RowBlocks,
    x0: np.ndarray,
    omega0: float,
    lam: float,
    steps: int,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Rows ``x_i`` after ``steps`` CG steps from ``x0`` on the same normal equations as
    :func:`solve_rows` (float32; empty rows 0). Blocks are independent, so a ``pool`` of
    threads (torch on one intra-op thread each) gives the same result as none."""
    fixed_t = torch.from_numpy(np.ascontiguousarray(fixed, np.float32))
    x0_t = torch.from_numpy(np.ascontiguousarray(x0, np.float32))
    f64 = fixed_t.double()
    d = fixed_t.shape[1]
    gram = (omega0 * (f64.T @ f64) + lam * torch.eye(d, dtype=torch.float64)).float()
    out = torch.zeros(blocks.n_rows, d)

    def work(block):
        _cg_block(fixed_t, gram, x0_t, block, steps, out)

    for _ in pool.map(work, blocks.blocks) if pool else map(work, blocks.blocks):
        pass
    return out.numpy()


def block_objective(u: np.ndarray, v: np.ndarray, blocks: RowBlocks, omega0: float, lam: float) -> float:
    """:func:`objective` over the user ``blocks`` of the CG solve: per-block float32 products
    (cache-sized, not the chunked float64 gathers that cost more than a sweep at 1M events),
    float64 sums; agrees with :func:`objective` to ~1e-6 relative."""
    u_t = torch.from_numpy(np.ascontiguousarray(u, np.float32))
    v_t = torch.from_numpy(np.ascontiguousarray(v, np.float32))
    obs = pred_sq = 0.0
    for rows, cols, w, _ in blocks.blocks:
        y = v_t.index_select(0, cols).view(*w.shape, -1)
        pred = torch.bmm(u_t.index_select(0, rows).unsqueeze(1), y.transpose(1, 2)).squeeze(1)
        obs += float((w * (1.0 - pred).square()).sum(dtype=torch.float64))  # padding: w = 0
        pred_sq += float(pred.square().masked_fill_(w == 0, 0.0).sum(dtype=torch.float64))
    u64, v64 = u_t.double(), v_t.double()
    all_sq = float(((u64.T @ u64) * (v64.T @ v64)).sum())
    return obs + omega0 * (all_sq - pred_sq) + lam * float(u64.square().sum() + v64.square().sum())


def cg_sweep(u, v, blocks: tuple[RowBlocks, RowBlocks], omega0, lam, steps, pool=None):
    """One ALS iteration with the CG row solves: users given V, then items given the new U."""
    u = solve_rows_cg(v, blocks[0], u, omega0, lam, steps, pool)
    return u, solve_rows_cg(u, blocks[1], v, omega0, lam, steps, pool)


# --- scorer -------------------------------------------------------------------------------
class WALSScorer(UserTopKScorer):
    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__(n_users, n_items)
        self.register_buffer("user_factors", torch.zeros(n_users, dim))
        self.register_buffer("item_factors", torch.zeros(n_items, dim))

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.user_factors[u] @ self.item_factors.T  # [B, n_items]


class WALS(TrainedModel):
    family = "wals"
    task = Task.TOPK
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return WALSScorer(meta["n_users"], meta["n_items"], config.dim)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """U ``[n_users, dim]`` and V ``[n_items, dim]`` (row 0 = unknown, zero; cold rows zero)."""
        return self.module.user_factors.numpy().copy(), self.module.item_factors.numpy().copy()

    def export_spec(self) -> ExportSpec:
        return user_topk_spec(self.meta, "scores = U[user] V^T")


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> WALS:
    start = time.perf_counter()
    counts = snapshot.train_matrix("rating")
    if counts.nnz == 0:
        raise ValueError(f"{snapshot.path}: empty train split; wals needs train interactions")
    weights = confidence_weights(counts, config.alpha, config.eps)
    weights_t = weights.T.tocsr()
    rng = np.random.default_rng(config.seed)
    n_users, n_items = snapshot.n_users, snapshot.n_items
    u = np.zeros((n_users, config.dim))
    v = rng.normal(0.0, config.init_std, size=(n_items, config.dim))
    v[np.diff(weights_t.indptr) == 0] = 0.0  # padding row and cold items

    valid = snapshot.ratings("valid")
    relevant = sp.csr_matrix(
        (np.ones(len(valid)), (valid.user_idx, valid.item_idx)), shape=(n_users, n_items)
    )
    candidates = np.flatnonzero(np.diff(relevant.indptr) > 0)
    candidates = candidates[candidates > 0]  # unknown users get popularity, not factors
    eval_users = np.sort(rng.choice(candidates, size=min(config.eval_users, len(candidates)), replace=False))
    train_seen = counts.tocsr()

    if config.cg_steps:  # float32 from here; blocks built once
        u, v = u.astype(np.float32), v.astype(np.float32)
        cells = max(1, config.block_floats // config.dim)
        blocks = (RowBlocks(weights, config.omega0, cells), RowBlocks(weights_t, config.omega0, cells))
    threads = current_runtime().threads
    # Threads take whole blocks (torch on one intra-op thread): no per-call barrier, which on a
    # busy 2-core machine made 2 intra-op threads 5-12x slower, and the same result at any count.
    pool_cm = ThreadPoolExecutor(threads) if config.cg_steps and threads > 1 else nullcontext()
    history, best, best_uv, bad = [], None, None, 0
    setup = time.perf_counter() - start
    with deterministic(config.seed, threads=1), pool_cm as pool:
        for it in range(1, config.iterations + 1):
            t0 = time.perf_counter()
            if config.cg_steps:
                steps = config.cg_steps * (2 if it <= config.cg_warmup_sweeps else 1)
                u, v = cg_sweep(u, v, blocks, config.omega0, config.lam, steps, pool)
                loss = block_objective(u, v, blocks[0], config.omega0, config.lam) / weights.nnz
            else:
                u, v = sweep(u, v, weights, config.omega0, config.lam, config.chunk_nnz, weights_t)
                loss = objective(u, v, weights, config.omega0, config.lam) / weights.nnz
            if len(eval_users):
                m = ranking_metrics(u[eval_users] @ v.T, train_seen, eval_users, relevant)
                metric = m["ndcg@10"]
            else:
                m, metric = {}, None
            seconds = time.perf_counter() - t0 + (setup if it == 1 else 0)
            row = history_row(it, loss, metric, "ndcg@10", weights.nnz, seconds)
            history.append(row)
            log(format_row("wals", row) + (f"  valid_recall@20 {m['recall@20']:.4f}" if m else ""))
            if metric is None or best is None or metric > best:
                best, best_uv, bad = metric, (u.copy(), v.copy()), 0
            else:
                bad += 1
                if bad >= config.patience:
                    log(f"[wals] early stop: no better valid_ndcg@10 for {config.patience} iterations")
                    break
    u, v = best_uv
    module = WALSScorer(n_users, n_items, config.dim)
    module.user_factors.copy_(torch.from_numpy(u.astype(np.float32)))
    module.item_factors.copy_(torch.from_numpy(v.astype(np.float32)))
    module.popularity.copy_(popularity(snapshot))
    meta = {"n_users": n_users, "n_items": n_items}
    return WALS(config, module, meta, history)
