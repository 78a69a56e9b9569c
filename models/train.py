"""One plain training loop for torch families.

No Trainer hierarchy: a family passes its module, a loss closure, numpy arrays and a
validation closure. The metrics that pick the best epoch live with every other metric in
``common/metrics.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

Log = Callable[[str], None]


@contextmanager
def deterministic(seed: int, threads: int | None = 1):
    """Seed torch's global RNG and pin intra-op threads (restored on exit).

    One thread by default: these embedding models gain nothing from intra-op parallelism at
    batch ~1k, and on a small shared machine torch's spinning OpenMP threads made DeepFM
    training ~25x slower when another process was busy (measured in the pipeline benchmark).
    Families train in parallel as separate Dagster steps instead. A fixed thread count also
    makes results independent of the machine's core count. ``threads=None`` leaves torch's.
    """
    torch.manual_seed(seed)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def make_optimizer(params, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not one of 'adam', 'sgd'")


def train_torch(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor],
    arrays: Sequence[np.ndarray],
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
) -> list[dict]:
    """Mini-batch training with early stopping; restores the best epoch's weights.

    ``arrays`` are row-aligned numpy arrays (features..., target); each step hands
    ``loss_fn(module, batch_tensors)`` one shuffled mini-batch of them. ``evaluate(module)``
    is called in eval mode after every epoch. Returns one history row per epoch.
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"{family}: training arrays have different lengths {[len(a) for a in arrays]}")
    if n == 0:
        raise ValueError(f"{family}: no training rows; is the snapshot's train split empty?")
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = make_optimizer(module.parameters(), optimizer, lr, momentum, weight_decay)
    history: list[dict] = []
    best, best_state, bad = None, copy.deepcopy(module.state_dict()), 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        module.train()
        order = torch.from_numpy(rng.permutation(n))
        total, seen = 0.0, 0
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            batch = [t[idx] for t in tensors]
            loss = loss_fn(module, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{family}: loss became {loss.item()} in epoch {epoch}; lower the learning rate ({lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        module.eval()
        with torch.no_grad():
            metric = float(evaluate(module))
        seconds = time.perf_counter() - start
        row = history_row(epoch, total / seen, metric, metric_name, seen, seconds)
        history.append(row)
        log(format_row(family, row))
        improved = best is None or (metric > best if higher_is_better else metric < best)
        if improved:
            best, best_state, bad = metric, copy.deepcopy(module.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                log(f"[{family}] early stop: no better valid_{metric_name} for {patience} epochs")
                break
    module.load_state_dict(best_state)
    module.eval()
    log(f"[{family}] best valid_{metric_name} {best:.4f}")
    return history
