"""The training recipe of the ranking families on ``fct_ctr_samples``: deepfm, wide_deep, dlrm,
dcn_stacked, dcn_parallel (``fit_ctr``, they differ only in architecture), and the sequence
(din, bst) and multi-task (mmoe) families, which call ``train_ctr`` with their own inputs,
labels and early-stopping metric.

A single-task family subclasses ``CtrConfig`` (adding its architecture fields) and ``CtrModel``
(setting ``family``, ``config_cls`` and ``build_module``), and its ``fit`` is ``fit_ctr``:

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

from common.metrics import auc
from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.runtime import current_runtime, module_device
from models.train import deterministic, train_torch

Log = Callable[[str], None]


@dataclass(frozen=True)
class CtrTraining:
    """The training fields every ranking family shares (architecture fields go in subclasses)."""

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
    seed: int = 0
    # Time budget of the training loop in minutes (None = off): a scheduled run bounds its
    # training with it; when it runs out the best validated epoch so far is kept and the model's
    # metadata says budget_hit (models.train.train_torch).
    max_minutes: float | None = None
    # Valid rows scored per early-stopping check, at most: a larger split is thinned to every
    # ceil(n / eval_rows)-th row in file order (the default data's 10k rows are all scored). At
    # ML-25M shape all 2.5M valid rows took DIN 2-3 minutes per check, past its time budget;
    # 250k rows put AUC's standard error near 0.001.
    eval_rows: int = 250_000

    def __post_init__(self):
        if self.eval_rows < 1:
            raise ValueError(f"eval_rows must be >= 1, got {self.eval_rows}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or unset for no budget), got {self.max_minutes}")
        if not 0 <= self.unknown_rate < 1:
            raise ValueError(f"unknown_rate must be in [0, 1), got {self.unknown_rate}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.patience < 1:
            raise ValueError("lr must be > 0 and batch_size, epochs, patience >= 1")


@dataclass(frozen=True)
class CtrConfig(CtrTraining):
    """A single-task family's training fields: ``CtrTraining`` plus which label is the click."""

    # "like" or "love": which label of fct_ctr_samples is the click.
    label: str = "like"

    def __post_init__(self):
        super().__post_init__()
        if self.label not in ("like", "love"):
            raise ValueError(f"label must be 'like' or 'love', got {self.label!r}")


def sparse_dense_spec(meta: dict, output: TensorSpec, output_note: str) -> ExportSpec:
    """The spec of a ``sparse [batch, F]``, ``dense [batch, D]`` scorer with one ``output``.

    The example batch holds a row with every field unknown and one with an unknown user in a
    known context, so export and parity see the unknown buckets.
    """
    g = torch.Generator().manual_seed(0)
    card = torch.tensor(meta["cardinalities"])
    sparse = (torch.rand(4, len(card), generator=g) * (card - 1)).long() + 1
    sparse[0] = 0  # every field unknown
    sparse[1, 0] = 0  # unknown user, known context
    dense = torch.randn(4, len(meta["dense_fields"]), generator=g)
    return ExportSpec(
        inputs=(
            TensorSpec("sparse", "int64", ("batch", len(card))),
            TensorSpec("dense", "float32", ("batch", len(meta["dense_fields"]))),
        ),
        outputs=(output,),
        example_inputs=(sparse, dense),
        notes=(
            f"sparse columns in order {meta['sparse_fields']}; dense in order {meta['dense_fields']}; "
            f"0 or out-of-range ids -> the field's trained unknown bucket; {output_note}"
        ),
    )


ID_FIELDS = ("user_idx", "item_idx")


def ctr_meta(snapshot: Snapshot) -> dict:
    """Field order and sizes of the ``sparse``/``dense`` inputs, from the snapshot's meta.json."""
    fields = list(snapshot.meta["sparse_fields"])
    return {
        "cardinalities": [int(snapshot.meta["sparse_cardinality"][f]) for f in fields],
        "sparse_fields": fields,
        "dense_fields": list(snapshot.meta["dense_fields"]),
    }


