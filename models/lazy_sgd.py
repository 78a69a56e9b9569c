"""SGD with momentum for embedding tables with sparse gradients: torch's dense algorithm at the
cost of the rows a batch touches.

torch's ``SGD(momentum=mu)`` (no dampening, no Nesterov, no weight decay) updates every row of a
table at every step: ``v <- mu v + g`` and ``p <- p - lr v``. A row that no batch touched has
``g = 0``, so over ``t`` such steps it only follows the closed form

    v <- mu^t v        p <- p - lr v (mu + mu^2 + ... + mu^t) = p - lr v mu (1 - mu^t) / (1 - mu)

``LazySGD`` applies that closed form to the rows a batch reads, just before the lookup reads them
(``rows_caught_up`` hooks the tables: the gradient must be taken where dense SGD has the row),
then the step proper to the rows it touched; ``catch_up()`` applies it to every row. The
training loop calls ``catch_up`` before it validates or copies weights, so what it sees is the
dense optimiser's weights, up to float32 rounding of the closed form against repeated
multiplication (tests/test_sparse_embeddings.py bounds the gap).
Unlike ``torch.optim.SparseAdam``, this is the same algorithm as the dense one, not a lazy
variant: the families' L2 terms are in their losses over the rows a batch reads, never a weight
decay over whole tables (which would give every row a gradient at every step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LazySGD(torch.optim.Optimizer):
    """Dense-equivalent momentum SGD for parameters whose gradients are sparse row tensors."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        if lr <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"LazySGD needs lr > 0 and 0 <= momentum < 1, got lr {lr}, momentum {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        if len(self.param_groups) != 1:
            raise ValueError("LazySGD takes one parameter group")
        self.steps = 0  # steps taken; a row's `last` is the step that last moved it

    @torch.no_grad()
    def _advance(self, p: torch.Tensor, rows: torch.Tensor | None, to_step: int) -> None:
        """Move ``rows`` of ``p`` (unique; None: all) over the steps since each last moved up to
        ``to_step``, where no batch read them: ``v <- mu^t v``, ``p <- p - lr v (mu + ... + mu^t)``."""
        state, (lr, mu) = self.state.get(p), (self.param_groups[0]["lr"], self.param_groups[0]["momentum"])
        if not state or mu == 0.0:
            return
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        buf = pick(state["buf"])
        idle = (to_step - pick(state["last"])).to(buf.dtype)
        decay = torch.pow(torch.tensor(mu, dtype=buf.dtype, device=buf.device), idle)
        decay = decay.reshape((-1,) + (1,) * (buf.dim() - 1))
        move = buf * (-lr * mu / (1.0 - mu)) * (1.0 - decay)
        if rows is None:
            p.add_(move)
            state["buf"].mul_(decay)
            state["last"].fill_(to_step)
        else:
            p.index_add_(0, rows, move)
            state["buf"].index_copy_(0, rows, buf * decay)
            state["last"][rows] = to_step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        lr, mu = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if not p.grad.is_sparse:
                raise ValueError("LazySGD steps tables with sparse gradients (nn.Embedding(sparse=True))")
            grad = p.grad.coalesce()
            rows, g = grad.indices()[0], grad.values()
            if mu == 0.0:
                p.index_add_(0, rows, g, alpha=-lr)
                continue
            state = self.state[p]
            if not state:
                state["buf"] = torch.zeros_like(p)
                state["last"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            self._advance(p, rows, self.steps - 1)  # rows a lookup did not bring up to date
            buf = state["buf"][rows] * mu + g
            p.index_add_(0, rows, -lr * buf)
            state["buf"].index_copy_(0, rows, buf)
            state["last"][rows] = self.steps
        return loss

    def catch_up_rows(self, p: torch.Tensor, index: torch.Tensor) -> None:
        """Bring the rows of ``p`` that ``index`` reads to where dense SGD has them now."""
        rows = torch.unique(index.reshape(-1))
        self._advance(p, rows[(rows >= 0) & (rows < p.shape[0])], self.steps)

    def catch_up(self) -> None:
        """Bring every row to where dense SGD has it after ``steps`` steps."""
        for p in self.param_groups[0]["params"]:
            self._advance(p, None, self.steps)


@contextmanager
def rows_caught_up(tables: dict[str, nn.Embedding], optimizer) -> Iterator[None]:
    """While training, every lookup into a table that ``optimizer`` (or one of an
    ``models.train.Optimizers``) steps with ``LazySGD`` first brings the rows it reads up to date."""
    lazies = [o for o in getattr(optimizer, "optimizers", [optimizer]) if isinstance(o, LazySGD)]
    handles = []
    for lazy in lazies:
        stepped = {id(p) for p in lazy.param_groups[0]["params"]}
        for table in tables.values():
            if id(table.weight) in stepped:
                hook = _catch_up_hook(lazy)
                handles.append(table.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _catch_up_hook(lazy: LazySGD):
    def hook(module: nn.Embedding, args: tuple) -> None:
        lazy.catch_up_rows(module.weight, args[0])

    return hook
