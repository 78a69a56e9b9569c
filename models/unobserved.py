"""Uniform draws from each user's unobserved items, for mf_implicit's "sampled" estimator
(``models.mf_implicit``): exact and vectorised (no rejection), drawn a chunk of an epoch's cells
at a time."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def sample_unobserved(
    observed: sp.csr_matrix, users: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` items per entry of ``users``, uniform over that user's unobserved items in 1..n_items-1.

    Exact and vectorised, no rejection: with the user's observed items sorted
    ``s_0 < s_1 < ...`` (all >= 1), ``g_t = s_t - 1 - t`` counts the unobserved items below
    ``s_t``, so the r-th unobserved item (0-based) is ``r + 1 + #{t: g_t <= r}``, found by one
    global ``searchsorted`` over the per-user-offset ``g``. Returns ``(items [len, n] int64,
    m [len] int64)`` with ``m`` the size of each user's unobserved set; users with none
    get item 0 (padding) and ``m = 0``, so their draws carry weight 0.
    """
    return UnobservedSampler(observed).draw(users, n, rng)


class UnobservedSampler:
    """``sample_unobserved`` with its per-matrix index built once, for many draws."""

    def __init__(self, observed: sp.csr_matrix):
        observed = observed.tocsr()
        observed.sort_indices()
        self.n_items = observed.shape[1]
        self.indptr = observed.indptr.astype(np.int64)
        cols = observed.indices.astype(np.int64)
        self.counts = np.diff(self.indptr)
        row_of = np.repeat(np.arange(observed.shape[0], dtype=np.int64), self.counts)
        rank = np.arange(len(cols), dtype=np.int64) - self.indptr[row_of]
        self.stride = np.int64(self.n_items + 1)
        self.keys = row_of * self.stride + (cols - 1 - rank)  # nondecreasing: per-user g is, users are offset

    def draw(self, users: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        users = np.asarray(users, dtype=np.int64)
        m = (self.n_items - 1) - self.counts[users]
        r = np.floor(rng.random((len(users), n)) * np.maximum(m, 1)[:, None]).astype(np.int64)
        below = np.searchsorted(self.keys, (users * self.stride)[:, None] + r, side="right")
        items = np.where(m[:, None] > 0, r + 1 + below - self.indptr[users][:, None], 0)
        return items, m


class EpochNegatives:
    """An epoch's negatives for the cells whose users are ``users`` (in the epoch's order), drawn
    ``chunk`` cells at a time as the loop reaches them. ``rng.random`` fills its draws in order,
    so the chunks are the very numbers one draw for the whole epoch gives (bit for bit), with
    memory for one chunk instead of every cell (at ML-25M shape the whole-epoch draw took minutes
    and several GB before the first step). Slices must move forward and stay inside a chunk
    (``chunk`` is a multiple of the batch size), and the loop must reach the end of the epoch
    (or call ``finish``) before ``rng`` is used again."""

    def __init__(self, sampler: UnobservedSampler, users: np.ndarray, n: int, rng, chunk: int):
        self.sampler, self.users, self.n, self.rng, self.chunk = sampler, users, n, rng, chunk
        self.start, self.items = 0, np.zeros((0, n), dtype=np.int64)

    def _next(self) -> None:
        self.start += len(self.items)
        self.items, _ = self.sampler.draw(self.users[self.start : self.start + self.chunk], self.n, self.rng)

    def finish(self) -> None:
        """Draw what the loop skipped (a last batch with fewer cells than ranks), so the next
        epoch's draws start where a whole-epoch draw would have left ``rng``."""
        while self.start + len(self.items) < len(self.users):
            self._next()

    def __getitem__(self, cells: slice) -> np.ndarray:
        while cells.start >= self.start + len(self.items):
            self._next()
        lo, hi = cells.start - self.start, cells.stop - self.start
        if lo < 0 or hi > len(self.items):
            raise IndexError(f"negatives {cells} are not inside the drawn chunk starting at {self.start}")
        return self.items[lo:hi]
