"""DeepFM (Guo et al. 2017) on ``Snapshot.ctr``, task ``ctr``.

``logit = FM first order (sparse + dense) + FM second order (shared embeddings)
+ MLP([embeddings flattened, dense])``. The FM and the deep part share one embedding
table (the paper's point: no feature engineering for the wide side, one set of
embeddings learned by both). ``forward`` returns logits; BCE-with-logits lives in the
training closure.

Unknown ids: index 0 of every field is its unknown bucket. The valid/test splits hold
users (and items) the train split never saw, so during training a fraction
``unknown_rate`` of user/item ids is replaced by 0 and row 0 is *trained* as "someone
new", instead of staying at its random init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.layers import MLP, FactorizationMachine, FeaturesEmbedding, FeaturesLinear
from models.train import auc, deterministic, train_torch


@dataclass(frozen=True)
class Config:
    # 16-dim embeddings: FuxiCTR's DeepFM settings use 10-16 on Criteo/Avazu; MovieLens
    # fields are low-cardinality except user/item, where 16 is already plenty.
    embed_dim: int = 16
    # The paper's tower is 400-400-400 for 45M Criteo rows; a MovieLens-sized set (0.1-1M
    # rows) over-fits that, so three narrower layers.
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2
    # Adam 1e-3 with batch 1024: the standard CTR recipe; CTR models over-fit after 1-3
    # epochs, so early stopping on valid AUC does the real work.
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 10
    patience: int = 2
    # L2 on the embedding rows a batch touches (FuxiCTR's embedding_regularizer).
    embedding_reg: float = 1e-5
    # Fraction of user/item ids replaced by the unknown bucket (0) while training.
    unknown_rate: float = 0.05
    # "like" or "love": which label of fct_ctr_samples is the click.
    label: str = "like"
    seed: int = 0

    def __post_init__(self):
        if self.label not in ("like", "love"):
            raise ValueError(f"label must be 'like' or 'love', got {self.label!r}")
        if not 0 <= self.unknown_rate < 1:
            raise ValueError(f"unknown_rate must be in [0, 1), got {self.unknown_rate}")


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


class DeepFM(TrainedModel):
    family = "deepfm"
    task = Task.CTR
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return DeepFMModule(meta["cardinalities"], len(meta["dense_fields"]), config)

    def export_spec(self) -> ExportSpec:
        g = torch.Generator().manual_seed(0)
        card = torch.tensor(self.meta["cardinalities"])
        sparse = (torch.rand(4, len(card), generator=g) * (card - 1)).long() + 1
        sparse[0] = 0  # every field unknown
        sparse[1, 0] = 0  # unknown user, known context
        dense = torch.randn(4, len(self.meta["dense_fields"]), generator=g)
        return ExportSpec(
            inputs=(
                TensorSpec("sparse", "int64", ("batch", len(card))),
                TensorSpec("dense", "float32", ("batch", len(self.meta["dense_fields"]))),
            ),
            outputs=(TensorSpec("logit", "float32", ("batch",)),),
            example_inputs=(sparse, dense),
            notes=(
                f"sparse columns in order {self.meta['sparse_fields']}; dense in order "
                f"{self.meta['dense_fields']}; 0 or out-of-range ids -> the field's trained unknown "
                f"bucket; label = label_{self.config.label}; output is a logit (apply sigmoid)"
            ),
        )


def _mask_ids(sparse: torch.Tensor, columns: list[int], rate: float) -> torch.Tensor:
    if rate <= 0 or not columns:
        return sparse
    sparse = sparse.clone()
    cols = sparse[:, columns]
    sparse[:, columns] = torch.where(torch.rand(cols.shape) < rate, torch.zeros_like(cols), cols)
    return sparse


def loss_fn(
    module: DeepFMModule, batch, config: Config, id_columns: tuple[int, ...] | list[int] = ()
) -> torch.Tensor:
    """BCE-with-logits (+ L2 on the touched embedding rows); ``id_columns`` get unknown-id masking."""
    sparse, dense, y = batch
    sparse = _mask_ids(sparse, list(id_columns), config.unknown_rate)
    loss = nn.functional.binary_cross_entropy_with_logits(module(sparse, dense), y)
    if config.embedding_reg > 0:
        loss = loss + config.embedding_reg * module.embedding(sparse).pow(2).sum(dim=(1, 2)).mean()
    return loss


def training_batch(snapshot: Snapshot, config: Config, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """The first ``rows`` train rows as ``loss_fn``'s batch (tests: one step lowers the loss)."""
    c = snapshot.ctr("train", max_history=1)
    label = getattr(c, f"label_{config.label}")
    return tuple(torch.from_numpy(a[:rows]) for a in (c.sparse, c.dense, label))


@torch.no_grad()
def predict_logits(module: nn.Module, sparse: np.ndarray, dense: np.ndarray, batch: int = 8192) -> np.ndarray:
    module.eval()
    out = [
        module(torch.from_numpy(sparse[lo : lo + batch]), torch.from_numpy(dense[lo : lo + batch])).numpy()
        for lo in range(0, len(sparse), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> DeepFM:
    fields = list(snapshot.meta["sparse_fields"])
    card = [int(snapshot.meta["sparse_cardinality"][f]) for f in fields]
    train, valid = snapshot.ctr("train", max_history=1), snapshot.ctr("valid", max_history=1)
    if len(train) == 0:
        raise ValueError(f"{snapshot.path}: empty train split in fct_ctr_samples; deepfm needs train rows")
    label = f"label_{config.label}"
    meta = {
        "cardinalities": card,
        "sparse_fields": fields,
        "dense_fields": list(snapshot.meta["dense_fields"]),
    }
    id_columns = [c for c, f in enumerate(fields) if f in ("user_idx", "item_idx")]
    ev = valid if len(valid) and len(np.unique(getattr(valid, label))) == 2 else train

    with deterministic(config.seed):
        module = DeepFMModule(card, len(meta["dense_fields"]), config)
        history = train_torch(
            module,
            lambda m, b: loss_fn(m, b, config, id_columns),
            (train.sparse, train.dense, getattr(train, label)),
            lambda m: auc(predict_logits(m, ev.sparse, ev.dense), getattr(ev, label)),
            family="deepfm",
            metric_name="auc",
            higher_is_better=True,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer="adam",
            lr=config.lr,
            patience=config.patience,
            seed=config.seed,
            log=log,
        )
    return DeepFM(config, module, meta, history)
