"""Item-item collaborative filtering (memory-based), task ``rating``.

Seed formula: ``r_ui = sum_j sim(i,j) r_uj / sum_j |sim(i,j)|`` over the neighbours j of i
that u rated (``prediction = "seed"``). The default, ``prediction = "item_centred"``, is the
same weighted average taken over deviations from each item's (damped) mean, the item-side
mirror of the seed's mean-centred user-user formula:
``r_ui = m_i + sum_j sim(i,j) (r_uj - m_j) / sum_j |sim(i,j)|``. It keeps what an item's
average already says and lets neighbours move it, which is what makes item-kNN beat the
item-mean (popularity) predictor rather than merely match it.

Similarity is the adjusted cosine (Sarwar et al. 2001): every rating is
centred by its user's mean, then ``sim(i,j) = <c_i, c_j> / (|c_i| |c_j|)`` between the
centred item columns (a user who did not rate an item contributes 0 = "at their mean"),
shrunk by support: ``sim * n_ij / (n_ij + shrink)`` with n_ij the number of co-raters
(Koren 2008). Only the top-k positive neighbours per item are kept.

Fitting never builds a dense users x items or items x items matrix: each item's co-rated items
are accumulated from the sparse centred matrix and ranked on the fly (``models.cooccurrence``).

Scorer (ONNX): ``item_idx [B]``, ``hist_item_idx [B, L]`` and ``hist_rating [B, L]`` (the
user's train ratings, 0-padded; any order; of a duplicated item the first slot counts) -> ``rating [B]``. The
neighbour lists are buffers ``nbr_idx``/``nbr_sim [n_items, k]`` (padding: index 0, sim 0).
Fallback when none of i's neighbours was rated: item_centred -> the item's damped mean
(global mean for an unknown item); seed -> the user's mean over the given history, else the
item's mean, else the global train mean. Clipped to the rating range.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.budget import DEFAULT_SCORE_MEMORY_BYTES, row_chunks
from common.metrics import rmse
from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.cooccurrence import cooccurrence_topk
from models.data import Snapshot
from models.neighbours import csr_cells, lower_bound
from models.train import format_row, history_row


@dataclass(frozen=True)
class Config:
    # 40 neighbours: the usual item-kNN setting (Surprise's default k); past ~50 the extra
    # neighbours are weakly similar and only dilute the average.
    k: int = 40
    # Shrinkage toward 0 by co-rater count; 100 is Koren's setting for item-item on
    # Netflix/MovieLens and stops 2-user overlaps from reaching similarity ~1.
    shrink: float = 100.0
    # Items per task of the compiled item x item top-k (models.cooccurrence); its memory is
    # one accumulator of n_items x 16 bytes per thread, whatever the block.
    block_size: int = 512
    # Rows per batch when scoring valid rows during fit (at most; the batch also shrinks so
    # that batch x (history + k) x BYTES_PER_SLOT stays within the scoring memory budget).
    eval_batch: int = 1024
    # "item_centred" (default, see the module docstring) or "seed" (the plain weighted average).
    prediction: str = "item_centred"
    # Item means are shrunk toward the global mean by this many pseudo-ratings, so an item
    # rated twice does not anchor predictions at its two ratings (the popularity baseline
    # uses the same damping, so the comparison is like for like).
    mean_damping: float = 10.0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {self.shrink}")
        if self.prediction not in ("item_centred", "seed"):
            raise ValueError(f"prediction must be 'item_centred' or 'seed', got {self.prediction!r}")
        if self.mean_damping < 0:
            raise ValueError(f"mean_damping must be >= 0, got {self.mean_damping}")


# --- fitting ------------------------------------------------------------------------------
def centred_matrix(train: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Ratings minus each user's mean, same sparsity (explicit zeros kept); user means and counts."""
    train = train.tocsr()
    counts = np.diff(train.indptr)
    sums = np.asarray(train.sum(axis=1)).ravel()
    means = np.divide(sums, counts, out=np.zeros_like(sums, dtype=np.float64), where=counts > 0)
    centred = train.astype(np.float64, copy=True)
    centred.data = centred.data - np.repeat(means, counts)
    return centred, means, counts


