"""Where a torch family trains: the ``Runtime`` (device, CPU threads, streamed or in-memory rows,
the rank/world size a multi-process sampler would get, the clock of the time budget), the
``Budget`` of ``max_minutes`` and the ``Stepper`` that does one optimiser step (autocast as the
runtime's ``precision`` says, a GradScaler with fp16).

The caller sets the runtime once per fit with ``use_runtime`` (``pipeline.steps.train`` builds it
from ``RECSYS_DEVICE``, ``RECSYS_TORCH_THREADS``, ``RECSYS_PRECISION`` and the run config), so a
family's ``fit`` signature does not change; every training loop reads it with ``current_runtime()``
and appends its report (``budget_hit``, ``epochs``, ``stopped``) to the list ``use_runtime`` yields.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")
# Autocast of the training step: ``auto`` is bf16 on CUDA (fp16 where bf16 is missing) and none on
# CPU, so CPU training stays bit for bit the float32 loop; ``fp32`` is none anywhere; ``bf16`` is
# bf16 on CUDA and on CPU too, where it pays only on CPUs with bf16 instructions (AVX512-BF16,
# AMX): BENCHMARKS.md, "bf16 autocast on CPU". Master weights, optimiser state, validation and the
# export stay float32 in every case.
PRECISIONS = ("auto", "fp32", "bf16")
# Rows shuffled together by the streaming loader: 2^18 rows is ~130 MB of DIN/BST rows (50-item
# histories) and holds the whole default data set (80k train rows), whose order is then the
# in-memory loop's exactly.
DEFAULT_BUFFER_ROWS = 1 << 18
# Embedding tables with at least this many rows train with sparse gradients and a lazy Adam
# or ``LazySGD`` (``models.train.make_optimizer``): dense Adam updates every row of every table at every step,
# so its step time grows with the catalogue (a 221k-row table: 74 ms against 7.7 ms per step),
# while below ~10k rows the dense step is the faster one (BENCHMARKS.md, "Sparse embedding
# gradients"). The default data's tables (under 3k rows) stay dense.
DEFAULT_SPARSE_MIN_ROWS = 20_000


class DeviceUnavailable(RuntimeError):
    """The device the settings ask for is not there; the message names the variable."""


def resolve_device(choice: str | None, variable: str = "RECSYS_DEVICE") -> torch.device:
    """``auto`` -> CUDA when torch sees one, else CPU; ``cpu``; ``cuda`` (or ``cuda:N``)."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"{variable}={choice}: torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda}). Run on a "
                f"machine with a GPU and a CUDA build of torch, or set {variable}=auto or cpu."
            )
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"{variable}={choice}: only {torch.cuda.device_count()} CUDA device(s) are visible."
            )
        return device
    raise ValueError(f"{variable}={choice!r} is not one of {', '.join(DEVICES)} (or cuda:N).")


def check_precision(runtime: Runtime, variable: str = "RECSYS_PRECISION") -> None:
    """bf16 on a GPU without it fails before training, naming the setting that asked."""
    device = runtime.torch_device
    if runtime.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(
            f"{variable}=bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16 support; set "
            "auto (fp16 with a gradient scaler there) or fp32."
        )


