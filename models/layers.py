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


class UserTopKScorer(nn.Module):
    """The ``topk`` task's scorer contract, shared by every family that scores users:
    ``forward(user_idx [B]) -> scores [B, n_items]``; an unknown user (0 or out of range) gets
    the train popularity buffer (count / max count), column 0 (padding) is -1e9. Subclasses
    give ``all_scores(u)`` for valid user rows. Written with ``torch.where`` so it exports."""

    def __init__(self, n_users: int, n_items: int):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.register_buffer("popularity", torch.zeros(n_items))  # count / max count
        self.register_buffer("pad_mask", torch.arange(n_items) == 0, persistent=False)

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define all_scores(u)")

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        known = (user_idx > 0) & (user_idx < self.n_users)
        u = torch.where(known, user_idx, torch.zeros_like(user_idx))
        scores = torch.where(known.unsqueeze(1), self.all_scores(u), self.popularity.unsqueeze(0))
        return scores.masked_fill(self.pad_mask, -1e9)