def item_similarity_topk(
    train: sp.csr_matrix, k: int, shrink: float, block_size: int = 512, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positive shrunk adjusted-cosine neighbours per item: ``nbr_idx, nbr_sim [n_items, k]``.

    Compiled (``models.cooccurrence``): each item's co-rated items are accumulated once, in
    float64, over its raters in index order, so the similarities equal the blocked scipy product
    ``centred.T @ centred`` bit for bit; ``block_size`` items per task on ``threads`` threads
    (default ``torch.get_num_threads()``); ties go to the lower index."""
    centred, _, _ = centred_matrix(train)
    n_items = train.shape[1]
    k = min(k, max(n_items - 1, 1))
    cc = centred.tocsc()
    norms = np.sqrt(np.asarray(cc.multiply(cc).sum(axis=0)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    # sim = dot * inv_i * inv_j * (common / (common + shrink + 1e-12)); negatives dropped
    threads = torch.get_num_threads() if threads is None else threads
    return cooccurrence_topk(cc.T.tocsr(), k, inv, shrink, 1e-12, threads, block_size)


def history_arrays(
    train: sp.csr_matrix, user_idx: np.ndarray, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's ``hist_item_idx, hist_rating [B, L]`` for users (0-padded, L = longest row).

    With ``max_len`` only the first ``max_len`` items by index are kept (the exporter should
    prefer the full history: truncation changes predictions).
    """
    rows = train[np.asarray(user_idx)]
    lengths = np.diff(rows.indptr)
    length = max(int(lengths.max(initial=0)), 1)
    if max_len is not None:
        length = min(length, max_len)
    items = np.zeros((len(lengths), length), dtype=np.int64)
    ratings = np.zeros((len(lengths), length), dtype=np.float32)
    pos = np.arange(len(rows.indices)) - np.repeat(rows.indptr[:-1], lengths)
    r = np.repeat(np.arange(len(lengths)), lengths)
    keep = pos < length
    items[r[keep], pos[keep]] = rows.indices[keep]
    ratings[r[keep], pos[keep]] = rows.data[keep]
    return items, ratings


def predict_numpy(
    nbr_idx: np.ndarray,
    nbr_sim: np.ndarray,
    item_mean: np.ndarray,
    global_mean: float,
    rating_range: tuple[float, float],
    train: sp.csr_matrix,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    centred: bool = True,
) -> np.ndarray:
    """Reference predictor, written row by row from the formula (tests check the scorer against it)."""
    out = np.empty(len(user_idx), dtype=np.float64)
    for n, (u, i) in enumerate(zip(np.asarray(user_idx), np.asarray(item_idx))):
        lo, hi = train.indptr[u], train.indptr[u + 1]
        rated = dict(zip(train.indices[lo:hi].tolist(), train.data[lo:hi].tolist()))
        num = den = 0.0
        for j, s in zip(nbr_idx[i], nbr_sim[i]):
            if j != 0 and s != 0 and j in rated:
                num += s * (rated[j] - (item_mean[j] if centred else 0.0))
                den += abs(s)
        m_i = float(item_mean[i]) if 0 < i < len(item_mean) else global_mean
        if den > 0:
            pred = (m_i if centred else 0.0) + num / den
        elif centred and 0 < i < len(item_mean):
            pred = m_i
        elif rated:
            pred = float(np.mean(list(rated.values())))
        else:
            pred = m_i
        out[n] = min(max(pred, rating_range[0]), rating_range[1])
    return out.astype(np.float32)


# --- scorer -------------------------------------------------------------------------------
class ItemKNNScorer(nn.Module):
    def __init__(self, n_items: int, k: int, rating_min: float, rating_max: float, centred: bool = True):
        super().__init__()
        # 1.0 = item-centred prediction, 0.0 = the seed's plain weighted average (a multiplier,
        # not a Python branch, so one graph serves both).
        self.register_buffer("centre", torch.tensor(1.0 if centred else 0.0))
        self.register_buffer("nbr_idx", torch.zeros(n_items, k, dtype=torch.int64))
        self.register_buffer("nbr_sim", torch.zeros(n_items, k))
        # Item train mean; items without train ratings (and index 0) hold the global mean,
        # so the fallback chain item mean -> global mean is one Gather.
        self.register_buffer("item_mean", torch.zeros(n_items))
        self.rating_min, self.rating_max = float(rating_min), float(rating_max)

    def forward(self, item_idx: torch.Tensor, hist_item_idx: torch.Tensor, hist_rating: torch.Tensor):
        n_items = self.item_mean.shape[0]
        item_idx = torch.where((item_idx >= 0) & (item_idx < n_items), item_idx, torch.zeros_like(item_idx))
        nbr = self.nbr_idx[item_idx]  # [B, k]
        sim = self.nbr_sim[item_idx]  # [B, k]
        present = hist_item_idx != 0  # [B, L]
        # Each neighbour's rating is found by a binary search in the history sorted by item:
        # [B, L] to sort plus [B, k] per search step, where comparing every neighbour with every
        # history slot held [B, k, L] (hours at ML-25M shape, where histories reach 15k items).
        # The sort key is item x width + slot: the first of duplicate items sorts first in any
        # runtime (a stable sort does not export), and unknown ids read as padding (item 0).
        width = hist_item_idx.shape[1]
        known = (hist_item_idx > 0) & (hist_item_idx < n_items)
        slot = torch.arange(width, device=nbr.device).unsqueeze(0)
        key = torch.where(known, hist_item_idx, 0) * width + slot
        keys, order = torch.sort(key, dim=1)
        pos, at = lower_bound(keys, nbr * width, n_items)
        found = (at < (nbr + 1) * width) & (nbr != 0)
        rating = hist_rating.gather(1, order.gather(1, pos.clamp(max=width - 1)))
        deviation = rating - self.centre * self.item_mean[nbr]  # [B, k]
        zero = torch.zeros_like(sim)
        # A row's prediction must not depend on how wide its batch is padded or on who shares
        # the batch, so that scoring in memory-sized chunks gives exactly the unchunked scores:
        # the k neighbours are added in order with a running sum, which both runtimes compute
        # sequentially (a reduction over k regrouped its additions with the batch size in
        # onnxruntime).
        num = torch.where(found, sim * deviation, zero).cumsum(dim=1)[:, -1]
        den = torch.where(found, sim.abs(), zero).cumsum(dim=1)[:, -1]
        n_hist = present.to(hist_rating.dtype).sum(dim=1)
        user_mean = (hist_rating * present.to(hist_rating.dtype)).sum(dim=1) / n_hist.clamp(min=1.0)
        item_mean = self.item_mean[item_idx]
        seed_fallback = torch.where(n_hist > 0, user_mean, item_mean)
        centred_fallback = torch.where(item_idx > 0, item_mean, seed_fallback)
        fallback = self.centre * centred_fallback + (1 - self.centre) * seed_fallback
        pred = torch.where(den > 0, self.centre * item_mean + num / den.clamp(min=1e-12), fallback)
        return pred.clamp(self.rating_min, self.rating_max)


class ItemKNN(TrainedModel):
    family = "item_knn"
    task = Task.RATING
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return ItemKNNScorer(
            meta["n_items"], meta["k"], *meta["rating_range"], centred=config.prediction == "item_centred"
        )

    def export_spec(self) -> ExportSpec:
        n_items = self.meta["n_items"]
        g = torch.Generator().manual_seed(0)
        items = torch.randint(1, n_items, (4,), generator=g)
        items[0] = 0  # unknown item
        hist = torch.randint(1, n_items, (4, 7), generator=g)
        hist[1] = 0  # unknown user: empty history
        hist[2, 3:] = 0  # short history, right-padded
        ratings = torch.where(hist > 0, torch.randint(1, 6, (4, 7), generator=g).float(), 0.0)
        return ExportSpec(
            inputs=(
                TensorSpec("item_idx", "int64", ("batch",)),
                TensorSpec("hist_item_idx", "int64", ("batch", "history")),
                TensorSpec("hist_rating", "float32", ("batch", "history")),
            ),
            outputs=(TensorSpec("rating", "float32", ("batch",)),),
            example_inputs=(items, hist, ratings),
            notes=(
                "hist_* = the user's train ratings, 0-padded (use models.item_knn.history_arrays); "
                "no neighbour rated -> user's mean over hist, else item train mean, else global "
                "mean; clipped to meta.rating_range. Memory per call ~ batch * (history + k). A history "
                "longer than n_items (duplicates, unknown ids) may miss neighbours."
            ),
        )


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> ItemKNN:
    start = time.perf_counter()
    train = snapshot.train_matrix("rating")
    r = snapshot.ratings("train")
    if len(r) == 0:
        raise ValueError(f"{snapshot.path}: empty train split; item_knn needs train ratings")
    lo, hi = (float(x) for x in snapshot.meta.get("rating_range", (r.rating.min(), r.rating.max())))
    nbr_idx, nbr_sim = item_similarity_topk(train, config.k, config.shrink, config.block_size)
    global_mean = float(r.rating.mean())
    counts = np.bincount(r.item_idx, minlength=snapshot.n_items)
    sums = np.bincount(r.item_idx, weights=r.rating, minlength=snapshot.n_items)
    item_mean = (sums + config.mean_damping * global_mean) / np.maximum(counts + config.mean_damping, 1e-12)
    item_mean = np.where(counts > 0, item_mean, global_mean)
    item_mean[0] = global_mean
    meta = {
        "n_items": snapshot.n_items,
        "k": int(nbr_idx.shape[1]),
        "rating_range": [lo, hi],
        "global_mean": global_mean,
    }
    module = ItemKNNScorer(
        snapshot.n_items, nbr_idx.shape[1], lo, hi, centred=config.prediction == "item_centred"
    )
    module.nbr_idx.copy_(torch.from_numpy(nbr_idx))
    module.nbr_sim.copy_(torch.from_numpy(nbr_sim))
    module.item_mean.copy_(torch.from_numpy(item_mean.astype(np.float32)))
    model = ItemKNN(config, module, meta)

    valid = snapshot.ratings("valid")
    metric = (
        rmse(valid.rating, predict(model, train, valid.user_idx, valid.item_idx, config.eval_batch))
        if len(valid)
        else None
    )
    # memory-based: nothing is optimised, so train_loss is None (JSON null, not NaN)
    row = history_row(1, None, metric, "rmse", len(r), time.perf_counter() - start)
    model.history = [row]
    log(format_row("item_knn", row) + f"  (k={nbr_idx.shape[1]}, shrink={config.shrink})")
    return model


# Peak bytes the scorer holds per (row, history slot): the sorted history and its order (int64
# each) beside the inputs; 48 leaves room for a runtime that keeps more temporaries alive.
# Per (row, neighbour) it holds a few [B, k] tensors, which the history term bounds (k <= L
# is not assumed: the budget adds them, see ``predict``).
BYTES_PER_SLOT = 48


def by_history_length(train: sp.csr_matrix, user_idx: np.ndarray) -> np.ndarray:
    """Row order that groups users with similar history lengths.

    A batch is padded to its longest history and costs batch x k x L, so mixing one heavy
    user into every batch made the 10M-event benchmark's scoring ~15x slower than sorted.
    """
    return np.argsort(np.diff(train.indptr)[np.asarray(user_idx)], kind="stable")


@torch.no_grad()
def predict(
    model: ItemKNN,
    train: sp.csr_matrix,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    batch: int = 1024,
    memory_bytes: int = DEFAULT_SCORE_MEMORY_BYTES,
) -> np.ndarray:
    """Score (user, item) rows through the scorer, building each batch's history from ``train``.

    Batches hold at most ``batch`` rows and ``rows x (history + k) x BYTES_PER_SLOT <=
    memory_bytes`` (rows sorted by history length, so a long history shares its batch only
    with other long ones); a single row over the budget is scored alone. Predictions do not
    depend on the batching (see ``ItemKNNScorer.forward``).
    """
    scorer, out = model.scorer(), np.zeros(len(user_idx), dtype=np.float32)
    known = (np.asarray(item_idx) > 0) & (np.asarray(item_idx) < model.meta["n_items"])
    if model.config.prediction == "item_centred":  # most rows: a lookup, no history batches
        out[known] = _predict_known(scorer, train, np.asarray(user_idx)[known], np.asarray(item_idx)[known])
        user_idx, item_idx, rest = np.asarray(user_idx)[~known], np.asarray(item_idx)[~known], ~known
    else:
        rest = np.ones(len(out), dtype=bool)
    order = by_history_length(train, user_idx)
    users, items_all = np.asarray(user_idx)[order], np.asarray(item_idx, dtype=np.int64)[order]
    widths, scored = np.diff(train.indptr)[users], np.zeros(len(order), dtype=np.float32)
    for lo, hi in row_chunks(widths + int(model.meta["k"]), BYTES_PER_SLOT, memory_bytes, batch):
        hist, hr = history_arrays(train, users[lo:hi])
        items = torch.from_numpy(items_all[lo:hi])
        scored[order[lo:hi]] = scorer(items, torch.from_numpy(hist), torch.from_numpy(hr)).numpy()
    out[rest] = scored
    return out


def _predict_known(scorer: ItemKNNScorer, train: sp.csr_matrix, users: np.ndarray, items: np.ndarray):
    """The item-centred scorer's predictions for known items, bit for bit (float32 steps in its
    order; torch's CPU cumsum adds float32 in float64), each neighbour's rating read from the
    train CSR by ``csr_cells`` instead of from a per-row history: no ``history`` term at all."""
    nbr, sim = scorer.nbr_idx.numpy()[items], scorer.nbr_sim.numpy()[items]
    mean = scorer.item_mean.numpy()
    rating, found = csr_cells(train, np.broadcast_to(users[:, None], nbr.shape), nbr)
    found &= nbr != 0
    deviation = rating.astype(np.float32) - mean[nbr]
    num = np.where(found, sim * deviation, 0).cumsum(1, dtype=np.float64)[:, -1].astype(np.float32)
    den = np.where(found, np.abs(sim), 0).cumsum(1, dtype=np.float64)[:, -1].astype(np.float32)
    pred = np.where(den > 0, mean[items] + num / np.maximum(den, np.float32(1e-12)), mean[items])
    return np.clip(pred, np.float32(scorer.rating_min), np.float32(scorer.rating_max))
