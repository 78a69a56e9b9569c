"""What the gradient-trained ``topk`` families share (gmf, ncf_mlp, neumf, cdae, mf_implicit):
their training fields, the train-popularity fallback, uniform negative sampling and the valid
NDCG@10 that early stopping reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.budget import DEFAULT_SCORE_MEMORY_BYTES
from common.metrics import ranking_metrics
from models.data import Snapshot
from models.runtime import module_device


# --- configs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopKTraining:
    """The training fields every gradient-trained top-K family has (as ``ctr.CtrTraining`` for
    the ranking families). A family that needs another default redeclares the field, with why."""

    # Adam 1e-3: the NCF paper's and its reference code's setting for training from scratch.
    lr: float = 1e-3
    # Positives per step; with 4 negatives each a step is 1280 rows, in the paper's/CTR range
    # of ~1k rows. Larger batches need more epochs for the same number of updates.
    batch_size: int = 256
    # Early stopping decides; the cap keeps fit well under 30 s on MovieLens-100k-sized data
    # (one NCF epoch = (1 + negatives) x #train pairs rows). The NCF paper reports ~20 epochs.
    epochs: int = 30
    # Patience 3: the first few epochs only learn popularity (valid NDCG flat) before the
    # personal signal takes over; 1-2 stops in that flat stretch.
    patience: int = 3
    # Valid users sampled for model selection: full ranking costs n_items scores per user.
    eval_users: int = 1000
    seed: int = 0
    # Time budget of training in minutes (None = off); when it runs out the best validated epoch
    # so far is kept and the model's metadata says budget_hit (models.train.train_torch).
    max_minutes: float | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or unset for no budget), got {self.max_minutes}")


@dataclass(frozen=True)
class SampledTraining(TopKTraining):
    """``TopKTraining`` plus the fields of a log loss over sampled negatives (NCF, cdae)."""

    # 4 negatives per positive: the NCF paper's default (its Fig. 7 shows 3-6 is the sweet spot).
    negatives: int = 4
    # L2 on the embedding rows a batch touches. The NCF paper uses none and relies on early
    # stopping; a tiny penalty keeps rare users' embeddings from growing without bound.
    reg: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.negatives < 1 or self.eval_users < 1:
            raise ValueError("negatives, batch_size, epochs and eval_users must be >= 1")
        if self.lr <= 0 or self.reg < 0:
            raise ValueError(f"lr must be > 0 and reg >= 0, got lr={self.lr}, reg={self.reg}")


# --- data -----------------------------------------------------------------------------------
def popularity(snapshot: Snapshot) -> torch.Tensor:
    """The unknown user's scores: train interaction count per item / max count (in [0, 1]),
    index 0 (padding) = 0. Every ``topk`` family falls back to it."""
    pop = snapshot.item_popularity().astype(np.float64)
    pop[0] = 0.0
    return torch.from_numpy((pop / max(pop.max(), 1.0)).astype(np.float32))


class NegativeSampler:
    """Uniform negatives over ``[1, n_items)`` minus each user's train items, vectorised.

    Draw all candidates at once, look each (user, item) key up in the sorted train keys, redraw
    only the hits; after ``max_rounds`` the few left (users who saw most of the catalogue) are
    drawn exactly from their complement.

    Args:
        users, items: the train (user, item) pairs, row-aligned.
        n_items: catalogue size including the padding index 0.
        seed: seed of the sampler's own RNG (independent of the training loop's).
        max_rounds: vectorised redraws before the exact per-row fallback.
    """

    def __init__(
        self, users: np.ndarray, items: np.ndarray, n_items: int, seed: int = 0, max_rounds: int = 20
    ):
        self.n_items = int(n_items)
        self.keys = np.unique(users.astype(np.int64) * self.n_items + items.astype(np.int64))
        self.rng = np.random.default_rng(seed)
        self.max_rounds = max_rounds
        counts = np.bincount(users, minlength=1)
        if len(counts) and counts.max() >= self.n_items - 1:
            raise ValueError(f"user {int(counts.argmax())} interacted with every item: no negative to sample")

    def _seen(self, users: np.ndarray, cand: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + cand
        pos = np.searchsorted(self.keys, keys)
        return self.keys[np.minimum(pos, len(self.keys) - 1)] == keys

    def sample(self, users: np.ndarray, k: int) -> np.ndarray:
        """``[len(users), k]`` item indices, none of them a train item of that row's user."""
        users = np.asarray(users, np.int64)
        rep = np.repeat(users, k)
        cand = self.rng.integers(1, self.n_items, size=len(rep))
        bad = np.flatnonzero(self._seen(rep, cand)) if len(self.keys) else np.zeros(0, np.int64)
        for _ in range(self.max_rounds):
            if not len(bad):
                break
            cand[bad] = self.rng.integers(1, self.n_items, size=len(bad))
            bad = bad[self._seen(rep[bad], cand[bad])]
        for r in bad:  # rare: heavy users; exact draw from the complement
            u = rep[r]
            lo, hi = np.searchsorted(self.keys, [u * self.n_items, (u + 1) * self.n_items])
            cand[r] = self.rng.choice(
                np.setdiff1d(np.arange(1, self.n_items), self.keys[lo:hi] - u * self.n_items)
            )
        return cand.reshape(len(users), k)

    def expand(self, users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Positives plus ``k`` fresh negatives each: ``(user, item, label float32)`` rows."""
        neg = self.sample(users, k)
        u = np.concatenate([users, np.repeat(users, k)])
        i = np.concatenate([items, neg.reshape(-1)])
        y = np.concatenate([np.ones(len(users), np.float32), np.zeros(neg.size, np.float32)])
        return u, i, y


# --- validation -----------------------------------------------------------------------------
@torch.no_grad()
def score_users(module: nn.Module, users: np.ndarray, batch: int = 256) -> np.ndarray:
    """Full-catalogue scores ``[len(users), n_items]`` of a ``user_idx -> scores`` module, at most
    ``batch`` users per call, fewer when the module's ``score_row_bytes()`` (what one user's
    scoring holds at its peak: the NCF towers' [users, items, width] activations) says more would
    not fit ``DEFAULT_SCORE_MEMORY_BYTES`` (at ML-25M shape 256 users of ncf_mlp took ~10 GB)."""
    module.eval()
    row_bytes = getattr(module, "score_row_bytes", None)
    if row_bytes is not None:
        batch = max(1, min(batch, DEFAULT_SCORE_MEMORY_BYTES // max(row_bytes(), 1)))
    device = module_device(module)
    out = [
        module(torch.from_numpy(users[lo : lo + batch]).to(device)).float().cpu().numpy()
        for lo in range(0, len(users), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


Scores = Callable[[nn.Module, np.ndarray, sp.csr_matrix], np.ndarray]


class ValidNDCG:
    """Early stopping's metric: NDCG@10 on a fixed sample of valid users (full ranking, train
    items excluded). Call it with a module to get the metric.

    Args:
        snapshot: the training snapshot (its valid split holds the relevant items).
        n_users: valid users sampled once, with ``seed``, and kept for every epoch.
        seed: seed of that sample.
        score: ``score(module, users, train) -> [len(users), n_items]``; the default feeds
            ``user_idx`` only (``score_users``), item-vector scorers (cdae) pass their own.
    """

    def __init__(self, snapshot: Snapshot, n_users: int, seed: int, score: Scores | None = None):
        valid = snapshot.ratings("valid")
        keep = (valid.user_idx > 0) & (valid.item_idx > 0)
        self.relevant = sp.csr_matrix(
            (np.ones(int(keep.sum())), (valid.user_idx[keep], valid.item_idx[keep])),
            shape=(snapshot.n_users, snapshot.n_items),
        )
        candidates = np.flatnonzero(np.diff(self.relevant.indptr) > 0)
        rng = np.random.default_rng(seed)
        self.users = np.sort(rng.choice(candidates, size=min(n_users, len(candidates)), replace=False))
        self.train = snapshot.train_matrix("ones").tocsr()
        self.score = score or (lambda module, users, _train: score_users(module, users))

    def __call__(self, module: nn.Module) -> float:
        if not len(self.users):  # no valid split: every epoch ties, the cap stops training
            return 0.0
        scores = self.score(module, self.users, self.train)
        return ranking_metrics(scores, self.train, self.users, self.relevant)["ndcg@10"]
