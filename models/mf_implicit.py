"""Matrix factorisation for implicit top-K by mini-batch SGD on the seed's weighted objective, task ``topk``.

Same objective as ``models.wals`` (SEED.md, preference 1 on observed cells, 0 elsewhere):

    L(U, V) = sum_{(u,j) obs} w_uj (1 - u.v_j)^2 + w0 sum_{(u,j) unobs} (u.v_j)^2 + lam (|U|^2 + |V|^2)

with ``w_uj`` from ``wals.confidence_weights`` (``1 + alpha log(1 + c_uj / eps)``), but
optimised by Adam on mini-batches of observed cells instead of closed-form row solves.
Unobserved cells are items 1..n_items-1 the user has no train interaction with (item 0 is
padding). A batch of B observed cells, drawn uniformly without replacement from the nnz
observed cells, gives ``mean over the batch of loss_cell``, an unbiased estimate of ``L / nnz``:

    loss_cell(u, j) = w_uj (1 - p_uj)^2 + unobs_cell(u) + lam (|u|^2 / n_obs_u + |v_j|^2 / n_obs_j)

The L2 term is spread over each row's observed cells (the classical per-rating
regularisation), so one epoch sums it exactly to ``lam (|U|^2 + |V|^2)`` for every row
with a train interaction; rows without one (cold items) are pulled to 0 by the
unobserved term alone. ``unobs_cell`` estimates the user's share ``1 / n_obs_u`` of
``w0 sum_{j unobs(u)} (u.v_j)^2`` in one of two ways (``Config.unobserved``):

* ``"sampled"``: every epoch each observed cell of user u draws ``n_negatives``
  items uniformly from u's unobserved set (exactly, without rejection, see
  ``sample_unobserved``) and weights each by ``w0 * m_u / (n_obs_u * n_negatives)`` with
  ``m_u`` the size of that set. A uniform draw j has ``E[(u.v_j)^2] = S_u / m_u`` with
  ``S_u`` the exact unobserved sum, so one cell's term has expectation ``w0 S_u / n_obs_u``
  and the ``n_obs_u * n_negatives`` draws of an epoch sum to an unbiased estimate of
  ``w0 S_u`` (Horvitz-Thompson with inclusion weight ``m_u / n_draws_u``).
* ``"gramian"``: the exact term, ``w0 (u^T G u / n_obs_u - p_uj^2)`` with
  ``G = V[1:]^T V[1:]`` computed once per batch (O(n_items d^2)): summed over u's observed
  cells it is ``w0 (sum_all (u.v)^2 - sum_obs (u.v)^2)``, the same identity WALS uses.
* ``"gramian_sparse"`` (default): the same exact term with gradients on the batch's rows only, so both
  tables can train sparse. Its value is ``"gramian"``'s; its gradient adds, per cell, the
  item side ``w0 v_j^T G_U v_j / n_obs_j`` (``G_U = U[1:]^T U[1:]``) and holds ``G = G_V``
  and ``G_U`` constant, refreshed every ``GRAM_EVERY`` steps. Summed over an epoch (fresh
  Gramians) the gradient is the exact one: user u gets ``2 w0 (G_V u - sum_obs p_uj v_j)``
  and item j ``2 w0 (G_U v_j - sum_obs p_uj u)``. Rows without a train cell get no gradient
  and start at 0, their optimum. "sampled" weights each draw by ``w0 m_u / (n_obs_u K)``,
  which grows with the catalogue: at ML-25M shape (59k items) its noise kept one epoch below
  popularity, where this estimator beat it (BENCHMARKS.md).

Early stopping on valid NDCG@10 (``models.train.ranking_metrics``, train items excluded)
over a fixed sample of valid users; the best epoch's factors are kept.

Scorer (ONNX), identical convention to WALS: ``user_idx [B]`` -> ``scores [B, n_items] =
U[user] V^T``; column 0 (padding) is -1e9. The unknown user (index 0, or out of range) gets
train popularity scores ``count_j / max count`` (in [0, 1]).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import ranking_metrics
from models.base import ExportSpec, Task, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.distributed import Ranks, broadcast, rank_part
from models.layers import UserTopKScorer
from models.runtime import Budget, Stepper, current_runtime, record_loop, state_copy, to_device
from models.topk import TopKTraining, popularity
from models.train import deterministic, format_row, history_row, loop_report, make_optimizer
from models.unobserved import EpochNegatives, UnobservedSampler, sample_unobserved
from models.wals import confidence_weights

UNOBSERVED = ("sampled", "gramian", "gramian_sparse")
# "gramian_sparse" refreshes its two Gramians every this many steps (O((n_users + n_items) d^2)
# each time: ~1 ms on the default data, ~60 ms at ML-25M shape, where a step takes ~50 ms).
GRAM_EVERY = 16


@dataclass(frozen=True)
class Config(TopKTraining):
    # 64 factors: SGD pays O(d) per sampled cell (not O(d^3) per row as ALS), so a wider
    # model than WALS's 32 is cheap; on MovieLens-sized data implicit MF gains little past 64.
    dim: int = 64
    # Weight of every unobserved cell relative to an observed w_uj >= 1, the same reasoning
    # as WALS: MovieLens users see ~1-5 % of items, so w0 = 0.1 makes the unobserved mass
    # ~2-10x the observed mass: strong enough to push unseen items down, not so strong that
    # every score collapses toward 0 (Rendle et al. 2021, "Revisiting iALS").
    omega0: float = 0.1
    # Confidence scaling of observed cells (wals.confidence_weights).
    alpha: float = 1.0
    eps: float = 1.0
    # Ridge on the factors, on the scale of one user's observed mass as in WALS (the objective
    # is the same). Half WALS's 20: SGD stops early (below the exact optimum), which itself
    # regularises; 20 under-fits and <= 3 over-fits light users (valid NDCG, default snapshot).
    lam: float = 10.0
    # "sampled", "gramian" or "gramian_sparse" (the estimators of the module docstring).
    # "gramian_sparse": exact in expectation at any catalogue size, and as cheap per step as
    # "sampled" (no negatives to draw or score). Default data: test NDCG@10 0.2053 against
    # "sampled"'s 0.1986; ML-25M shape: it beat popularity after one epoch, "sampled" did not.
    unobserved: str = "gramian_sparse"
    # Unobserved draws per observed cell: 8 gives ~8x more unobserved than observed samples
    # per epoch, enough that the estimate's variance is small next to the mini-batch noise
    # of the observed term, at ~2x the cost of the observed cells alone.
    n_negatives: int = 8
    # Adam rather than SGD + momentum: the per-cell gradients differ by orders of magnitude
    # between heavy and light users/items (and between observed and w0-weighted unobserved
    # cells); Adam's per-coordinate scaling converges without tuning a schedule per table.
    # lr 0.003: 0.01 reaches its best valid NDCG in ~5 epochs and then oscillates around it
    # (the w0-weighted unobserved gradients are noisy); 0.003 keeps improving for ~20 epochs.
    lr: float = 0.003
    # 1024 cells per step: ~80 steps per epoch at 80k train cells; big batches keep the
    # per-step Python overhead small next to the maths on 1 thread.
    batch_size: int = 1024
    # Early stopping decides; the cap keeps fit < ~25 s on MovieLens-100k-sized data.
    epochs: int = 60
    patience: int = 4
    # Init std of both tables: small (predictions ~ d * 0.01 ~ 0.6 at most) so the first
    # epochs are driven by the data, big enough to break symmetry.
    init_std: float = 0.1
    # eval_users (valid users ranked for model selection), seed: TopKTraining's.

    def __post_init__(self):
        super().__post_init__()
        if self.dim < 1 or self.epochs < 1 or self.batch_size < 1 or self.n_negatives < 1:
            raise ValueError("dim, epochs, batch_size and n_negatives must be >= 1")
        if not (0 < self.omega0 <= 1):
            raise ValueError(
                f"omega0 must be in (0, 1] (relative to observed weights >= 1), got {self.omega0}"
            )
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.unobserved not in UNOBSERVED:
            raise ValueError(f"unobserved must be one of {UNOBSERVED}, got {self.unobserved!r}")


# --- the maths ----------------------------------------------------------------------------
# Negatives are drawn this many batches of cells at a time (262,144 cells at the default batch).
NEGATIVE_CHUNK_BATCHES = 256


def _unobserved_term(module, u_vec, p, neg, inv_obs_u, n_unobs_u, config, v_vec=None, inv_obs_i=None):
    if config.unobserved == "gramian":
        v = module.item_factors[1:]
        gram = v.T @ v
        return config.omega0 * (inv_obs_u * ((u_vec @ gram) * u_vec).sum(-1) - p * p)
    if config.unobserved == "gramian_sparse":
        items_gram, users_gram = module.grams if module.grams is not None else module.gramians()
        user_side = inv_obs_u * ((u_vec @ items_gram) * u_vec).sum(-1)
        # the item side's gradient only: the value is already counted by the user side
        item_side = inv_obs_i * ((v_vec @ users_gram) * v_vec).sum(-1)
        return config.omega0 * (user_side - p * p + (item_side - item_side.detach()))
    pn = torch.einsum("bd,bkd->bk", u_vec, module.rows("item_factors", neg))
    weight = config.omega0 * n_unobs_u * inv_obs_u / neg.shape[1]
    return weight * (pn * pn).sum(-1)


class _Cells:
    """The observed cells as flat arrays plus what each cell needs for its loss terms."""

    def __init__(self, weights: sp.csr_matrix):
        w = weights.tocsr()
        w.sum_duplicates()
        w.sort_indices()
        self.observed = w
        coo = w.tocoo()
        self.user = coo.row.astype(np.int64)
        self.item = coo.col.astype(np.int64)
        self.weight = coo.data.astype(np.float32)
        n_obs_u = np.diff(w.indptr).astype(np.float64)
        n_obs_i = np.bincount(self.item, minlength=w.shape[1]).astype(np.float64)
        self.inv_obs_u = (1.0 / n_obs_u[self.user]).astype(np.float32)
        self.inv_obs_i = (1.0 / n_obs_i[self.item]).astype(np.float32)
        self.n_unobs_u = ((w.shape[1] - 1) - n_obs_u[self.user]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, idx: np.ndarray, negatives: np.ndarray) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (
                self.user[idx],
                self.item[idx],
                self.weight[idx],
                self.inv_obs_u[idx],
                self.inv_obs_i[idx],
                self.n_unobs_u[idx],
                negatives,
            )
        )


# --- scorer -------------------------------------------------------------------------------
class MFImplicitScorer(UserTopKScorer):
    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.0):
        super().__init__(n_users, n_items)
        self.user_factors = nn.Parameter(torch.randn(n_users, dim) * init_std)
        self.item_factors = nn.Parameter(torch.randn(n_items, dim) * init_std)
        with torch.no_grad():  # padding rows: never trained (item 0 is never a negative)
            self.user_factors[0].zero_()
            self.item_factors[0].zero_()
        # names of the factor tables whose lookups give sparse gradients while training (set by
        # fit from the runtime's sparse_min_rows; models.train.make_optimizer's lazy Adam)
        self.sparse_tables: frozenset[str] = frozenset()
        # "gramian_sparse": (V^T V, U^T U) held constant between refreshes (fit sets them); None
        # computes them afresh for each loss
        self.grams: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def gramians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V^T V, U^T U)`` over the real rows (not the padding rows), without gradient."""
        v, u = self.item_factors[1:], self.user_factors[1:]
        return v.T @ v, u.T @ u

    def rows(self, table: str, idx: torch.Tensor) -> torch.Tensor:
        """``<table>[idx]``; an embedding lookup with a sparse gradient when the table trains
        sparse (indexing otherwise, so a dense fit is unchanged)."""
        weight = getattr(self, table)
        if table in self.sparse_tables:
            return nn.functional.embedding(idx, weight, sparse=True)
        return weight[idx]

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.user_factors[u] @ self.item_factors.T  # [B, n_items]


