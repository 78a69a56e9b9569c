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


# --- cross-product, dot-product and cross-network interactions (Wide&Deep, DLRM, DCN-v2) ----
class FeatureCross(nn.Module):
    """Wide & Deep's cross-product transformation (Cheng et al. 2016) for pairs of fields.

    The pair ``(a, b)`` of field columns becomes one categorical feature with index
    ``x_a * card_b + x_b`` (one row per value combination, unknown values included), offset
    into one table shared by all pairs, like ``FieldOffsets``: ``[B, F]`` -> ``[B, C]`` rows in
    ``[0, total)``. Computed in the graph, so serving sends the plain ``sparse`` tensor.
    Out-of-range or negative ids count as the field's unknown value 0.
    """

    def __init__(self, cardinalities: Sequence[int], pairs: Sequence[tuple[int, int]]):
        super().__init__()
        card = [int(c) for c in cardinalities]
        if not pairs:
            raise ValueError("FeatureCross needs at least one (field, field) pair")
        self.register_buffer("cardinality", torch.tensor(card, dtype=torch.int64), persistent=False)
        for name, values in (
            ("left", [a for a, _ in pairs]),
            ("right", [b for _, b in pairs]),
            ("right_card", [card[b] for _, b in pairs]),
        ):
            self.register_buffer(name, torch.tensor(values, dtype=torch.int64), persistent=False)
        self.offsets = FieldOffsets([card[a] * card[b] for a, b in pairs])
        self.total = self.offsets.total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where((x >= 0) & (x < self.cardinality), x, torch.zeros_like(x))
        cross = x.index_select(1, self.left) * self.right_card + x.index_select(1, self.right)
        return cross + self.offsets.offsets


class DotInteraction(nn.Module):
    """DLRM's interaction (Naumov et al. 2019): the pairwise dot products of ``n`` vectors
    ``[B, n, d]`` -> ``[B, n (n - 1) / 2]``, pairs ``i < j`` in row-major upper-triangle order.

    One batched matmul, then one Gather of the upper triangle from the flattened Gram matrix
    (a constant index buffer), which keeps the ONNX graph to MatMul + Gather.
    """

    def __init__(self, n: int):
        super().__init__()
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("flat_index", rows * n + cols, persistent=False)
        self.out_dim = int(rows.numel())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(z, z.transpose(1, 2))  # [B, n, n]
        return gram.flatten(1).index_select(1, self.flat_index)


class LowRankCrossMixture(nn.Module):
    """DCN-Mix's ``W x + b`` (Wang et al. 2021, eq. 4): ``sum_i G_i(x) U_i g(C_i g(V_i^T x)) + b``.

    ``n_experts`` rank-``rank`` experts, ``g = tanh``, softmax gates ``G(x)``. The gates sum to
    one, so ``sum_i G_i x_0 * (E_i + b) = x_0 * (sum_i G_i E_i + b)``: it plugs into the same
    cross formula as the full-rank ``nn.Linear``.
    """

    def __init__(self, dim: int, rank: int, n_experts: int):
        super().__init__()
        self.v = nn.Parameter(torch.empty(n_experts, dim, rank))
        self.c = nn.Parameter(torch.empty(n_experts, rank, rank))
        self.u = nn.Parameter(torch.empty(n_experts, rank, dim))
        for p in (self.v, self.c, self.u):
            nn.init.xavier_normal_(p)
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.einsum("bd,edr->ber", x, self.v))  # [B, E, r]
        h = torch.tanh(torch.einsum("ber,ers->bes", h, self.c))
        experts = torch.einsum("bes,esd->bed", h, self.u)  # [B, E, dim]
        gates = torch.softmax(self.gate(x), dim=-1).unsqueeze(-1)  # [B, E, 1]
        return (gates * experts).sum(dim=1) + self.bias


class CrossNetV2(nn.Module):
    """DCN-v2's cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` for ``n_layers`` layers.

    ``rank = 0``: full-rank ``W_l`` (the paper's DCN-V2); ``rank > 0``: each ``W_l x + b_l`` is a
    mixture of ``n_experts`` low-rank experts (the paper's DCN-Mix, cheaper for wide inputs).
    """

    def __init__(self, dim: int, n_layers: int, rank: int = 0, n_experts: int = 4):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"CrossNetV2 needs n_layers >= 1, got {n_layers}")
        self.layers = nn.ModuleList(
            nn.Linear(dim, dim) if rank == 0 else LowRankCrossMixture(dim, rank, n_experts)
            for _ in range(n_layers)
        )
        self.out_dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x
