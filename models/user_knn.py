"""User-user collaborative filtering (memory-based), task ``rating``, and what it shares with
``user_knn_topk`` (``models/user_knn_topk.py``): the neighbour fields and the similarity.

Similarity between users u and v, over the items both rated (I_uv), from ratings centred by
each user's train mean (``c_ui = r_ui - mean_u``), shrunk by support (Koren 2008):
``sim * n_uv / (n_uv + shrink)``, n_uv = |I_uv|; only the top-k positive neighbours per
user are kept (``nbr_idx``/``nbr_sim [n_users, k]``, padding index 0, sim 0).

- ``similarity = "cosine"`` (default): cosine of the mean-centred rating vectors,
  ``sum_{I_uv} c_ui c_vi / (|c_u| |c_v|)``; the norms run over each user's whole row (an
  unrated item counts as "at the user's mean", Sarwar et al. 2001's adjusted cosine on the
  user side), so a pair that agrees on 2 of 300 ratings is not "perfectly similar".
- ``similarity = "pearson"``: the textbook (GroupLens, Resnick et al. 1994) correlation over
  the co-rated items only, each user centred by their mean *over I_uv*, not the user-mean
  approximation; n_uv < 2 or zero variance on I_uv gives 0.

Fitting never builds a dense users x users (or users x items) matrix: cosine accumulates each
user's co-rated users from the sparse matrix and ranks them on the fly (``models.cooccurrence``);
Pearson takes blocks of user rows, ``block_size x n_users`` dense at most per thread, each
keeping only its top-k (``argpartition``).

``user_knn`` (the seed formula, ``prediction = "seed"``):
``r_ui = mean_u + sum_{v in N(u), v rated i} sim(u,v) (r_vi - mean_v) / sum |sim(u,v)|``.
``prediction = "baseline"`` swaps the means for Koren's damped baseline
``b_ui = mu + b_u + b_i`` (kNNBaseline): ``r_ui = b_ui + sum sim (r_vi - b_vi) / sum |sim|``.
Fallbacks, all inside the graph: no neighbour of u rated i -> the empty sum, i.e. mean_u
(seed) or b_ui (baseline); unknown user (0 / out of range) -> the item's damped mean
mu + b_i (the global mean for an unknown item too); clipped to the rating range.
Scorer (ONNX): the standard ``user_idx [B]``, ``item_idx [B] -> rating [B]``. The train
ratings live in the graph as CSR buffers (``models.neighbours.NeighbourRows``, values stored
as ``r_vi - base_v(i)``); each neighbour's cell is found by binary search of its sorted row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import rmse
from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.config import config_family
from models.cooccurrence import cooccurrence_topk
from models.data import Snapshot
from models.item_knn import centred_matrix
from models.neighbours import NeighbourRows
from models.train import format_row, history_row

Log = Callable[[str], None]
SIMILARITIES = ("cosine", "pearson")


# --- configs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeighbourConfig:
    """The neighbour fields user_knn and user_knn_topk share (errors name the family)."""

    # 50 neighbours: the common user-kNN setting on MovieLens (Herlocker et al. 1999 found
    # 20-60 best; Surprise/LensKit use 40-50); more only adds weakly similar users.
    k: int = 50
    # Shrinkage toward 0 by co-rated count; 100 as in Koren 2008 (Netflix/MovieLens), so two
    # users who share 3 ratings cannot reach similarity ~1.
    shrink: float = 100.0
    # "cosine" (mean-centred, full-row norms) or "pearson" (co-rated items only): docstring.
    similarity: str = "cosine"
    # Users per task: cosine's compiled top-k holds n_users x 8 bytes per thread whatever the
    # block; Pearson's block product ~ block * n_users * 56 bytes per thread (torch's thread
    # count; 138k users, 128 -> ~1 GB), independent of n_items.
    block_size: int = 128

    def __post_init__(self):
        family = config_family(type(self))
        if self.k < 1:
            raise ValueError(f"{family}: k must be >= 1, got {self.k}")
        if self.shrink < 0:
            raise ValueError(f"{family}: shrink must be >= 0, got {self.shrink}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"{family}: similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.block_size < 1:
            raise ValueError(f"{family}: block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class Config(NeighbourConfig):
    # "seed" (mean-centred formula) or "baseline" (kNNBaseline): see the module docstring.
    prediction: str = "seed"
    # Damping of the baseline's item and user biases (pseudo-ratings at the global mean),
    # Koren 2008's lambda2 = 25, lambda3 = 10; also the unknown user's item-mean fallback.
    item_damping: float = 25.0
    user_damping: float = 10.0
    # (user, item) rows per scorer call when scoring valid rows during fit (memory ~ batch * k).
    eval_batch: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.prediction not in ("seed", "baseline"):
            raise ValueError(f"user_knn: prediction must be 'seed' or 'baseline', got {self.prediction!r}")
        if self.item_damping < 0 or self.user_damping < 0:
            raise ValueError(f"user_knn: item_damping and user_damping must be >= 0, got {self}")
        if self.eval_batch < 1:
            raise ValueError(f"user_knn: eval_batch must be >= 1, got {self.eval_batch}")


# --- similarity ---------------------------------------------------------------------------
def _block_pearson(
    c: sp.csr_matrix, ones: sp.csr_matrix, c2: sp.csr_matrix, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pearson over I_uv and co-rated counts ``[hi - lo, n_users]`` of users ``lo:hi`` against
    every user (``c2`` = c squared element-wise), in float64.

    The block's rows are densified (``block x n_items``) and every product is sparse @ dense,
    ``[n_users, n_items] @ [n_items, block]``: at these densities (1-4 %) faster than sparse @
    sparse, whose output is nearly dense anyway (10M events: 62k of 70k users per row)."""

    def against_all(m: sp.csr_matrix, block: np.ndarray) -> np.ndarray:  # [b, n_users]
        return np.asarray(m @ block.T).T

    cb, ob = c[lo:hi].toarray(), ones[lo:hi].toarray()
    common = against_all(ones, ob)
    dot = against_all(c, cb)
    # From sums over I_uv (shift-invariant, so the user-centred c keeps the cancellation
    # small): cov = S_uv - s_u s_v / n, var_u = Q_u - s_u^2 / n.
    s_u = against_all(ones, cb)  # [u, v] = sum of u's centred ratings over I_uv
    s_v = against_all(c, ob)  # [u, v] = sum of v's centred ratings over I_uv
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.where(common > 0, common, 1.0)
        cov = dot - s_u * s_v / n
        var_u = against_all(ones, cb * cb) - s_u * s_u / n
        var_v = against_all(c2, ob) - s_v * s_v / n
        ok = (common >= 2) & (var_u > 1e-9) & (var_v > 1e-9)
        sim = np.where(ok, cov / np.sqrt(np.where(ok, var_u * var_v, 1.0)), 0.0)
    return sim, common


