"""Generalised Matrix Factorization (GMF, He et al. 2017), task ``topk``:
``logit = h . (p_u * q_i) + b``, the element-wise product of the user and item embeddings
through a learned linear layer (MF is the special case h = 1). Training, scorer contract and
fallbacks: the NCF family's, ``models/ncf.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.data import Snapshot
from models.ncf import Log, NCFModel, NCFScorer, embedding, ncf_meta, train_ncf
from models.topk import SampledTraining
from models.train import deterministic


@dataclass(frozen=True)
class Config(SampledTraining):
    # 32 predictive factors: the paper's ML-1M curves keep improving up to 64, but gains past
    # 32 are small and 32 matches wals' budget, keeping the comparison fair.
    dim: int = 32
    # Embedding init std. The paper's 0.01 makes p_u * q_i ~ 1e-4 at the start, so GMF spends
    # ~10 epochs on a plateau that early stopping easily mistakes for convergence; 0.05 still
    # starts near zero logits but leaves the plateau within 1-2 epochs.
    init_std: float = 0.05
    # Training fields (negatives, batch_size, lr, reg, epochs, patience, eval_users, seed):
    # SampledTraining, whose defaults are the paper's.

    def __post_init__(self):
        super().__post_init__()
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


class GMFModule(NCFScorer):
    """GMF's scorer.

    Args:
        n_users, n_items: embedding rows (index 0 = unknown / padding).
        dim: predictive factors (embedding width).
        init_std: std of the embeddings' normal init.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.01):
        super().__init__(n_users, n_items)
        self.user = embedding(n_users, dim, init_std)
        self.item = embedding(n_items, dim, init_std)
        self.predict = nn.Linear(dim, 1)

    def features(self, u, i):
        return self.user(u) * self.item(i)

    def pair_logits(self, u, i):
        return self.predict(self.features(u, i)).squeeze(-1)

    def all_scores(self, u):
        # h . (p_u * q_j) + b = (p_u * h) . q_j + b: one [B, d] x [d, n_items] matmul
        return (self.user(u) * self.predict.weight) @ self.item.weight.T + self.predict.bias

    def embedding_tables(self, u, i):
        return ((self.user, u), (self.item, i))


class GMF(NCFModel):
    family = "gmf"
    config_cls = Config
    SCORES = "scores = h . (P[user] * Q_j) + b for every item j"

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return GMFModule(meta["n_users"], meta["n_items"], config.dim)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``P * h`` ``[n_users, dim]`` and Q ``[n_items, dim]`` (row 0 = unknown, zero): the score is
        ``(P_u * h) . Q_j + b``, so these are the vectors the model ranks items by."""
        m = self.module
        with torch.no_grad():
            return (m.user.weight * m.predict.weight).numpy().copy(), m.item.weight.numpy().copy()


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> GMF:
    with deterministic(config.seed):
        module = GMFModule(snapshot.n_users, snapshot.n_items, config.dim, config.init_std)
        history = train_ncf(module, snapshot, config, "gmf", log)
    return GMF(config, module, ncf_meta(snapshot), history)
