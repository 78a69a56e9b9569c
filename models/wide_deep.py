"""Wide & Deep (Cheng et al. 2016) on ``Snapshot.ctr``, task ``ctr``.

``logit = wide(sparse, dense) + deep(sparse, dense)``, trained jointly on one loss:

- ``Wide``: a linear model (memorisation) over one weight per sparse id, the dense features and
  cross-product features of field pairs (``crosses``; default gender x genre, occupation x genre,
  age x genre: the paper's ``AND(gender=female, language=en)`` kind, here a demographic's taste
  for a genre). The crosses are computed in the graph from the sparse columns
  (``index = a * card_b + b``, ``layers.FeatureCross``), so serving sends the same ``sparse``.
- deep: an MLP (generalisation) over the concatenated field embeddings and the dense features.

The paper trains the wide part with FTRL + L1 and the deep part with AdaGrad; both use Adam
here, the common CTR recipe (FuxiCTR), so the CTR families differ only in architecture.

Training is the shared CTR recipe (``models.ctr.fit_ctr``: BCE with logits plus embedding L2,
unknown-id masking, Adam, early stopping on valid AUC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.ctr import CtrConfig, CtrModel, Log, fit_ctr
from models.data import Snapshot
from models.layers import MLP, FeatureCross, FeaturesEmbedding, FeaturesLinear


# --- Wide & Deep ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config(CtrConfig):
    # 16-dim embeddings as deepfm: the paper's 32 serves app ids of a 1B-user store; MovieLens
    # fields are low-cardinality except user/item.
    embed_dim: int = 16
    # The paper's tower is 1024-512-256 for 500B rows; three narrower layers for 0.1-25M.
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2
    # Field pairs crossed in the wide part (names from meta["sparse_fields"]): a demographic's
    # taste for a genre, the cross-products the issue names. Each adds card_a * card_b weights.
    # (Inner tuples are variadic in the type because models.config cannot parse fixed-length
    # tuples nested in a variadic one; __post_init__ checks each names exactly two fields.)
    crosses: tuple[tuple[str, ...], ...] = (
        ("gender_idx", "genre_idx"),
        ("occupation_idx", "genre_idx"),
        ("age_idx", "genre_idx"),
    )

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"embed_dim and hidden widths must be >= 1, got {self.embed_dim}, {self.hidden}")
        for pair in self.crosses:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"crosses: each entry names two different sparse fields, got {pair!r}")


class Wide(nn.Module):
    """The linear part: ``bias + sum_f w[x_f] + dense @ w_d + sum_(a,b) w_cross[x_a, x_b]``."""

    def __init__(self, cardinalities: list[int], n_dense: int, pairs: list[tuple[int, int]]):
        super().__init__()
        self.linear = FeaturesLinear(cardinalities, n_dense)
        self.cross = FeatureCross(cardinalities, pairs) if pairs else None
        self.cross_weight = nn.Embedding(self.cross.total if self.cross else 1, 1)
        nn.init.zeros_(self.cross_weight.weight)  # a linear model starts at zero, as FeaturesLinear

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        out = self.linear(sparse, dense)
        if self.cross is not None:
            out = out + self.cross_weight(self.cross(sparse)).sum(dim=(1, 2))
        return out


class WideDeepModule(nn.Module):
    def __init__(self, cardinalities: list[int], n_dense: int, pairs: list[tuple[int, int]], config: Config):
        super().__init__()
        self.wide = Wide(cardinalities, n_dense, pairs)
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim)
        self.deep = MLP(len(cardinalities) * config.embed_dim + n_dense, config.hidden, 1, config.dropout)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        deep_in = torch.cat([self.embedding(sparse).flatten(1), dense], dim=1)
        return self.wide(sparse, dense) + self.deep(deep_in).squeeze(-1)


def cross_columns(crosses: tuple[tuple[str, ...], ...], fields: list[str]) -> list[tuple[int, int]]:
    """Column pairs of the configured ``crosses`` in the snapshot's sparse field order."""
    missing = sorted({f for pair in crosses for f in pair} - set(fields))
    if missing:
        raise ValueError(
            f"wide_deep config field 'crosses' names {missing}, which are not sparse fields of the "
            f"snapshot (meta.json sparse_fields: {fields}); cross only those"
        )
    return [(fields.index(a), fields.index(b)) for a, b in crosses]


class WideDeep(CtrModel):
    family = "wide_deep"
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        pairs = cross_columns(config.crosses, meta["sparse_fields"])
        return WideDeepModule(meta["cardinalities"], len(meta["dense_fields"]), pairs, config)


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> WideDeep:
    return fit_ctr(snapshot, config, WideDeep, log)
