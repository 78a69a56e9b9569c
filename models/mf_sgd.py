"""Matrix factorisation on explicit ratings by mini-batch SGD (Funk / Koren 2009), task ``rating``.

``r_ui = mu + b_u + b_i + p_u . q_i``, trained on MSE + L2 on the rows a batch touches
(the classical per-rating regularisation, not weight decay over whole tables), early
stopping on valid RMSE. Row 0 of every table is the unknown id: it starts at zero and
gets no gradient (``padding_idx``), so an unknown user is scored ``mu + b_i``, an unknown
item ``mu + b_u``, both unknown ``mu``. Scores are clipped to the rating range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.metrics import rmse
from models.base import ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.runtime import current_runtime, module_device
from models.train import deterministic, train_torch


@dataclass(frozen=True)
class Config:
    # 64 factors: on MovieLens-100k/1M RMSE flattens out between 50 and 100 factors once
    # regularised; 64 keeps fit well under a minute on CPU.
    dim: int = 64
    # Per-rating L2 of 0.05: Funk/Surprise use 0.02 for plain SGD; mini-batch averaging
    # plus momentum fits faster, so slightly stronger regularisation is needed.
    reg: float = 0.05
    # The loss is a batch *mean*, so a row seen once in a batch gets lr/batch of its
    # gradient; lr 0.3 with momentum 0.9 ~ 0.3 * 10 / 256 ~ 0.012 per rating, the same order
    # as Funk/Surprise's per-rating 0.005-0.01. Much higher diverges early; lower crawls.
    lr: float = 0.3
    momentum: float = 0.9
    batch_size: int = 256
    # Early stopping decides; 40 is a cap that keeps fit < 60 s on MovieLens-1M-sized data.
    epochs: int = 40
    patience: int = 3
    # Factor init std 0.1 (Surprise's default): big enough to break symmetry, small enough
    # that mu + biases dominate the first epochs.
    init_std: float = 0.1
    seed: int = 0
    # Time budget of training in minutes (None = off); when it runs out the best validated epoch
    # so far is kept and the model's metadata says budget_hit (models.train.train_torch).
    max_minutes: float | None = None

    def __post_init__(self):
        if self.dim < 1 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("dim, batch_size and epochs must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or unset for no budget), got {self.max_minutes}")


class MatrixFactorization(nn.Module):
    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        rating_min: float,
        rating_max: float,
        init_std: float = 0.1,
    ):
        super().__init__()
        self.user = nn.Embedding(n_users, dim, padding_idx=0)
        self.item = nn.Embedding(n_items, dim, padding_idx=0)
        self.user_bias = nn.Embedding(n_users, 1, padding_idx=0)
        self.item_bias = nn.Embedding(n_items, 1, padding_idx=0)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=init_std)
        for emb in (self.user_bias, self.item_bias):
            nn.init.zeros_(emb.weight)
        with torch.no_grad():
            for emb in (self.user, self.item, self.user_bias, self.item_bias):
                emb.weight[0].zero_()
        self.register_buffer("global_mean", torch.zeros(()))
        self.rating_min, self.rating_max = float(rating_min), float(rating_max)
        self.n_users, self.n_items = n_users, n_items

    def _safe(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        return torch.where((idx >= 0) & (idx < n), idx, torch.zeros_like(idx))

    def raw(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        u, i = self._safe(user_idx, self.n_users), self._safe(item_idx, self.n_items)
        dot = (self.user(u) * self.item(i)).sum(-1)
        return self.global_mean + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + dot

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self.raw(user_idx, item_idx).clamp(self.rating_min, self.rating_max)


class MFSGD(TrainedModel):
    family = "mf_sgd"
    task = Task.RATING
    config_cls = Config

    @staticmethod
    def loss(module: MatrixFactorization, batch, config: Config) -> torch.Tensor:
        """MSE + reg * (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2), averaged over the batch's ratings."""
        u, i, r = batch
        reg = config.reg
        pred = module.raw(u, i)
        penalty = (
            module.user(u).pow(2).sum(-1)
            + module.item(i).pow(2).sum(-1)
            + module.user_bias(u).squeeze(-1).pow(2)
            + module.item_bias(i).squeeze(-1).pow(2)
        )
        return ((pred - r) ** 2 + reg * penalty).mean()

    @staticmethod
    def training_batch(snapshot: Snapshot, config: Config, rows: int = 256) -> tuple[torch.Tensor, ...]:
        """The first ``rows`` train rows as ``loss``'s batch."""
        r = snapshot.ratings("train")
        return tuple(torch.from_numpy(a[:rows]) for a in (r.user_idx, r.item_idx, r.rating))

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return MatrixFactorization(meta["n_users"], meta["n_items"], config.dim, *meta["rating_range"])

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """User factors p ``[n_users, dim]`` and item factors q ``[n_items, dim]`` (row 0 = unknown,
        zero); the biases are left out: they shift a rating, not the direction of taste."""
        m = self.module
        return m.user.weight.detach().numpy().copy(), m.item.weight.detach().numpy().copy()

    def export_spec(self) -> ExportSpec:
        g = torch.Generator().manual_seed(0)
        users = torch.randint(1, self.meta["n_users"], (4,), generator=g)
        items = torch.randint(1, self.meta["n_items"], (4,), generator=g)
        users[0], items[1] = 0, 0  # unknown user, unknown item
        return ExportSpec(
            inputs=(TensorSpec("user_idx", "int64", ("batch",)), TensorSpec("item_idx", "int64", ("batch",))),
            outputs=(TensorSpec("rating", "float32", ("batch",)),),
            example_inputs=(users, items),
            notes="unknown user/item (0) -> global mean + the known side's bias; "
            "clipped to meta.rating_range",
        )


