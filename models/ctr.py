"""The training recipe of the single-task CTR families (deepfm, wide_deep, dlrm, dcn_stacked,
dcn_parallel): they differ only in architecture.

Each family subclasses ``CtrConfig`` (adding its architecture fields) and ``CtrModel`` (setting
``family``, ``config_cls`` and ``build_module``), and its ``fit`` is ``fit_ctr``:

- inputs ``sparse [B, F]`` (meta["sparse_fields"] order, 0 = unknown) and ``dense [B, D]`` ->
  ``logit [B]``; the module must keep its field embeddings as ``module.embedding``;
- BCE with logits plus L2 on the embedding rows a batch touches (FuxiCTR's
  embedding_regularizer);
- the valid/test splits hold users (and items) the train split never saw, so during training a
  fraction ``unknown_rate`` of user/item ids is replaced by 0 and row 0 is *trained* as
  "someone new", instead of staying at its random init;
- Adam, early stopping on valid AUC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.train import auc, deterministic, train_torch

Log = Callable[[str], None]


@dataclass(frozen=True)
class CtrConfig:
    """The training fields every single-task CTR family shares (architecture fields go in subclasses)."""

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
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.patience < 1:
            raise ValueError("lr must be > 0 and batch_size, epochs, patience >= 1")


class CtrModel(TrainedModel):
    """A fitted CTR family: ``sparse [B, F]``, ``dense [B, D]`` -> ``logit [B]``, deepfm's contract."""

    task: ClassVar[Task] = Task.CTR
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


def fit_ctr(snapshot: Snapshot, config: CtrConfig, model_cls: type[CtrModel], log: Log = print) -> CtrModel:
    """Train ``model_cls.build_module(config, meta)`` on fct_ctr_samples (see the module docstring)."""
    family = model_cls.family
    fields = list(snapshot.meta["sparse_fields"])
    meta = {
        "cardinalities": [int(snapshot.meta["sparse_cardinality"][f]) for f in fields],
        "sparse_fields": fields,
        "dense_fields": list(snapshot.meta["dense_fields"]),
    }
    train, valid = snapshot.ctr("train", max_history=1), snapshot.ctr("valid", max_history=1)
    if len(train) == 0:
        raise ValueError(f"{snapshot.path}: empty train split in fct_ctr_samples; {family} needs train rows")
    label = f"label_{config.label}"
    id_columns = [c for c, f in enumerate(fields) if f in ("user_idx", "item_idx")]
    ev = valid if len(valid) and len(np.unique(getattr(valid, label))) == 2 else train
    with deterministic(config.seed):
        module = model_cls.build_module(config, meta)
        history = train_torch(
            module,
            lambda m, b: loss_fn(m, b, config, id_columns),
            (train.sparse, train.dense, getattr(train, label)),
            lambda m: auc(predict_logits(m, ev.sparse, ev.dense), getattr(ev, label)),
            family=family,
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
    return model_cls(config, module, meta, history)


def _mask_ids(sparse: torch.Tensor, columns: list[int], rate: float) -> torch.Tensor:
    if rate <= 0 or not columns:
        return sparse
    sparse = sparse.clone()
    cols = sparse[:, columns]
    sparse[:, columns] = torch.where(torch.rand(cols.shape) < rate, torch.zeros_like(cols), cols)
    return sparse


def loss_fn(
    module: nn.Module, batch, config: CtrConfig, id_columns: tuple[int, ...] | list[int] = ()
) -> torch.Tensor:
    """BCE-with-logits (+ L2 on the touched embedding rows); ``id_columns`` get unknown-id masking."""
    sparse, dense, y = batch
    sparse = _mask_ids(sparse, list(id_columns), config.unknown_rate)
    loss = nn.functional.binary_cross_entropy_with_logits(module(sparse, dense), y)
    if config.embedding_reg > 0:
        loss = loss + config.embedding_reg * module.embedding(sparse).pow(2).sum(dim=(1, 2)).mean()
    return loss


def training_batch(snapshot: Snapshot, config: CtrConfig, rows: int = 256) -> tuple[torch.Tensor, ...]:
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
