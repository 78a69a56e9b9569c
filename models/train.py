"""One plain training loop for torch families, and where it runs.

No Trainer hierarchy: a family passes its module, a loss closure, its training rows (numpy
arrays, or a ``models.stream.ParquetRows`` that reads the snapshot in row-group batches) and a
validation closure. The metrics that pick the best epoch live with every other metric in
``common/metrics.py``.

Where it runs is the ``models.runtime.Runtime`` the caller set: the loop moves the module and
every batch to its device, runs the loss under the runtime's autocast (``precision``: by default
bf16 on CUDA, fp16 with a GradScaler where bf16 is missing, none on CPU; bf16 on CPU only when
asked) and hands the float32 module back on the CPU, so saving, export and the parity gate never
depend on where or in what precision training ran. A family's ``max_minutes`` bounds the loop
(``train_torch``).

Under ``torchrun`` (a runtime with ``world_size`` > 1) the same loop trains with
DistributedDataParallel: each rank steps on its part of every batch, rank 0 alone validates, and
its metric and budget verdict are broadcast so that every rank stops at the same step
(``models.distributed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from models.distributed import Ranks
from models.lazy_sgd import LazySGD, rows_caught_up
from models.runtime import Budget, Runtime, Stepper, current_runtime, record_loop, state_copy, to_device

Log = Callable[[str], None]


@contextmanager
def deterministic(seed: int, threads: int | None = None):
    """Seed torch's global RNG and pin intra-op threads (restored on exit).

    ``threads=None`` takes the runtime's (``RECSYS_TORCH_THREADS``, default 1). One thread by
    default: these embedding models gain nothing from intra-op parallelism at batch ~1k, and on
    a small shared machine torch's spinning OpenMP threads made DeepFM training ~25x slower when
    another process was busy (measured in the pipeline benchmark; BENCHMARKS.md, "Training
    threads", measures 1 vs 2). Families train in parallel as separate Dagster steps instead. A
    fixed thread count also makes results independent of the machine's core count.
    """
    torch.manual_seed(seed)
    old = torch.get_num_threads()
    torch.set_num_threads(threads or current_runtime().threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class ArrayRows:
    """Training rows held in memory: row-aligned numpy arrays, one permutation per epoch from a
    numpy RNG seeded once (the loop's original order; ``ParquetRows`` reproduces it)."""

    def __init__(self, arrays: Sequence[np.ndarray], seed: int, family: str = ""):
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ValueError(f"{family}: training arrays have different lengths {[len(a) for a in arrays]}")
        self.tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        self.rows = n
        self.rng = np.random.default_rng(seed)

    def epoch(self, epoch: int, batch_size: int) -> Iterator[list[torch.Tensor]]:
        order = torch.from_numpy(self.rng.permutation(self.rows))
        for lo in range(0, self.rows, batch_size):
            idx = order[lo : lo + batch_size]
            yield [t[idx] for t in self.tensors]


def history_row(
    epoch: int,
    train_loss: float | None,
    valid_metric: float | None,
    metric_name: str,
    rows: int,
    seconds: float,
) -> dict:
    return {
        "epoch": int(epoch),
        "train_loss": None if train_loss is None else float(train_loss),
        "valid_metric": None if valid_metric is None else float(valid_metric),
        "valid_metric_name": metric_name,
        "rows_per_s": float(rows / max(seconds, 1e-9)),
        "seconds": float(seconds),
    }


def format_row(family: str, row: dict) -> str:
    metric = "n/a" if row["valid_metric"] is None else f"{row['valid_metric']:.4f}"
    loss = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
    return (
        f"[{family}] epoch {row['epoch']:3d}  train_loss {loss}  "
        f"valid_{row['valid_metric_name']} {metric}  {row['rows_per_s']:,.0f} rows/s  {row['seconds']:.1f}s"
    )


def make_optimizer(params, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                   sparse: Sequence[nn.Parameter] = ()):  # fmt: skip
    """Adam or SGD over ``params``. With ``sparse`` (weights of tables that give sparse gradients,
    ``sparse_tables``; no weight decay) those go, with Adam, to ``torch.optim.SparseAdam``, a lazy
    Adam: only the rows a batch touched update their moments and move, where dense Adam moves
    every row at every step (same betas, eps and learning rate; another optimiser). With SGD they
    go to ``models.lazy_sgd.LazySGD``, the same momentum SGD as the dense one at the cost of the
    touched rows (the loop calls ``catch_up`` before it reads the weights). The rest stays dense.

    Adam and SGD step all their tensors at once (``foreach``, torch's default only on CUDA):
    on CPU that is the same arithmetic per element, so the same weights bit for bit, with one
    Python call per step instead of one per tensor (ncf_mlp's fit on the default data 30.7 ->
    23.7 s)."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"optimizer {name!r} is not one of 'adam', 'sgd'")
    if sparse:
        if weight_decay:
            raise ValueError("sparse embedding gradients need an optimiser without weight_decay")
        lazy = {id(p) for p in sparse}
        dense = [p for p in params if id(p) not in lazy]
        if name == "adam":
            optimizers = [torch.optim.SparseAdam(list(sparse), lr=lr)]
            head = [torch.optim.Adam(dense, lr=lr, foreach=True)] if dense else []
        else:
            optimizers = [LazySGD(list(sparse), lr=lr, momentum=momentum)]
            head = [torch.optim.SGD(dense, lr=lr, momentum=momentum, foreach=True)] if dense else []
        return Optimizers([*head, *optimizers])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


class Optimizers:
    """Several optimisers stepped as one (``Stepper`` steps each through its GradScaler on CUDA)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def catch_up(self) -> None:
        for optimizer in self.optimizers:
            catch_up(optimizer)


def catch_up(optimizer) -> None:
    """Bring a lazy optimiser's rows to the dense algorithm's weights (``LazySGD``); others have
    nothing to do."""
    if hasattr(optimizer, "catch_up"):
        optimizer.catch_up()


def sparse_tables(module: nn.Module, min_rows: int) -> dict[str, nn.Embedding]:
    """The module's ``nn.Embedding`` tables of at least ``min_rows`` rows (none when 0), by name.
    Only for tables the loss reads by lookup: a family whose loss also reads a table's whole
    weight (cdae's reconstruction) trains with ``sparse=False``."""
    if min_rows <= 0:
        return {}
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Embedding) and m.num_embeddings >= min_rows and m.max_norm is None
    }


