"""MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts") on ``Snapshot.ctr``, task ``multitask``.

Two tasks from fct_ctr_samples: ``like`` (label_like) and ``love`` (label_love, rarer).
``x = [field embeddings flattened, dense]``; ``E`` shared ``Expert`` MLPs read ``x``; each
task ``t`` has its own ``Gate``, ``g_t = softmax(W_t x)`` over the experts, and its own tower
on ``sum_i g_t,i * expert_i(x)``. ``forward`` returns ``logits [B, 2]`` (column 0 = like,
column 1 = love); the loss (a weighted sum of the two BCE-with-logits) lives in ``loss_fn``.

Unknown ids: as in DeepFM, index 0 of every field is its unknown bucket and a fraction
``unknown_rate`` of user/item ids is replaced by 0 while training, so row 0 is trained as
"someone new" for the valid/test users the train split never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.layers import MLP, FeaturesEmbedding
from models.train import auc, deterministic, train_torch

# Output columns, in order: the contract of the `multitask` task (docs/MODEL_API.md).
TASKS = ("like", "love")


@dataclass(frozen=True)
class Config:
    # 16-dim embeddings, as DeepFM: MovieLens fields are low-cardinality except user/item.
    embed_dim: int = 16
    # The paper uses 8 experts on its census tasks; with two tasks FuxiCTR's MMoE default of 4
    # is enough for each gate to find its own mix without starving experts of gradient.
    n_experts: int = 4
    # Each expert is a 2-layer ReLU MLP; narrower than FuxiCTR's 512-256-128 (Criteo-sized)
    # because MovieLens-sized data (0.1-25M rows) over-fits wide experts after one epoch.
    expert_hidden: tuple[int, ...] = (128, 64)
    # One small hidden layer per task tower (the paper's towers are one layer too).
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.2
    # Adam 1e-3 with batch 1024: the standard CTR recipe; early stopping does the real work.
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 10
    patience: int = 2
    # L2 on the embedding rows a batch touches (FuxiCTR's embedding_regularizer).
    embedding_reg: float = 1e-5
    # Fraction of user/item ids replaced by the unknown bucket (0) while training.
    unknown_rate: float = 0.05
    # Loss = w_like * BCE(like) + w_love * BCE(love). Equal weights, as in the paper: love is
    # rarer, but AUC is insensitive to the base rate and up-weighting it would only trade
    # like's calibration for love's.
    task_weights: tuple[float, ...] = (1.0, 1.0)
    seed: int = 0

    def __post_init__(self):
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not self.expert_hidden:
            raise ValueError("expert_hidden must name at least one layer width, e.g. [128, 64]")
        if not 0 <= self.unknown_rate < 1:
            raise ValueError(f"unknown_rate must be in [0, 1), got {self.unknown_rate}")
        if len(self.task_weights) != len(TASKS):
            raise ValueError(f"task_weights needs one weight per task {TASKS}, got {self.task_weights}")
        if any(w < 0 for w in self.task_weights) or sum(self.task_weights) <= 0:
            raise ValueError(f"task_weights must be >= 0 and not all 0, got {self.task_weights}")


class Expert(nn.Module):
    """One shared expert: an MLP whose last hidden layer is its output ``[B, expert_dim]``."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.mlp = MLP(in_dim, hidden, out_dim=None, dropout=dropout)
        self.out_dim = self.mlp.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Gate(nn.Module):
    """One task's gate: ``softmax(W x)`` over the experts, ``[B, n_experts]`` (the paper's
    linear gate; each row sums to 1)."""

    def __init__(self, in_dim: int, n_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class MMoE(nn.Module):
    """Shared experts and one gate per task: ``x -> [B, n_tasks, expert_dim]``, each task's
    gate-weighted sum of the expert outputs."""

    def __init__(self, in_dim: int, n_experts: int, n_tasks: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.experts = nn.ModuleList(Expert(in_dim, hidden, dropout) for _ in range(n_experts))
        self.gates = nn.ModuleList(Gate(in_dim, n_experts) for _ in range(n_tasks))
        self.out_dim = self.experts[0].out_dim

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_tasks, n_experts]``, each ``[b, t]`` row a softmax over experts."""
        return torch.stack([gate(x) for gate in self.gates], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        return torch.bmm(self.gate_weights(x), experts)  # [B, T, E] @ [B, E, H] -> [B, T, H]


class MMoEModule(nn.Module):
    """Embeddings -> MMoE -> one tower per task -> ``logits [B, n_tasks]``."""

    def __init__(self, cardinalities: list[int], n_dense: int, config: Config):
        super().__init__()
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim)
        in_dim = len(cardinalities) * config.embed_dim + n_dense
        self.mmoe = MMoE(in_dim, config.n_experts, len(TASKS), config.expert_hidden, config.dropout)
        self.towers = nn.ModuleList(
            MLP(self.mmoe.out_dim, config.tower_hidden, 1, config.dropout) for _ in TASKS
        )

    def features(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(sparse).flatten(1), dense], dim=1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        mixed = self.mmoe(self.features(sparse, dense))  # [B, T, H]
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)


class MMoEModel(TrainedModel):
    family = "mmoe"
    task = Task.MULTITASK
    config_cls = Config

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return MMoEModule(meta["cardinalities"], len(meta["dense_fields"]), config)

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
            outputs=(TensorSpec("logits", "float32", ("batch", len(TASKS))),),
            example_inputs=(sparse, dense),
            notes=(
                f"sparse columns in order {self.meta['sparse_fields']}; dense in order "
                f"{self.meta['dense_fields']}; 0 or out-of-range ids -> the field's trained unknown "
                f"bucket; logits columns = {[f'label_{t}' for t in TASKS]} (apply sigmoid)"
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
    module: MMoEModule, batch, config: Config, id_columns: tuple[int, ...] | list[int] = ()
) -> torch.Tensor:
    """``sum_t w_t * BCE-with-logits(task t)`` (+ L2 on the touched embedding rows);
    ``batch = (sparse, dense, labels [B, 2])``; ``id_columns`` get unknown-id masking."""
    sparse, dense, labels = batch
    sparse = _mask_ids(sparse, list(id_columns), config.unknown_rate)
    per_task = nn.functional.binary_cross_entropy_with_logits(
        module(sparse, dense), labels, reduction="none"
    ).mean(dim=0)
    loss = (per_task * torch.tensor(config.task_weights, dtype=per_task.dtype)).sum()
    if config.embedding_reg > 0:
        loss = loss + config.embedding_reg * module.embedding(sparse).pow(2).sum(dim=(1, 2)).mean()
    return loss


def _labels(c) -> np.ndarray:
    """``[N, 2]`` float32 labels in ``TASKS`` order."""
    return np.stack([getattr(c, f"label_{t}") for t in TASKS], axis=1).astype(np.float32)


def training_batch(snapshot: Snapshot, config: Config, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """The first ``rows`` train rows as ``loss_fn``'s batch (tests: one step lowers the loss)."""
    c = snapshot.ctr("train", max_history=1)
    return tuple(torch.from_numpy(np.ascontiguousarray(a[:rows])) for a in (c.sparse, c.dense, _labels(c)))


@torch.no_grad()
def predict_logits(module: nn.Module, sparse: np.ndarray, dense: np.ndarray, batch: int = 8192) -> np.ndarray:
    """``[N, 2]`` logits in eval mode."""
    module.eval()
    out = [
        module(torch.from_numpy(sparse[lo : lo + batch]), torch.from_numpy(dense[lo : lo + batch])).numpy()
        for lo in range(0, len(sparse), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(TASKS)), np.float32)


def mean_task_auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Early-stopping metric: the mean AUC over the tasks whose labels hold both classes."""
    tasks = [t for t in range(labels.shape[1]) if len(np.unique(labels[:, t])) == 2]
    aucs = [auc(logits[:, t], labels[:, t]) for t in tasks]
    if not aucs:
        raise ValueError("mmoe: no task has both classes in the evaluation rows; cannot compute AUC")
    return float(np.mean(aucs))


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> MMoEModel:
    fields = list(snapshot.meta["sparse_fields"])
    card = [int(snapshot.meta["sparse_cardinality"][f]) for f in fields]
    train, valid = snapshot.ctr("train", max_history=1), snapshot.ctr("valid", max_history=1)
    if len(train) == 0:
        raise ValueError(f"{snapshot.path}: empty train split in fct_ctr_samples; mmoe needs train rows")
    meta = {
        "cardinalities": card,
        "sparse_fields": fields,
        "dense_fields": list(snapshot.meta["dense_fields"]),
        "tasks": list(TASKS),
    }
    id_columns = [c for c, f in enumerate(fields) if f in ("user_idx", "item_idx")]
    train_y = _labels(train)
    # Stop on valid when some task there has both classes, else (a tiny split) on train.
    ev, ev_y = (valid, _labels(valid)) if len(valid) else (train, train_y)
    if not any(len(np.unique(ev_y[:, t])) == 2 for t in range(len(TASKS))):
        ev, ev_y = train, train_y

    with deterministic(config.seed):
        module = MMoEModule(card, len(meta["dense_fields"]), config)
        history = train_torch(
            module,
            lambda m, b: loss_fn(m, b, config, id_columns),
            (train.sparse, train.dense, train_y),
            lambda m: mean_task_auc(predict_logits(m, ev.sparse, ev.dense), ev_y),
            family="mmoe",
            metric_name="mean_auc",
            higher_is_better=True,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer="adam",
            lr=config.lr,
            patience=config.patience,
            seed=config.seed,
            log=log,
        )
    return MMoEModel(config, module, meta, history)
