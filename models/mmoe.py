"""MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts") on ``Snapshot.ctr``, task ``multitask``.

Two tasks from fct_ctr_samples: ``like`` (label_like) and ``love`` (label_love, rarer).
``x = [field embeddings flattened, dense]``; ``E`` shared ``Expert`` MLPs read ``x``; each
task ``t`` has its own ``Gate``, ``g_t = softmax(W_t x)`` over the experts, and its own tower
on ``sum_i g_t,i * expert_i(x)``. ``forward`` returns ``logits [B, 2]`` (column 0 = like,
column 1 = love); the loss (a weighted sum of the two BCE-with-logits) is ``MMoE.loss``.

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

from common.metrics import auc
from models import ctr
from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.ctr import CtrTraining, ctr_meta, sparse_dense_spec, train_ctr
from models.data import Snapshot
from models.layers import MLP, FeaturesEmbedding

# Output columns, in order: the contract of the `multitask` task (docs/MODEL_API.md).
TASKS = ("like", "love")


@dataclass(frozen=True)
class Config(CtrTraining):
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
    # Training fields (lr, batch_size, epochs, patience, embedding_reg, unknown_rate, seed): CtrTraining.
    # Loss = w_like * BCE(like) + w_love * BCE(love). Equal weights, as in the paper: love is
    # rarer, but AUC is insensitive to the base rate and up-weighting it would only trade
    # like's calibration for love's.
    task_weights: tuple[float, ...] = (1.0, 1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not self.expert_hidden:
            raise ValueError("expert_hidden must name at least one layer width, e.g. [128, 64]")
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


class MMoEArch(nn.Module):
    """Shared experts and one gate per task: ``x -> [B, n_tasks, expert_dim]``, each task's
    gate-weighted sum of the expert outputs.

    Args:
        in_dim: width of ``x``.
        n_experts: shared ``Expert`` MLPs.
        n_tasks: one ``Gate`` per task.
        hidden: each expert's layer widths (its output is ``hidden[-1]`` wide).
        dropout: dropout inside the experts.
    """

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
    """Embeddings -> MMoEArch -> one tower per task -> ``logits [B, n_tasks]``."""

    def __init__(self, cardinalities: list[int], n_dense: int, config: Config):
        super().__init__()
        self.embedding = FeaturesEmbedding(cardinalities, config.embed_dim)
        in_dim = len(cardinalities) * config.embed_dim + n_dense
        self.mmoe = MMoEArch(in_dim, config.n_experts, len(TASKS), config.expert_hidden, config.dropout)
        self.towers = nn.ModuleList(
            MLP(self.mmoe.out_dim, config.tower_hidden, 1, config.dropout) for _ in TASKS
        )

    def features(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(sparse).flatten(1), dense], dim=1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        mixed = self.mmoe(self.features(sparse, dense))  # [B, T, H]
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)


def _labels(c) -> np.ndarray:
    """``[N, 2]`` float32 labels in ``TASKS`` order."""
    return np.stack([getattr(c, f"label_{t}") for t in TASKS], axis=1).astype(np.float32)


def mean_task_auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Early-stopping metric: the mean AUC over the tasks whose labels hold both classes."""
    tasks = [t for t in range(labels.shape[1]) if len(np.unique(labels[:, t])) == 2]
    aucs = [auc(labels[:, t], logits[:, t]) for t in tasks]
    if not aucs:
        raise ValueError("mmoe: no task has both classes in the evaluation rows; cannot compute AUC")
    return float(np.mean(aucs))


class MMoE(TrainedModel):
    family = "mmoe"
    task = Task.MULTITASK
    config_cls = Config
    # ``sum_t w_t * BCE(task t)`` (+ embedding L2), unknown-id masking: the shared ranking loss.
    loss = staticmethod(ctr.loss_fn)

    @staticmethod
    def training_batch(snapshot: Snapshot, config: Config, rows: int = 256) -> tuple[torch.Tensor, ...]:
        """The first ``rows`` train rows as ``loss``'s batch."""
        c = snapshot.ctr("train", max_history=1)
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a[:rows])) for a in (c.sparse, c.dense, _labels(c))
        )

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return MMoEModule(meta["cardinalities"], len(meta["dense_fields"]), config)

    def export_spec(self) -> ExportSpec:
        return sparse_dense_spec(
            self.meta,
            TensorSpec("logits", "float32", ("batch", len(TASKS))),
            f"logits columns = {[f'label_{t}' for t in TASKS]} (apply sigmoid)",
        )


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> MMoE:
    meta = {**ctr_meta(snapshot), "tasks": list(TASKS)}
    module, history = train_ctr(
        snapshot,
        config,
        lambda: MMoEModule(meta["cardinalities"], len(meta["dense_fields"]), config),
        meta,
        "mmoe",
        log,
        labels=_labels,
        metric=mean_task_auc,
        metric_name="mean_auc",
    )
    return MMoE(config, module, meta, history)
