"""NCF's MLP family (He et al. 2017), task ``topk``: ``logit = h . MLP([p_u, q_i]) + b`` over the
concatenated user and item embeddings. Training, scorer contract and fallbacks: the NCF
family's, ``models/ncf.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.data import Snapshot
from models.ncf import Log, MLPTower, NCFModel, NCFScorer, check_dropout, ncf_meta, train_ncf
from models.topk import SampledTraining
from models.train import deterministic


@dataclass(frozen=True)
class Config(SampledTraining):
    # Embeddings of 32 per side (64 concatenated) into a 64-32-16 tower: the paper's
    # halving tower ending at 16 predictive factors, sized for ~100k-1M interactions.
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64, 32, 16)
    # No dropout: the paper uses none; early stopping on valid NDCG does the regularising.
    dropout: float = 0.0
    # Larger than GMF's: the tower's first layer sees the embeddings through Kaiming-uniform
    # weights, and with 0.01 its input is ~0 for the first ~10 epochs (a plateau again).
    init_std: float = 0.1
    # Training fields (negatives, batch_size, lr, reg, epochs, patience, eval_users, seed):
    # SampledTraining, whose defaults are the paper's.

    def __post_init__(self):
        super().__post_init__()
        check_dropout(self)
        if self.embed_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"embed_dim and every hidden width must be >= 1, got {self}")


class MLPModule(NCFScorer):
    """The MLP family's scorer: ``MLPTower`` plus the prediction layer.

    Args:
        n_users, n_items: embedding rows (index 0 = unknown / padding).
        embed_dim, hidden, dropout, init_std: the tower's (``ncf.MLPTower``).
    """

    def __init__(self, n_users, n_items, embed_dim, hidden, dropout=0.0, init_std=0.01):
        super().__init__(n_users, n_items)
        self.tower = MLPTower(n_users, n_items, embed_dim, hidden, dropout, init_std)
        self.predict = nn.Linear(hidden[-1], 1)

    def features(self, u, i):
        return self.tower.pair(u, i)

    def pair_logits(self, u, i):
        return self.predict(self.features(u, i)).squeeze(-1)

    def all_scores(self, u):
        return self.predict(self.tower.all(u)).squeeze(-1)

    def score_row_bytes(self) -> int:
        return self.tower.all_row_bytes()

    def embedding_tables(self, u, i):
        return ((self.tower.user, u), (self.tower.item, i))


class NCFMLP(NCFModel):
    family = "ncf_mlp"
    config_cls = Config
    SCORES = "scores = h . MLP([P[user], Q_j]) + b for every item j"

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return MLPModule(meta["n_users"], meta["n_items"], config.embed_dim, config.hidden, config.dropout)


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> NCFMLP:
    with deterministic(config.seed):
        module = MLPModule(
            snapshot.n_users,
            snapshot.n_items,
            config.embed_dim,
            config.hidden,
            config.dropout,
            config.init_std,
        )
        history = train_ncf(module, snapshot, config, "ncf_mlp", log)
    return NCFMLP(config, module, ncf_meta(snapshot), history)