def _top_k(sim: np.ndarray, cand: np.ndarray, k: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """The k positive largest per row, by similarity then index (deterministic); 0-padded."""
    sim = np.where((cand == np.arange(lo, lo + len(cand))[:, None]) | (cand == 0) | (sim < 0), 0.0, sim)
    order = np.lexsort((cand, -sim), axis=1)[:, :k]
    top, top_sim = np.take_along_axis(cand, order, 1), np.take_along_axis(sim, order, 1)
    keep = top_sim > 0
    return np.where(keep, top, 0), np.where(keep, top_sim, 0.0)


def user_similarity_topk(
    train: sp.csr_matrix, k: int, shrink: float, similarity: str = "cosine", block_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positive shrunk neighbours per user: ``nbr_idx, nbr_sim [n_users, k]`` (0-padded).

    Cosine is compiled (``models.cooccurrence``): the rows are scaled to unit norm in float32
    and each user's co-rated users are accumulated over its items in index order, so the
    similarities equal the blocked float32 scipy product ``cn @ cn.T`` bit for bit (float32
    differs from a float64 product by ~1e-7 relative, so only exact near-ties can order
    differently); ``block_size`` users per task. Pearson, with its cancelling sums, is taken in
    float64 blocks of ``block_size x n_users``. Both run on ``torch.get_num_threads()`` threads."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    c, _, _ = centred_matrix(train)  # explicit zeros kept: a rating at the mean is still co-rated
    n_users = c.shape[0]
    k = min(k, max(n_users - 1, 1))
    c2 = c.multiply(c).tocsr()
    if similarity == "cosine":
        norms = np.sqrt(np.asarray(c2.sum(axis=1)).ravel())
        inv_norm = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        cn = c.astype(np.float32)  # rows scaled to unit norm: the product is the cosine
        cn.data *= np.repeat(inv_norm, np.diff(c.indptr)).astype(np.float32)
        # sim = dot * (n / (n + shrink)) in float32, n the co-rated count
        unit = np.ones(n_users, dtype=np.float32)
        return cooccurrence_topk(cn, k, unit, shrink + 1e-12, 0.0, torch.get_num_threads(), block_size)
    ones = c.copy()
    ones.data = np.ones_like(ones.data)

    def block(lo: int) -> tuple[np.ndarray, np.ndarray]:  # this block against every user
        hi = min(lo + block_size, n_users)
        sim, common = _block_pearson(c, ones, c2, lo, hi)
        sim *= common / (common + shrink + 1e-12)
        sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # a user is not their own neighbour
        sim[:, 0] = 0.0
        cand = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, -k:]
        return _top_k(np.take_along_axis(sim, cand, 1), cand, k, lo)

    nbr_idx = np.zeros((n_users, k), dtype=np.int64)
    nbr_sim = np.zeros((n_users, k), dtype=np.float32)
    starts = range(0, n_users, block_size)
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for lo, (idx, sim) in zip(starts, pool.map(block, starts)):
            nbr_idx[lo : lo + len(idx)], nbr_sim[lo : lo + len(idx)] = idx, sim
    return nbr_idx, nbr_sim


# --- rating -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    """What a prediction starts from: ``base(u, i) = user_offset[u] + item_offset[i]``."""

    user_offset: np.ndarray  # [n_users]
    item_offset: np.ndarray  # [n_items]
    item_fallback: np.ndarray  # [n_items], the unknown user's prediction: mu + b_i
    global_mean: float


def baseline(train: sp.csr_matrix, config: Config) -> Baseline:
    """Seed: mean_u + 0; baseline: (mu + b_u) + b_i with Koren's damped biases."""
    train = train.tocsr()
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    r = train.data.astype(np.float64)
    mu = float(r.mean())
    n_u = np.bincount(rows, minlength=train.shape[0])
    n_i = np.bincount(train.indices, minlength=train.shape[1])
    b_i = np.bincount(train.indices, weights=r - mu, minlength=train.shape[1]) / (n_i + config.item_damping)
    b_i = np.where(n_i > 0, b_i, 0.0)
    b_i[0] = 0.0
    if config.prediction == "seed":
        sums = np.bincount(rows, weights=r, minlength=train.shape[0])
        user_offset = np.where(n_u > 0, sums / np.maximum(n_u, 1), mu)
        item_offset = np.zeros(train.shape[1])
    else:
        b_u = np.bincount(rows, weights=r - mu - b_i[train.indices], minlength=train.shape[0])
        b_u = np.where(n_u > 0, b_u / (n_u + config.user_damping), 0.0)
        user_offset, item_offset = mu + b_u, b_i
    user_offset[0] = mu
    return Baseline(user_offset, item_offset, mu + b_i, mu)


def residual_matrix(train: sp.csr_matrix, base: Baseline) -> sp.csr_matrix:
    """``r_vi - base(v, i)`` with train's sparsity (explicit zeros kept: still "rated")."""
    train = train.tocsr()
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    res = train.astype(np.float64, copy=True)
    res.data = res.data - base.user_offset[rows] - base.item_offset[train.indices]
    return res


def predict_numpy(
    nbr_idx: np.ndarray,
    nbr_sim: np.ndarray,
    base: Baseline,
    train: sp.csr_matrix,
    rating_range: tuple[float, float],
    user_idx: np.ndarray,
    item_idx: np.ndarray,
) -> np.ndarray:
    """Reference predictor written row by row from the formula (tests check the scorer against it)."""
    train = train.tocsr()
    out = np.empty(len(user_idx))
    for n, (u, i) in enumerate(zip(np.asarray(user_idx), np.asarray(item_idx))):
        if not 0 < u < train.shape[0]:
            pred = base.item_fallback[i] if 0 < i < train.shape[1] else base.global_mean
        else:
            i = i if 0 < i < train.shape[1] else 0
            num = den = 0.0
            for v, s in zip(nbr_idx[u], nbr_sim[u]):
                if v == 0 or s == 0:
                    continue
                row = dict(zip(train.indices[train.indptr[v] : train.indptr[v + 1]].tolist(),
                               train.data[train.indptr[v] : train.indptr[v + 1]].tolist()))  # fmt: skip
                if i in row:
                    num += s * (row[i] - base.user_offset[v] - base.item_offset[i])
                    den += abs(s)
            pred = base.user_offset[u] + base.item_offset[i] + (num / den if den > 0 else 0.0)
        out[n] = min(max(pred, rating_range[0]), rating_range[1])
    return out.astype(np.float32)


class UserKNNScorer(nn.Module):
    def __init__(self, n_users: int, n_items: int, k: int, nnz: int, max_row: int, lo: float, hi: float):
        super().__init__()
        self.rows = NeighbourRows(n_users, n_items, nnz, max_row)  # values: r_vi - base(v, i)
        self.register_buffer("nbr_idx", torch.zeros(n_users, k, dtype=torch.int64))
        self.register_buffer("nbr_sim", torch.zeros(n_users, k))
        self.register_buffer("user_offset", torch.zeros(n_users))
        self.register_buffer("item_offset", torch.zeros(n_items))
        self.register_buffer("item_fallback", torch.zeros(n_items))  # index 0 = global mean
        self.n_users, self.n_items = n_users, n_items
        self.rating_min, self.rating_max = float(lo), float(hi)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        known = (user_idx > 0) & (user_idx < self.n_users)
        u = torch.where(known, user_idx, torch.zeros_like(user_idx))
        i = torch.where((item_idx > 0) & (item_idx < self.n_items), item_idx, torch.zeros_like(item_idx))
        sim = self.nbr_sim[u]  # [B, k]
        residual, found = self.rows.lookup(self.nbr_idx[u], i)  # item 0 is in no row: never found
        w = torch.where(found, sim, torch.zeros_like(sim))
        num = (w * residual).sum(dim=1)
        den = w.abs().sum(dim=1)
        base = self.user_offset[u] + self.item_offset[i]
        pred = torch.where(den > 0, base + num / den.clamp(min=1e-12), base)
        pred = torch.where(known, pred, self.item_fallback[i])
        return pred.clamp(self.rating_min, self.rating_max)


class UserKNN(TrainedModel):
    family = "user_knn"
    task = Task.RATING
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return UserKNNScorer(
            meta["n_users"], meta["n_items"], meta["k"], meta["nnz"], meta["max_row"], *meta["rating_range"]
        )

    def export_spec(self) -> ExportSpec:
        g = torch.Generator().manual_seed(0)
        users = torch.randint(1, self.meta["n_users"], (4,), generator=g)
        items = torch.randint(1, self.meta["n_items"], (4,), generator=g)
        users[0] = 0  # unknown user
        items[1] = 0  # unknown item
        k, max_row = self.meta["k"], self.meta["max_row"]
        return ExportSpec(
            inputs=(TensorSpec("user_idx", "int64", ("batch",)), TensorSpec("item_idx", "int64", ("batch",))),
            outputs=(TensorSpec("rating", "float32", ("batch",)),),
            example_inputs=(users, items),
            notes=(
                f"user-user kNN ({self.config.prediction}): base(u,i) + sum sim (r_vi - base(v,i)) / sum "
                "|sim| over u's neighbours who rated i, the train ratings being in-graph CSR buffers; "
                "no such neighbour -> base(u,i) (seed: the user's train mean); unknown user -> damped "
                "item mean, unknown item too -> global mean; clipped to meta.rating_range. Memory per "
                f"call ~ batch * k * 8 bytes per binary-search step ({max(max_row, 1).bit_length()} "
                f"steps, k = {k})"
            ),
        )


@torch.no_grad()
def predict(model: UserKNN, user_idx: np.ndarray, item_idx: np.ndarray, batch: int = 4096) -> np.ndarray:
    scorer = model.scorer()
    users, items = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
    out = [
        scorer(torch.from_numpy(users[lo : lo + batch]), torch.from_numpy(items[lo : lo + batch])).numpy()
        for lo in range(0, len(users), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_ratings(snapshot: Snapshot, family: str) -> tuple[sp.csr_matrix, int]:
    """The train ratings (users x items CSR) and their count; refuses an empty train split."""
    train = snapshot.train_matrix("rating")
    if train.nnz == 0:
        raise ValueError(f"{snapshot.path}: empty train split; {family} needs train ratings")
    return train, train.nnz


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> UserKNN:
    start = time.perf_counter()
    train, n_rows = train_ratings(snapshot, "user_knn")
    lo, hi = (float(x) for x in snapshot.meta.get("rating_range", (train.data.min(), train.data.max())))
    nbr_idx, nbr_sim = user_similarity_topk(
        train, config.k, config.shrink, config.similarity, config.block_size
    )
    base = baseline(train, config)
    rows = NeighbourRows.from_csr(residual_matrix(train, base))
    meta = {
        **rows.meta(),
        "k": int(nbr_idx.shape[1]),
        "rating_range": [lo, hi],
        "global_mean": base.global_mean,
    }
    module = UserKNN.build_module(config, meta)
    module.rows.load_state_dict(rows.state_dict())
    for name, value in (
        ("nbr_idx", nbr_idx),
        ("nbr_sim", nbr_sim),
        ("user_offset", base.user_offset),
        ("item_offset", base.item_offset),
        ("item_fallback", base.item_fallback),
    ):
        getattr(module, name).copy_(torch.from_numpy(np.asarray(value)).to(getattr(module, name).dtype))
    model = UserKNN(config, module, meta)
    valid = snapshot.ratings("valid")
    metric = (
        rmse(valid.rating, predict(model, valid.user_idx, valid.item_idx, config.eval_batch))
        if len(valid)
        else None
    )
    # memory-based: nothing is optimised, so train_loss is None (JSON null, not NaN)
    row = history_row(1, None, metric, "rmse", n_rows, time.perf_counter() - start)
    model.history = [row]
    log(
        format_row("user_knn", row) + f"  (k={nbr_idx.shape[1]}, shrink={config.shrink}, {config.similarity})"
    )
    return model
