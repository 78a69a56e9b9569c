"""DCN-v2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network") on ``Snapshot.ctr``,
task ``ctr``: what the paper's two structures share. Each is a family with its own file:

- ``dcn_stacked`` (``models/dcn_stacked.py``): ``logit = head(deep(cross(x_0)))``, the deep
  network on top of the cross network's output;
- ``dcn_parallel`` (``models/dcn_parallel.py``): ``logit = head([cross(x_0), deep(x_0)])``,
  both read ``x_0`` side by side.

``x_0 = [embeddings of the F sparse fields flattened, dense]``; the cross network
(``layers.CrossNetV2``) applies ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, full rank by default,
or with ``low_rank > 0`` the paper's mixture of low-rank experts (DCN-Mix). Training is the
shared CTR recipe (``models.ctr.fit_ctr``: BCE, embedding L2, unknown-id masking, early stopping
on valid AUC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.ctr import CtrConfig, CtrModel
from models.layers import MLP, CrossNetV2, FeaturesEmbedding


@dataclass(frozen=True)
class DCNConfig(CtrConfig):
    """The fields both structures share; each family's ``Config`` sets ``PARALLEL``."""

    PARALLEL: ClassVar[bool]
    # 16-dim embeddings as deepfm; x_0 is F * 16 + D wide (~150 on MovieLens), so full-rank
    # cross weights stay small (~22k per layer).
    embed_dim: int = 16
    # 3 cross layers: the paper finds 2-4 best and most of the gain by the 3rd layer.
    cross_layers: int = 3
    # 0 = full-rank W_l (the paper's default on inputs this narrow); r > 0 = DCN-Mix with
    # n_experts rank-r experts (the paper uses r ~ d/4 and 4 experts for wide inputs).
    low_rank: int = 0
    n_experts: int = 4
    # Deep network: deepfm's tower, narrower than the paper's 3 x 562 on Criteo.
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim < 1 or self.cross_layers < 1 or self.low_rank < 0 or self.n_experts < 1:
            raise ValueError(
                "embed_dim, cross_layers, n_experts must be >= 1 and low_rank >= 0, got "
                f"{self.embed_dim}, {self.cross_layers}, {self.n_experts}, {self.low_rank}"
            )
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden needs at least one width, each >= 1, got {self.hidden}")


class DCNModule(nn.Module):
    """Embeddings -> ``x_0`` -> cross and deep networks (stacked or parallel) -> ``logit [B]``.

    Args:
        cardinalities: rows of each sparse field's embedding table (index 0 = unknown).
        n_dense: number of dense features appended to ``x_0``.
        config: the family's config; ``config.PARALLEL`` picks the structure.
    """

    def __init__(self, cardinalities: list[int], n_dense: int, config: DCNConfig):
        super().__init__()
        self.parallel = config.PARALLEL
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim)
        dim = len(cardinalities) * config.embed_dim + n_dense
        self.cross = CrossNetV2(dim, config.cross_layers, config.low_rank, config.n_experts)
        self.deep = MLP(dim, config.hidden, out_dim=None, dropout=config.dropout)
        self.head = nn.Linear(self.deep.out_dim + (dim if self.parallel else 0), 1)

    def stem(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``x_0``: the flattened field embeddings and the dense features."""
        return torch.cat([self.embedding(sparse).flatten(1), dense], dim=1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(sparse, dense)
        if self.parallel:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        else:
            h = self.deep(self.cross(x0))
        return self.head(h).squeeze(-1)


class DCNModel(CtrModel):
    """Base of the two fitted DCN families."""

    @classmethod
    def build_module(cls, config: DCNConfig, meta: dict) -> nn.Module:
        return DCNModule(meta["cardinalities"], len(meta["dense_fields"]), config)
