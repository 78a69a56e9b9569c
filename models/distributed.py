"""Data-parallel training inside each ``torchrun`` process: joining the process group, this rank's
part of every optimiser step, and the decisions rank 0 takes for all. Nothing here starts
processes (``pipeline/torchrun.py`` launches the group); with one process every piece is the
plain loop's, so a single-process fit is bit-identical to one without this module.

DistributedDataParallel averages the ranks' gradients after each backward, so every rank must
take the same number of optimiser steps per epoch, or the longer ranks wait for ever in an
all-reduce. How the rows are cut:

- **global batches** (in-memory arrays, and a streamed split held in fewer than
  ``MIN_GROUPS_PER_RANK`` row groups per rank, such as the default data's one): every rank draws
  the same shuffled order, each global batch of ``B`` rows is cut into ``W`` contiguous parts and
  rank ``r`` trains on part ``r``. Each rank's loss is weighted by ``n_r * W / n`` so that DDP's
  average equals the gradient of the mean over the whole global batch: a ``W``-process step is the
  1-process step of batch ``B``, up to float summation order. A last global batch with fewer rows
  than ranks is dropped (at most ``W - 1`` rows an epoch).
- **row groups** (a streamed split with at least ``MIN_GROUPS_PER_RANK`` row groups per rank):
  each rank reads only its own row groups (``ParquetRows`` balances them by rows), in batches of
  ``B // W`` rows. The ranks then hold slightly different numbers of rows, and every rank stops
  after the step count of the rank with the fewest: **cut to the minimum**, not padded. A
  padded (cycled) epoch would train the short rank's rows twice, weighting them double; the cut
  drops less than one row group per rank, and which rows it drops changes every epoch with the
  block shuffle. Rows dropped are counted in the loop's report (``rows_dropped``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.runtime import Budget, Runtime, current_runtime
from models.stream import ParquetRows

LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]

# Fewer row groups than this per rank: cut global batches instead of row groups (the row-group
# cut would drop up to one group per rank; with 4 or more per rank that is at most about 1/4 of an
# epoch's rows on a badly split file, usually one partial group).
MIN_GROUPS_PER_RANK = 4
# With a budget, rank 0's clock is read and broadcast every this many steps (and after every
# epoch): a broadcast per step would sync a GPU every step.
BUDGET_EVERY = 16
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def start(device: str, threads: int, buffer_rows: int, precision: str = "auto") -> Runtime:
    """Join the process group ``torchrun`` set up (its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT``): NCCL on GPUs (rank ``r`` on ``cuda:LOCAL_RANK``), gloo on CPU.
    Returns the runtime this rank trains in."""
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: start data-parallel training with torchrun "
                           "(pipeline.torchrun.launch does), not as a plain process")  # fmt: skip
    rank, world, local = (int(os.environ[v]) for v in TORCHRUN_VARIABLES[:3])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = f"cuda:{local}"
    else:
        dist.init_process_group("gloo")
    return Runtime(device=device, threads=threads, buffer_rows=buffer_rows, rank=rank, world_size=world,
                   precision=precision)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def broadcast(value, rt: Runtime):
    """Rank 0's ``value`` (any picklable object) on every rank; every rank must call it."""
    if rt.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int) -> int:
    """``seed`` on rank 0 (so one process draws what it always drew), a seed of its own on every
    other rank: negatives, corruption masks, dropout and unknown-id masks must not repeat the
    same draws on every rank's part of a batch."""
    rank = current_runtime().rank
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rank_part(n: int, rt: Runtime) -> tuple[int, int, float] | None:
    """This rank's contiguous part ``[lo, hi)`` of a global batch of ``n`` rows and the weight of
    its loss (``(hi - lo) * W / n``); None when the batch has fewer rows than ranks (dropped)."""
    w = rt.world_size
    if w == 1:
        return 0, n, 1.0
    if n < w:
        return None
    lo, hi = n * rt.rank // w, n * (rt.rank + 1) // w
    return lo, hi, (hi - lo) * w / n


class LossModule(nn.Module):
    """``loss_fn(module, batch)`` as one forward, so DDP sees the whole loss: the families' losses
    call submodules directly (the CTR embedding L2, CDAE's sparse encoder, NCF's pair logits)."""

    def __init__(self, module: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.module, batch)