RATING_COLUMNS = ("user_idx", "item_idx", "rating")


def _rating_arrays(t) -> tuple[np.ndarray, ...]:
    return tuple(
        t.column(c).to_numpy().astype(d) for c, d in zip(RATING_COLUMNS, (np.int64, np.int64, np.float32))
    )


def _train_rows(snapshot: Snapshot, config: Config):
    """The train ratings as ``(user, item, rating)`` rows, streamed from fct_ratings (or in memory,
    as the runtime says), with their mean, min and max. The mean is ``float32(float32(sum) / n)``
    with the sum in float64: numpy's float32 mean of the in-memory column exactly where the sum
    is exact in float32 (integer or half-star ratings, sum < 2^24), closer to the true mean beyond."""
    rt = current_runtime()
    if not rt.stream:
        r = snapshot.ratings("train")
        rows = (r.user_idx, r.item_idx, r.rating.astype(np.float32))
        return rows, len(r), (r.rating.mean(), r.rating.min(), r.rating.max()) if len(r) else None
    kw = dict(buffer_rows=rt.buffer_rows, rank=rt.rank, world_size=rt.world_size)
    rows = snapshot.stream("fct_ratings", "train", RATING_COLUMNS, _rating_arrays, seed=config.seed, **kw)
    total, n, lo, hi = 0.0, 0, np.inf, -np.inf
    for *_, rating in rows.ordered(1 << 16):
        total, n = total + float(rating.astype(np.float64).sum()), n + len(rating)
        lo, hi = min(lo, float(rating.min())), max(hi, float(rating.max()))
    return rows, n, (np.float32(float(np.float32(total)) / max(n, 1)), lo, hi) if n else None


def _eval_rows(snapshot: Snapshot) -> tuple[np.ndarray, ...]:
    """``(user, item, rating)`` of the valid split (train when there is none: then the train RMSE
    picks the epoch and only the cap stops it). Streamed, only those rows are ever held."""
    for split in ("valid", "train"):
        if not current_runtime().stream:
            r = snapshot.ratings(split)
            parts = [(r.user_idx, r.item_idx, r.rating)] if len(r) else []
        else:
            parts = list(
                snapshot.stream("fct_ratings", split, RATING_COLUMNS, _rating_arrays).ordered(1 << 16)
            )
        if parts:
            return tuple(np.concatenate(cols) for cols in zip(*parts))
    raise AssertionError("unreachable: fit checked the train split")


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> MFSGD:
    rows, n_train, stats = _train_rows(snapshot, config)
    if n_train == 0:
        raise ValueError(f"{snapshot.path}: empty train split; mf_sgd needs train ratings")
    mean, r_min, r_max = stats
    lo, hi = (float(x) for x in snapshot.meta.get("rating_range", (r_min, r_max)))
    meta = {"n_users": snapshot.n_users, "n_items": snapshot.n_items, "rating_range": [lo, hi]}
    with deterministic(config.seed):
        module = MatrixFactorization(snapshot.n_users, snapshot.n_items, config.dim, lo, hi, config.init_std)
        module.global_mean.fill_(float(mean))
        ev_u, ev_i, ev_r = _eval_rows(snapshot)
        ev_u, ev_i = torch.from_numpy(ev_u), torch.from_numpy(ev_i)

        def valid_rmse(m: nn.Module, batch: int = 1 << 16) -> float:
            device = module_device(m)
            pred = [m(ev_u[lo : lo + batch].to(device), ev_i[lo : lo + batch].to(device)).cpu().numpy()
                    for lo in range(0, len(ev_u), batch)]  # fmt: skip
            return rmse(ev_r, np.concatenate(pred))

        history = train_torch(
            module,
            lambda m, b: MFSGD.loss(m, b, config),
            rows,
            valid_rmse,
            family="mf_sgd",
            metric_name="rmse",
            higher_is_better=False,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer="sgd",
            lr=config.lr,
            momentum=config.momentum,
            patience=config.patience,
            seed=config.seed,
            log=log,
            max_minutes=config.max_minutes,
        )
    return MFSGD(config, module, meta, history)
