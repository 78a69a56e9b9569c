"""Parts that several CTR families share (FuxiCTR-style): embeddings, first-order terms,
the FM interaction and an MLP. DeepFM uses all four; Wide&Deep, DLRM, DCN-v2, DIN, MMoE
and BST reuse them.

Inputs are ``sparse [B, F]`` int64 with per-field indices in ``[0, cardinality_f)``,
where 0 is the unknown bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FieldOffsets(nn.Module):
    """Map per-field indices to rows of one shared table.

    One table with offsets (instead of F tables) means one Gather in ONNX and one
    optimizer state. Out-of-range or negative indices fall back to the field's row 0, the
    unknown bucket, so a serving-time id the vocabulary never saw cannot crash the Gather.
    """

    def __init__(self, cardinalities: Sequence[int]):
        super().__init__()
        card = torch.tensor(list(cardinalities), dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(card, 0)[:-1]])
        self.register_buffer("cardinality", card, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.total = int(card.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        valid = (x >= 0) & (x < self.cardinality)
        return torch.where(valid, x, torch.zeros_like(x)) + self.offsets


class FeaturesEmbedding(nn.Module):
    """``[B, F]`` indices -> ``[B, F, dim]`` embeddings from one shared, offset table."""

    def __init__(self, cardinalities: Sequence[int], dim: int, init_std: float = 1e-2):
        super().__init__()
        self.index = FieldOffsets(cardinalities)
        self.embedding = nn.Embedding(self.index.total, dim)
        nn.init.normal_(self.embedding.weight, std=init_std)  # small: FM terms start near 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.index(x))


class FeaturesLinear(nn.Module):
    """First-order term: ``bias + sum_f w[x_f]`` (+ ``dense @ w_d`` if ``n_dense``) -> ``[B]``."""

    def __init__(self, cardinalities: Sequence[int], n_dense: int = 0):
        super().__init__()
        self.index = FieldOffsets(cardinalities)
        self.weight = nn.Embedding(self.index.total, 1)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense = nn.Linear(n_dense, 1, bias=False) if n_dense else None

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        out = self.weight(self.index(sparse)).sum(dim=(1, 2)) + self.bias
        if self.dense is not None and dense is not None:
            out = out + self.dense(dense).squeeze(-1)
        return out


class FactorizationMachine(nn.Module):
    """Second-order FM term over field embeddings ``[B, F, d]`` -> ``[B]``.

    Uses ``0.5 * ((sum_f e_f)^2 - sum_f e_f^2)`` summed over d: all pairwise dot products
    in O(F d) instead of O(F^2 d) (Rendle 2010).
    """

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class MLP(nn.Module):
    """Linear -> activation -> dropout blocks; an optional final Linear to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = 1,
        dropout: float = 0.0,
        batch_norm: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim if out_dim is not None else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