@dataclass(frozen=True)
class Runtime:
    """Where and how a fit trains. The default is the project's CPU default: one thread,
    streamed rows, a single process. ``rank``/``world_size`` cut the streamed row groups (the
    shape a DistributedDataParallel run needs; nothing here starts processes)."""

    device: str = "cpu"  # a resolved device: "cpu", "cuda", "cuda:1"
    threads: int = 1  # CPU intra-op threads (BENCHMARKS.md, "Training threads")
    stream: bool = True  # False: the in-memory rows (tests compare the two)
    buffer_rows: int = DEFAULT_BUFFER_ROWS
    rank: int = 0
    world_size: int = 1
    # tables of at least this many rows get sparse gradients (0: none); one process only, as
    # DistributedDataParallel's NCCL all-reduce takes dense gradients
    sparse_min_rows: int = DEFAULT_SPARSE_MIN_ROWS
    precision: str = "auto"  # one of PRECISIONS
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self):
        if self.threads < 1 or self.buffer_rows < 1:
            raise ValueError(f"threads and buffer_rows must be >= 1, got {self.threads}, {self.buffer_rows}")
        if self.sparse_min_rows < 0:
            raise ValueError(f"sparse_min_rows must be >= 0 (0: none), got {self.sparse_min_rows}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype (``PRECISIONS``): under ``auto`` bf16 on CUDA (fp16 where bf16 is missing)
        and none on CPU (full float32); none under ``fp32``; bf16 under ``bf16``."""
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if self.torch_device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def sparse_rows(self) -> int:
        """The sparse-gradient threshold in effect: 0 (none) with more than one process."""
        return self.sparse_min_rows if self.world_size == 1 else 0

    def describe(self) -> dict:
        amp = {None: None, torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return {"device": self.device, "threads": self.threads, "amp": amp,
                "rows": "stream" if self.stream else "memory", "buffer_rows": self.buffer_rows,
                "rank": self.rank, "world_size": self.world_size,
                "sparse_min_rows": self.sparse_rows}  # fmt: skip

    def key(self) -> dict:
        """What of the runtime changes the trained weights (the reuse cache keys on it)."""
        return {k: v for k, v in self.describe().items() if k != "rank"}


DEFAULT_RUNTIME = Runtime()
_RUNTIME: ContextVar[Runtime | None] = ContextVar("recsys_runtime", default=None)
_LOOPS: ContextVar[list | None] = ContextVar("recsys_training_loops", default=None)


def current_runtime() -> Runtime:
    return _RUNTIME.get() or DEFAULT_RUNTIME


@contextmanager
def use_runtime(runtime: Runtime) -> Iterator[list[dict]]:
    """Train inside with ``runtime``; yields the list every training loop appends its report to
    (``budget_hit``, ``epochs``, ``stopped``, ...), which the caller turns into metadata."""
    loops: list[dict] = []
    tokens = _RUNTIME.set(runtime), _LOOPS.set(loops)
    try:
        yield loops
    finally:
        _RUNTIME.reset(tokens[0])
        _LOOPS.reset(tokens[1])


def record_loop(report: dict) -> None:
    loops = _LOOPS.get()
    if loops is not None:
        loops.append(dict(report))


class Budget:
    """A family's time budget: ``max_minutes`` (None = off) on the runtime's clock, from creation."""

    def __init__(self, max_minutes: float | None, clock: Callable[[], float] | None = None):
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or unset, got {max_minutes}")
        self.clock = clock or current_runtime().clock
        self.max_minutes = max_minutes
        self.start = self.clock() if max_minutes is not None else 0.0  # no budget, no clock reads
        self.hit = False

    def expired(self) -> bool:
        if self.max_minutes is not None and not self.hit:
            self.hit = self.clock() - self.start >= self.max_minutes * 60.0
        return self.hit

    def remaining_minutes(self) -> float | None:
        if self.max_minutes is None:
            return None
        return self.max_minutes - (self.clock() - self.start) / 60.0


class Stepper:
    """One optimiser step: the loss under the runtime's autocast (``Runtime.amp_dtype``), with a
    GradScaler under fp16; plain float32 without one (so CPU training at the default precision is
    bit-identical to a loop without this class). ``optimizer`` may be a
    ``models.train.Optimizers`` (a lazy Adam for sparse tables beside Adam for the rest)."""

    def __init__(self, optimizer, runtime: Runtime):
        self.optimizer = optimizer
        self.dtype = runtime.amp_dtype
        self.device_type = runtime.torch_device.type
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            for optimizer in getattr(self.optimizer, "optimizers", [self.optimizer]):
                self.scaler.step(optimizer)
            self.scaler.update()


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cpu":
        return list(batch)
    return [t.to(device, non_blocking=True) for t in batch]


def state_copy(module: nn.Module) -> OrderedDict:
    """A CPU copy of the module's state dict (a device's memory holds only the live weights)."""
    state = module.state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out
