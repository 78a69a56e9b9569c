"""DLRM (Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
Recommendation Systems") on ``Snapshot.ctr``, task ``ctr``.

Named parts as in the paper and torchrec's ``DLRM``:

- sparse arch: one embedding per sparse field (``FeaturesEmbedding``: per-field tables stored
  as one offset table, one Gather);
- dense arch: the bottom MLP maps the dense features to a vector of the embedding size (ReLU
  on its output, as the reference implementation);
- interaction arch: pairwise dot products of the bottom output and the F embeddings
  (``DotInteraction``, upper triangle without the diagonal), concatenated with the bottom
  output;
- over arch: the top MLP -> one logit.

Training is the shared CTR recipe (``models.ctr.fit_ctr``: BCE, embedding L2, unknown-id
masking, early stopping on valid AUC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.ctr import CtrConfig, CtrModel, Log, fit_ctr
from models.data import Snapshot
from models.layers import MLP, DotInteraction, FeaturesEmbedding


@dataclass(frozen=True)
class Config(CtrConfig):
    # 16: the reference's Criteo Kaggle setting (embedding size 16), and deepfm's.
    embed_dim: int = 16
    # Bottom MLP widths before the final layer of size embed_dim: the reference's Criteo
    # bottom 13-512-256-64-16 shrinks with its input; MovieLens has ~3 dense features.
    bottom_hidden: tuple[int, ...] = (64,)
    # The reference's top is 512-256-1 on 45M rows; half as wide for 0.1-25M rows.
    top_hidden: tuple[int, ...] = (256, 128)
    # The paper uses no dropout; on MovieLens-sized data a little keeps the top MLP from
    # memorising within the first epoch (early stopping does the rest).
    dropout: float = 0.1
    # Embedding init std. The interaction only sees embeddings through dot products, which
    # start at ~d * std^2; 0.05 keeps them small but not the ~1e-3 deepfm's 0.01 would give.
    init_std: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        widths = (self.embed_dim, *self.bottom_hidden, *self.top_hidden)
        if min(widths) < 1 or not self.top_hidden:
            raise ValueError(
                f"embed_dim, bottom_hidden and top_hidden widths must be >= 1 and top_hidden non-empty, "
                f"got {self.embed_dim}, {self.bottom_hidden}, {self.top_hidden}"
            )


class DLRMModule(nn.Module):
    def __init__(self, cardinalities: list[int], n_dense: int, config: Config):
        super().__init__()
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim, config.init_std)
        self.bottom = MLP(n_dense, (*config.bottom_hidden, config.embed_dim), out_dim=None)
        self.interaction = DotInteraction(len(cardinalities) + 1)
        self.top = MLP(config.embed_dim + self.interaction.out_dim, config.top_hidden, 1, config.dropout)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)  # [B, d]
        z = torch.cat([x.unsqueeze(1), self.embedding(sparse)], dim=1)  # [B, 1 + F, d]
        return self.top(torch.cat([x, self.interaction(z)], dim=1)).squeeze(-1)


class DLRM(CtrModel):
    family = "dlrm"
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return DLRMModule(meta["cardinalities"], len(meta["dense_fields"]), config)


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> DLRM:
    return fit_ctr(snapshot, config, DLRM, log)
