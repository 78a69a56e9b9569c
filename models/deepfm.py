"""DeepFM (Guo et al. 2017) on ``Snapshot.ctr``, task ``ctr``.

``logit = FM first order (sparse + dense) + FM second order (shared embeddings)
+ MLP([embeddings flattened, dense])``. The FM and the deep part share one embedding
table (the paper's point: no feature engineering for the wide side, one set of
embeddings learned by both). ``forward`` returns logits; BCE-with-logits lives in the
training closure.

Training is the shared CTR recipe (``models.ctr``: BCE with logits plus embedding L2,
unknown-id masking so row 0 of every field is trained as "someone new", Adam, early stopping
on valid AUC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.ctr import CtrConfig, CtrModel, Log, fit_ctr
from models.data import Snapshot
from models.layers import MLP, FactorizationMachine, FeaturesEmbedding, FeaturesLinear


@dataclass(frozen=True)
class Config(CtrConfig):
    # 16-dim embeddings: FuxiCTR's DeepFM settings use 10-16 on Criteo/Avazu; MovieLens
    # fields are low-cardinality except user/item, where 16 is already plenty.
    embed_dim: int = 16
    # The paper's tower is 400-400-400 for 45M Criteo rows; a MovieLens-sized set (0.1-1M
    # rows) over-fits that, so three narrower layers.
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2


class DeepFMModule(nn.Module):
    def __init__(self, cardinalities: list[int], n_dense: int, config: Config):
        super().__init__()
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim)
        self.linear = FeaturesLinear(cardinalities, n_dense)
        self.fm = FactorizationMachine()
        self.dnn = MLP(len(cardinalities) * config.embed_dim + n_dense, config.hidden, 1, config.dropout)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(sparse)  # [B, F, d]
        deep_in = torch.cat([emb.flatten(1), dense], dim=1)
        return self.linear(sparse, dense) + self.fm(emb) + self.dnn(deep_in).squeeze(-1)


class DeepFM(CtrModel):
    family = "deepfm"
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return DeepFMModule(meta["cardinalities"], len(meta["dense_fields"]), config)


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> DeepFM:
    return fit_ctr(snapshot, config, DeepFM, log)