class MFImplicit(TrainedModel):
    family = "mf_implicit"
    task = Task.TOPK
    config_cls = Config

    @staticmethod
    def loss(module: MFImplicitScorer, batch, config: Config) -> torch.Tensor:
        """Mean over the batch's observed cells of ``loss_cell`` (module docstring): ~ L / nnz.

        ``batch = (user, item, weight, 1/n_obs_user, 1/n_obs_item, n_unobserved_user, negatives [B, K])``.
        """
        u, i, w, inv_obs_u, inv_obs_i, n_unobs_u, neg = batch
        u_vec, v_vec = module.rows("user_factors", u), module.rows("item_factors", i)
        p = (u_vec * v_vec).sum(-1)
        obs = w * (1.0 - p) ** 2
        unobs = _unobserved_term(module, u_vec, p, neg, inv_obs_u, n_unobs_u, config, v_vec, inv_obs_i)
        reg = config.lam * (inv_obs_u * u_vec.pow(2).sum(-1) + inv_obs_i * v_vec.pow(2).sum(-1))
        return (obs + unobs + reg).mean()

    @staticmethod
    def training_batch(snapshot: Snapshot, config: Config, rows: int = 256) -> tuple[torch.Tensor, ...]:
        """The first ``rows`` observed train cells as ``loss``'s batch (negatives: ``config.seed``)."""
        cells = _Cells(confidence_weights(snapshot.train_matrix("rating"), config.alpha, config.eps))
        idx = np.arange(min(rows, len(cells)))
        neg, _ = sample_unobserved(
            cells.observed, cells.user[idx], config.n_negatives, np.random.default_rng(config.seed)
        )
        return cells.batch(idx, neg)

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return MFImplicitScorer(meta["n_users"], meta["n_items"], config.dim)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """U ``[n_users, dim]`` and V ``[n_items, dim]`` (row 0 = unknown, zero)."""
        m = self.module
        return m.user_factors.detach().numpy().copy(), m.item_factors.detach().numpy().copy()

    def export_spec(self) -> ExportSpec:
        return user_topk_spec(self.meta, "scores = U[user] V^T")


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> MFImplicit:
    start = time.perf_counter()
    counts = snapshot.train_matrix("rating")
    if counts.nnz == 0:
        raise ValueError(f"{snapshot.path}: empty train split; mf_implicit needs train interactions")
    cells = _Cells(confidence_weights(counts, config.alpha, config.eps))
    n_users, n_items = snapshot.n_users, snapshot.n_items
    rng = np.random.default_rng(config.seed)

    valid = snapshot.ratings("valid")
    relevant = sp.csr_matrix(
        (np.ones(len(valid)), (valid.user_idx, valid.item_idx)), shape=(n_users, n_items)
    )
    candidates = np.flatnonzero(np.diff(relevant.indptr) > 0)
    candidates = candidates[candidates > 0]  # unknown users get popularity, not factors
    eval_users = np.sort(rng.choice(candidates, size=min(config.eval_users, len(candidates)), replace=False))
    train_seen = cells.observed
    # only "sampled" draws negatives; the Gramian terms need none
    sampler = UnobservedSampler(cells.observed) if config.unobserved == "sampled" else None
    chunk = config.batch_size * NEGATIVE_CHUNK_BATCHES

    history: list[dict] = []
    rt = current_runtime()
    device = rt.torch_device
    with deterministic(config.seed):
        module = MFImplicitScorer(n_users, n_items, config.dim, config.init_std).to(device)
        if config.unobserved == "gramian_sparse":  # rows without a train cell never get a gradient
            with torch.no_grad():  # here: start them at their optimum, 0 (the others push them there)
                cold_users = torch.from_numpy(np.diff(cells.observed.indptr) == 0).to(device)
                cold_items = torch.from_numpy(np.bincount(cells.item, minlength=n_items) == 0).to(device)
                module.user_factors[cold_users] = 0.0
                module.item_factors[cold_items] = 0.0
        # large tables: sparse gradients and a lazy Adam, as train_torch does for nn.Embedding
        # tables (the "gramian" term reads the whole item table, which then stays dense)
        tables = {"user_factors": n_users, "item_factors": n_items if config.unobserved != "gramian" else 0}
        module.sparse_tables = frozenset(n for n, rows in tables.items() if 0 < rt.sparse_rows <= rows)
        opt = make_optimizer(list(module.parameters()), "adam", config.lr,
                             sparse=[getattr(module, n) for n in sorted(module.sparse_tables)])  # fmt: skip
        stepper, budget = Stepper(opt, rt), Budget(config.max_minutes, rt.clock)
        # torchrun: every rank draws the same order and negatives and steps on its part of each batch
        ranks = Ranks(rt, module, lambda m, b: MFImplicit.loss(m, b, config), config.seed, "mf_implicit")
        best, best_state, bad, stopped = None, state_copy(module), 0, "epochs"
        setup = time.perf_counter() - start
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            module.train()
            order = rng.permutation(len(cells))
            # resampled every epoch, NEGATIVE_CHUNK_BATCHES batches of cells at a time
            negatives = None
            if sampler is not None:
                negatives = EpochNegatives(sampler, cells.user[order], config.n_negatives, rng, chunk)
            total, seen, cut = torch.zeros((), dtype=torch.float64, device=device), 0, False
            for k, lo in enumerate(range(0, len(cells), config.batch_size)):
                part = rank_part(len(order[lo : lo + config.batch_size]), rt)
                if part is None:  # fewer rows than ranks
                    continue
                a, b, weight = lo + part[0], lo + part[1], part[2]
                idx = order[a:b]
                drawn = np.zeros((len(idx), 0), dtype=np.int64) if negatives is None else negatives[a:b]
                batch = to_device(cells.batch(idx, drawn), device)
                if config.unobserved == "gramian_sparse" and k % GRAM_EVERY == 0:
                    module.grams = module.gramians()
                with stepper.autocast():
                    loss = ranks.loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"mf_implicit: loss became {loss.item()} in epoch {epoch}; lower lr ({config.lr})"
                    )
                stepper.step(loss if weight == 1.0 else loss * weight)
                with torch.no_grad():  # keep the padding rows at 0 (Adam's momentum would move them)
                    module.user_factors[0].zero_()
                    module.item_factors[0].zero_()
                total += loss.detach().double() * len(idx)
                seen += len(idx)
                if ranks.budget_out(budget, k):  # as models.train.train_torch: validate once at least
                    cut = True
                    break
            if negatives is not None and not cut:
                negatives.finish()
            total, seen = ranks.summed(total, seen)
            if cut and history:
                log(f"[mf_implicit] time budget of {config.max_minutes} min ran out in epoch {epoch}")
                stopped = "budget"
                break
            module.eval()
            m: dict = {}
            if len(eval_users) and rt.rank == 0:  # rank 0 alone validates; every rank gets its metric
                with torch.no_grad():
                    scores = (module.user_factors[eval_users] @ module.item_factors.T).float().cpu().numpy()
                m = ranking_metrics(scores, train_seen, eval_users, relevant)
            metric = broadcast(m.get("ndcg@10"), rt) if len(eval_users) else None
            row = history_row(
                epoch,
                total.item() / seen,
                metric,
                "ndcg@10",
                seen,
                time.perf_counter() - t0 + (setup if epoch == 1 else 0),
            )
            history.append(row)
            log(format_row("mf_implicit", row) + (f"  valid_recall@20 {m['recall@20']:.4f}" if m else ""))
            if metric is None or best is None or metric > best:
                best, best_state, bad = metric, state_copy(module), 0
            else:
                bad += 1
                if bad >= config.patience:
                    log(f"[mf_implicit] early stop: no better valid_ndcg@10 for {config.patience} epochs")
                    stopped = "early_stop"
                    break
            if ranks.budget_out(budget):
                log(f"[mf_implicit] time budget of {config.max_minutes} min ran out after epoch {epoch}")
                stopped = "budget"
                break
    module.to("cpu")
    module.load_state_dict(best_state)
    module.eval()
    with torch.no_grad():
        module.popularity.copy_(popularity(snapshot))
    sparse, module.sparse_tables, module.grams = module.sparse_tables, frozenset(), None
    report = loop_report("mf_implicit", history, True, stopped, budget, rt, sparse=sparse)
    record_loop({**report, **ranks.report()})
    meta = {"n_users": n_users, "n_items": n_items}
    return MFImplicit(config, module, meta, history)