def _has_both_classes(labels: np.ndarray) -> bool:
    """True if the labels (``[N]``, or ``[N, tasks]``: any task) hold both classes."""
    if len(labels) == 0:
        return False
    return any(len(np.unique(col)) == 2 for col in labels.reshape(len(labels), -1).T)


def train_ctr(
    snapshot: Snapshot,
    config: CtrTraining,
    build: Callable[[], nn.Module],
    meta: dict,
    family: str,
    log: Log,
    *,
    features: Callable = lambda c: (c.sparse, c.dense),
    labels: Callable,
    metric: Callable[[np.ndarray, np.ndarray], float] = lambda logits, y: auc(y, logits),
    metric_name: str = "auc",
    max_history: int = 1,
) -> tuple[nn.Module, list[dict]]:
    """Train ``build()`` on the train split of fct_ctr_samples, early stopping on ``metric`` over valid.

    ``features(c)`` gives the module's inputs from ``CtrArrays`` (``sparse`` first: it gets the
    unknown-id masking), ``labels(c)`` the targets (``[N]`` or ``[N, tasks]``). The early-stopping
    rows are valid when they hold both classes (any task), else train (a tiny split). The rows
    are streamed from the parquet in row-group batches (``Snapshot.ctr_stream``), train shuffled
    and valid in file order, unless the runtime asks for the in-memory arrays.
    """
    rt = current_runtime()
    if rt.stream:
        data = CtrData(snapshot, max_history, features, labels, config.seed, config.eval_rows)
        rows, step = data.train_rows(rt), data.step
        score = lambda m: metric(*data.predict(m))  # noqa: E731
    else:
        train = snapshot.ctr("train", max_history=max_history)
        valid = snapshot.ctr("valid", max_history=max_history)
        rows = (*features(train), labels(train))
        ev = valid if _has_both_classes(labels(valid)) else train
        ev_x, ev_y = features(ev), labels(ev)
        step = eval_stride(len(ev_y), config.eval_rows)
        if step > 1:
            ev_x, ev_y = [x[::step] for x in ev_x], ev_y[::step]
        score = lambda m: metric(predict_logits(m, *ev_x), ev_y)  # noqa: E731
    if (rows.rows if rt.stream else len(rows[0])) == 0:
        raise ValueError(f"{snapshot.path}: empty train split in fct_ctr_samples; {family} needs train rows")
    if step > 1:
        log(f"[{family}] early stopping on every {step}th valid row (eval_rows {config.eval_rows:,})")
    id_columns = [c for c, f in enumerate(meta["sparse_fields"]) if f in ID_FIELDS]
    with deterministic(config.seed):
        module = build()
        history = train_torch(
            module,
            lambda m, b: loss_fn(m, b, config, id_columns),
            rows,
            score,
            family=family,
            metric_name=metric_name,
            higher_is_better=True,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer="adam",
            lr=config.lr,
            patience=config.patience,
            seed=config.seed,
            log=log,
            max_minutes=config.max_minutes,
        )
    return module, history


