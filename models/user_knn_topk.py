"""User-user collaborative filtering for top-K (memory-based), task ``topk``.

``user_knn_topk``: ``scores_u = sum_{v in N(u)} sim(u,v) R_v`` over binary interactions
(``values = "binary"``, default) or mean-centred ratings (``"centred"``), read with
``NeighbourRows``; unknown user -> train popularity, column 0 = -1e9 (``UserTopKScorer``).
Binary is the default: top-K asks "will u interact with i", and a neighbour who watched i
and rated it below their mean is still evidence of that; centred votes push such items down
(test NDCG@10 on the default synthetic snapshot: binary 0.191, centred 0.126,
popularity 0.163).

Neighbours (similarity, shrinkage, the top-k positive ones per user) and their fields are
``user_knn``'s (``models/user_knn.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import ranking_metrics
from models.base import ExportSpec, Task, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.item_knn import centred_matrix
from models.layers import UserTopKScorer
from models.neighbours import NeighbourRows
from models.topk import popularity
from models.train import format_row, history_row
from models.user_knn import Log, NeighbourConfig, train_ratings, user_similarity_topk


@dataclass(frozen=True)
class Config(NeighbourConfig):
    # What a neighbour's row votes with: "binary" (default, docstring) or "centred" ratings.
    values: str = "binary"
    # Train-row cells the graph may read per user per scatter step: each step reads the stored
    # cells of s = budget // max_row neighbours' rows (max_row = the longest train row), so a
    # call holds at most ~ batch * budget * 50 bytes whatever the data (typically far less: the
    # cells actually stored). Small data reads all k in one step; ML-1M (max_row 2.3k) takes 4
    # steps. Each step is unrolled in the graph (~1 s of export time each).
    gather_budget: int = 32768
    # Valid users ranked for the history row's NDCG@10 (full ranking costs n_items each).
    eval_users: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if self.values not in ("binary", "centred"):
            raise ValueError(f"user_knn_topk: values must be 'binary' or 'centred', got {self.values!r}")
        if self.gather_budget < 1 or self.eval_users < 1:
            raise ValueError(f"user_knn_topk: gather_budget and eval_users must be >= 1, got {self}")


# --- scorer -------------------------------------------------------------------------------
class UserKNNTopKScorer(UserTopKScorer):
    def __init__(self, n_users: int, n_items: int, k: int, nnz: int, max_row: int, slots_per_step: int):
        super().__init__(n_users, n_items)
        self.rows = NeighbourRows(n_users, n_items, nnz, max_row, slots_per_step)
        self.register_buffer("nbr_idx", torch.zeros(n_users, k, dtype=torch.int64))
        self.register_buffer("nbr_sim", torch.zeros(n_users, k))

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.rows(self.nbr_idx[u], self.nbr_sim[u])


class UserKNNTopK(TrainedModel):
    family = "user_knn_topk"
    task = Task.TOPK
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return UserKNNTopKScorer(
            meta["n_users"], meta["n_items"], meta["k"], meta["nnz"], meta["max_row"], meta["slots_per_step"]
        )

    def export_spec(self) -> ExportSpec:
        c = self.config
        return user_topk_spec(
            self.meta,
            f"scores = sum over the user's k={self.meta['k']} neighbours of sim * their train row "
            f"({c.values}), read {self.meta['slots_per_step']} neighbours per step; memory per call ~ "
            "50 bytes per stored cell of the neighbours' rows",
        )


def topk_values(train: sp.csr_matrix, values: str) -> sp.csr_matrix:
    """The rows neighbours vote with: 1 per interaction, or the mean-centred rating."""
    if values == "binary":
        ones = train.tocsr(copy=True).astype(np.float32)
        ones.data = np.ones_like(ones.data)
        return ones
    return centred_matrix(train)[0]


def _valid_ndcg(model: UserKNNTopK, snapshot: Snapshot, train: sp.csr_matrix, n_users: int) -> float | None:
    valid = snapshot.ratings("valid")
    keep = (valid.user_idx > 0) & (valid.item_idx > 0)
    relevant = sp.csr_matrix(
        (np.ones(int(keep.sum())), (valid.user_idx[keep], valid.item_idx[keep])),
        shape=(snapshot.n_users, snapshot.n_items),
    )
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if not len(users):
        return None
    users = np.sort(np.random.default_rng(0).choice(users, size=min(n_users, len(users)), replace=False))
    with torch.no_grad():
        scores = np.concatenate(
            [model.score(users[lo : lo + 256]).numpy() for lo in range(0, len(users), 256)]
        )
    return ranking_metrics(scores, train, users, relevant)["ndcg@10"]


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> UserKNNTopK:
    start = time.perf_counter()
    train, n_rows = train_ratings(snapshot, "user_knn_topk")
    nbr_idx, nbr_sim = user_similarity_topk(
        train, config.k, config.shrink, config.similarity, config.block_size
    )
    rows = NeighbourRows.from_csr(topk_values(train, config.values))
    k = int(nbr_idx.shape[1])
    meta = {
        **rows.meta(),
        "k": k,
        "slots_per_step": min(k, max(1, config.gather_budget // max(rows.max_row, 1))),
    }
    module = UserKNNTopK.build_module(config, meta)
    module.rows.load_state_dict(rows.state_dict())
    module.nbr_idx.copy_(torch.from_numpy(nbr_idx))
    module.nbr_sim.copy_(torch.from_numpy(nbr_sim))
    module.popularity.copy_(popularity(snapshot))
    model = UserKNNTopK(config, module, meta)
    metric = _valid_ndcg(model, snapshot, train, config.eval_users)
    row = history_row(1, None, metric, "ndcg@10", n_rows, time.perf_counter() - start)
    model.history = [row]
    log(
        format_row("user_knn_topk", row)
        + f"  (k={nbr_idx.shape[1]}, shrink={config.shrink}, {config.values})"
    )
    return model