@contextmanager
def sparse_gradients(tables: dict[str, nn.Embedding]):
    """Lookups into ``tables`` give sparse gradients while training; plain tables again after
    (the saved module, the export and the parity gate never see the flag)."""
    for table in tables.values():
        table.sparse = True
    try:
        yield
    finally:
        for table in tables.values():
            table.sparse = False


# On CUDA a finiteness check syncs the device; check every this many batches (and at epoch end).
CHECK_EVERY = 64


def _check_finite(loss: torch.Tensor, family: str, epoch: int, lr: float) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{family}: loss became {loss.item()} in epoch {epoch}; lower the learning rate ({lr})"
        )


def train_torch(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor],
    arrays,
    evaluate: Callable[[nn.Module], float],
    *,
    family: str,
    metric_name: str,
    higher_is_better: bool,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    patience: int = 3,
    seed: int = 0,
    log: Log = print,
    prepare: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]] | None = None,
    max_minutes: float | None = None,
    sparse: bool | Collection[str] = True,
) -> list[dict]:
    """Mini-batch training with early stopping and an optional time budget; restores the best
    epoch's weights and returns the module on the CPU, in eval mode.

    ``arrays`` are row-aligned numpy arrays (features..., target), or rows with an
    ``epoch(epoch, batch_size)`` batch iterator and a ``rows`` count (``models.stream.ParquetRows``).
    Each step hands ``loss_fn(module, batch)`` one shuffled mini-batch, after ``prepare(batch)``
    (CPU-side work such as negative sampling) and the move to the runtime's device.
    ``evaluate(module)`` runs in eval mode after every epoch, with the module on that device.

    Budget (``max_minutes``, checked after every batch): when it runs out mid-epoch and an epoch
    was already validated, the partial epoch is dropped and training stops; when it runs out
    before the first validation, the current weights are validated as epoch 1 (so there is
    always a best checkpoint). After a validated epoch an exhausted budget stops training too.
    Either way the best validated weights are kept and the loop's report (``record_loop``) says
    ``budget_hit: true``. Returns one history row per validated epoch.

    Sparse tables: without weight decay, in one process, embedding tables of at least the
    runtime's ``sparse_min_rows`` rows train with sparse gradients, with a lazy Adam or the
    dense-equivalent ``LazySGD`` (``make_optimizer``); the report names them
    (``sparse_tables``). ``sparse=False`` keeps every table dense (a loss that reads a whole
    table's weight); a collection of table names allows only those (cdae: its user nodes).

    With ``world_size`` > 1 processes (``models.distributed.Ranks``), ``batch_size`` is the global
    batch: each rank steps on its part of it; ``evaluate`` runs on rank 0 only; the history's loss
    and rows are over every rank, and every rank returns the same (best) weights.
    """
    rt = current_runtime()
    rows = arrays if hasattr(arrays, "epoch") else ArrayRows(arrays, seed, family)
    if rows.rows == 0:
        raise ValueError(f"{family}: no training rows; is the snapshot's train split empty?")
    device = rt.torch_device
    torch.manual_seed(seed)
    module.to(device)
    lazy = sparse_tables(module, rt.sparse_rows if sparse and not weight_decay else 0)
    if not isinstance(sparse, bool):
        lazy = {name: table for name, table in lazy.items() if name in sparse}
    opt = make_optimizer(list(module.parameters()), optimizer, lr, momentum, weight_decay,
                         sparse=[t.weight for t in lazy.values()])  # fmt: skip
    stepper = Stepper(opt, rt)
    budget = Budget(max_minutes, rt.clock)
    ranks = Ranks(rt, module, loss_fn, seed, family)
    history: list[dict] = []
    best, best_state, bad, stopped = None, state_copy(module), 0, "epochs"
    with sparse_gradients(lazy), rows_caught_up(lazy, opt):
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            module.train()
            total = torch.zeros((), dtype=torch.float64, device=device)
            seen, cut = 0, False
            for k, (batch, weight) in enumerate(ranks.batches(rows, epoch, batch_size)):
                n = len(batch[0])
                batch = to_device(prepare(batch) if prepare else batch, device)
                with stepper.autocast():
                    loss = ranks.loss(batch)
                if device.type == "cpu" or k % CHECK_EVERY == 0:
                    _check_finite(loss, family, epoch, lr)
                stepper.step(loss if weight == 1.0 else loss * weight)
                total += loss.detach().double() * n
                seen += n
                if ranks.budget_out(budget, k):
                    cut = True
                    break
            total, seen = ranks.summed(total, seen)
            _check_finite(total, family, epoch, lr)
            if cut and best is not None:
                kept = history[_best_index(history, higher_is_better)]["epoch"]
                log(
                    f"[{family}] time budget of {max_minutes} min ran out in epoch {epoch}; "
                    f"keeping epoch {kept}"
                )
                stopped = "budget"
                break
            catch_up(opt)  # a lazy SGD's idle rows move to where dense SGD has them
            module.eval()
            with torch.no_grad():
                metric = ranks.metric(evaluate)
            seconds = time.perf_counter() - start
            row = history_row(epoch, total.item() / seen, metric, metric_name, seen, seconds)
            history.append(row)
            log(format_row(family, row))
            improved = best is None or (metric > best if higher_is_better else metric < best)
            if improved:
                best, best_state, bad = metric, state_copy(module), 0
            else:
                bad += 1
                if bad >= patience:
                    log(f"[{family}] early stop: no better valid_{metric_name} for {patience} epochs")
                    stopped = "early_stop"
                    break
            if ranks.budget_out(budget):
                note = " (cut short: its weights so far were validated)" if cut else ""
                log(f"[{family}] time budget of {max_minutes} min ran out after epoch {epoch}{note}")
                stopped = "budget"
                break
    module.to("cpu")
    module.load_state_dict(best_state)
    module.eval()
    log(f"[{family}] best valid_{metric_name} {best:.4f}")
    report = loop_report(family, history, higher_is_better, stopped, budget, rt, sparse=lazy)
    record_loop({**report, **ranks.report()})
    return history


def _best_index(history: list[dict], higher_is_better: bool) -> int:
    metrics = [r["valid_metric"] for r in history]
    pick = max if higher_is_better else min
    return (
        metrics.index(pick(m for m in metrics if m is not None))
        if any(m is not None for m in metrics)
        else len(history) - 1
    )


def loop_report(
    family: str, history: list[dict], higher_is_better: bool, stopped: str, budget: Budget, rt: Runtime,
    sparse: Sequence[str] = (),
) -> dict:  # fmt: skip
    """One training loop's summary for the model's metadata (``pipeline.steps.train``); ``sparse``
    names the tables that trained with sparse gradients."""
    best = history[_best_index(history, higher_is_better)]["epoch"] if history else None
    return {"family": family, "epochs": len(history), "best_epoch": best, "stopped": stopped,
            "budget_hit": budget.hit, "max_minutes": budget.max_minutes, "device": rt.device,
            "sparse_tables": sorted(sparse)}  # fmt: skip