class RankSteps:
    """This rank's part of every optimiser step of an epoch, as ``(batch, loss weight)``, the same
    number of steps on every rank (the module docstring says how the rows are cut)."""

    def __init__(self, rows, rt: Runtime, family: str = ""):
        self.rt, self.family, self.rows_dropped = rt, family, 0
        streamed = isinstance(rows, ParquetRows)
        groups = sum(n > 0 for n in rows.group_rows.values()) if streamed else 0
        full = groups >= MIN_GROUPS_PER_RANK * rt.world_size
        self.cut = "row groups" if full else "global batches"
        # a global-batch cut reads the file as one process does, so every rank draws its order
        self.rows = rows if full or not streamed else rows.whole()

    def epoch(self, epoch: int, batch_size: int) -> Iterator[tuple[list[torch.Tensor], float]]:
        w = self.rt.world_size
        if batch_size < w:
            raise ValueError(f"{self.family}: batch_size {batch_size} is smaller than the {w} training "
                             f"processes; raise batch_size or lower RECSYS_TRAIN_PROCS")  # fmt: skip
        if self.cut == "global batches":
            for batch in self.rows.epoch(epoch, batch_size):
                part = rank_part(len(batch[0]), self.rt)
                if part is None:
                    self.rows_dropped += len(batch[0])
                    continue
                lo, hi, weight = part
                yield [t[lo:hi] for t in batch], weight
            return
        b = batch_size // w
        counts = [self.rows.rows_for(epoch, r) for r in range(w)]
        steps = min(math.ceil(c / b) for c in counts)
        self.rows_dropped += sum(max(0, c - steps * b) for c in counts)
        batches = self.rows.epoch(epoch, b)
        try:
            for k in range(steps):
                sizes = [min(b, c - k * b) for c in counts]
                yield next(batches), sizes[self.rt.rank] * w / sum(sizes)
        finally:
            batches.close()


class Ranks:
    """What a training loop does differently with ``W > 1`` processes: the DDP-wrapped loss, this
    rank's batches, epoch sums over ranks, and rank 0's metric and budget broadcast to every rank.
    With one process each method is the plain loop's step (no collective, no extra clock read)."""

    def __init__(self, rt: Runtime, module: nn.Module, loss_fn: LossFn, seed: int, family: str = ""):
        self.rt, self.module, self.loss_fn, self.family = rt, module, loss_fn, family
        self.many = rt.world_size > 1
        self.net: nn.Module | None = None
        self.steps: RankSteps | None = None
        if self.many:
            ids = [rt.torch_device.index] if rt.torch_device.type == "cuda" else None
            # DDP's constructor copies rank 0's parameters and buffers to every rank; no family changes
            # a buffer while training (no BatchNorm), so no buffer is re-sent before each forward
            wrapped = LossModule(module, loss_fn)
            self.net = DistributedDataParallel(wrapped, device_ids=ids, forward_sync_buffers=False)
            torch.manual_seed(rank_seed(seed))

    def batches(self, rows, epoch: int, batch_size: int) -> Iterator[tuple[list[torch.Tensor], float]]:
        if not self.many:
            return ((batch, 1.0) for batch in rows.epoch(epoch, batch_size))
        if self.steps is None:
            self.steps = RankSteps(rows, self.rt, self.family)
        return self.steps.epoch(epoch, batch_size)

    def loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(batch) if self.net is not None else self.loss_fn(self.module, batch)

    def summed(self, total: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        """The epoch's loss sum and row count over every rank."""
        if not self.many:
            return total, seen
        both = torch.stack([total, torch.tensor(float(seen), dtype=total.dtype, device=total.device)])
        dist.all_reduce(both)
        return both[0], int(both[1].item())

    def metric(self, evaluate: Callable[[nn.Module], float]):
        """Rank 0 alone evaluates; every rank gets its value (and so takes the same early stop)."""
        value = evaluate(self.module) if self.rt.rank == 0 else None
        return broadcast(None if value is None else float(value), self.rt)

    def budget_out(self, budget: Budget, step: int | None = None) -> bool:
        """Whether the budget ran out, as rank 0's clock says: after every step with one process;
        with more, every ``BUDGET_EVERY`` steps (``step`` counts from 0) and after each epoch
        (``step`` None). Without a budget no rank reads a clock or broadcasts."""
        if not self.many:
            return budget.expired()
        if budget.max_minutes is None or (step is not None and (step + 1) % BUDGET_EVERY):
            return False
        budget.hit = bool(broadcast(budget.expired(), self.rt))
        return budget.hit

    def report(self) -> dict:
        """The loop report's extra fields with several processes (none with one)."""
        if not self.many:
            return {}
        cut = self.steps.cut if self.steps else "global batches"
        dropped = self.steps.rows_dropped if self.steps else 0
        return {"world_size": self.rt.world_size, "backend": backend(), "cut": cut, "rows_dropped": dropped}