class CtrData:
    """fct_ctr_samples streamed for ``train_ctr``: the train rows shuffled (``ParquetRows``) and
    the early-stopping rows (valid, or train when valid lacks a class) scored in file order, so
    only the logits and labels of the early-stopping split are ever held whole."""

    def __init__(self, snapshot: Snapshot, max_history: int, features, labels, seed: int, eval_rows: int):
        self.snapshot, self.max_history, self.seed = snapshot, max_history, seed
        self.convert = lambda c: (*features(c), labels(c))
        ys = [b[0] for b in self._stream("valid", lambda c: (labels(c),)).ordered(1 << 16)]
        self.ev_split = "valid" if ys and _has_both_classes(np.concatenate(ys)) else "train"
        self.step = eval_stride(self._stream(self.ev_split, self.convert).rows, eval_rows)

    def _stream(self, split: str, convert, **kwargs):
        return self.snapshot.ctr_stream(split, self.max_history, convert, seed=self.seed, **kwargs)

    def train_rows(self, rt):
        return self._stream("train", self.convert, buffer_rows=rt.buffer_rows, rank=rt.rank,
                            world_size=rt.world_size)  # fmt: skip

    def predict(self, module: nn.Module, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of the early-stopping split, ``predict_logits``'s batches."""
        logits, ys, offset = [], [], 0
        for *x, y in self._stream(self.ev_split, self.convert).ordered(batch):
            if self.step > 1:  # the in-memory path's rows [::step], batch by batch
                keep = slice((-offset) % self.step, None, self.step)
                offset += len(y)
                x, y = [a[keep] for a in x], y[keep]
            logits.append(predict_logits(module, *x, batch=batch))
            ys.append(y)
        return np.concatenate(logits), np.concatenate(ys)


def eval_stride(rows: int, eval_rows: int) -> int:
    """Every how many early-stopping rows one is scored: 1 up to ``eval_rows`` rows."""
    return max(1, -(-rows // eval_rows))


def fit_ctr(snapshot: Snapshot, config: CtrConfig, model_cls: type[CtrModel], log: Log = print) -> CtrModel:
    """Train ``model_cls.build_module(config, meta)`` on ``sparse, dense`` -> ``label_<config.label>``."""
    meta = ctr_meta(snapshot)
    module, history = train_ctr(
        snapshot,
        config,
        lambda: model_cls.build_module(config, meta),
        meta,
        model_cls.family,
        log,
        labels=lambda c: getattr(c, f"label_{config.label}"),
    )
    return model_cls(config, module, meta, history)


def mask_ids(sparse: torch.Tensor, columns: list[int], rate: float) -> torch.Tensor:
    """Replace a random ``rate`` of the ids in ``columns`` by 0 (the unknown bucket)."""
    if rate <= 0 or not columns:
        return sparse
    sparse = sparse.clone()
    cols = sparse[:, columns]
    drop = torch.rand(cols.shape, device=cols.device) < rate
    sparse[:, columns] = torch.where(drop, torch.zeros_like(cols), cols)
    return sparse


def loss_fn(module: nn.Module, batch, config, id_columns: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
    """BCE-with-logits (+ L2 on the touched embedding rows); ``batch = (sparse, *other inputs, y)``.

    ``id_columns`` of ``sparse`` get unknown-id masking. With ``y [B, tasks]`` the loss is
    ``sum_t w_t * mean BCE(task t)``, ``w = config.task_weights`` (multi-task families).
    """
    sparse, *rest, y = batch
    sparse = mask_ids(sparse, list(id_columns), config.unknown_rate)
    logits = module(sparse, *rest)
    if y.dim() == 1:
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
    else:
        per_task = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0)
        loss = (
            per_task * torch.tensor(config.task_weights, dtype=per_task.dtype, device=per_task.device)
        ).sum()
    if config.embedding_reg > 0:
        loss = loss + config.embedding_reg * module.embedding(sparse).pow(2).sum(dim=(1, 2)).mean()
    return loss


@torch.no_grad()
def predict_logits(module: nn.Module, *arrays: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Eval-mode logits for row-aligned input arrays, in batches, on the module's device."""
    module.eval()
    device = module_device(module)
    n = len(arrays[0])
    out = [
        module(*(torch.from_numpy(a[lo : lo + batch]).to(device) for a in arrays)).float().cpu().numpy()
        for lo in range(0, n, batch)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def ctr_batch(snapshot: Snapshot, config: CtrConfig, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """The first ``rows`` train rows as ``loss_fn``'s batch."""
    c = snapshot.ctr("train", max_history=1)
    label = getattr(c, f"label_{config.label}")
    return tuple(torch.from_numpy(a[:rows]) for a in (c.sparse, c.dense, label))


class CtrModel(TrainedModel):
    """A fitted CTR family: ``sparse [B, F]``, ``dense [B, D]`` -> ``logit [B]``."""

    task: ClassVar[Task] = Task.CTR
    loss = staticmethod(loss_fn)
    training_batch = staticmethod(ctr_batch)

    def export_spec(self) -> ExportSpec:
        return sparse_dense_spec(
            self.meta,
            TensorSpec("logit", "float32", ("batch",)),
            f"label = label_{self.config.label}; output is a logit (apply sigmoid)",
        )
