"""Top-k neighbours of a symmetric similarity, each pair's product taken once.

``user_knn``'s shrunk cosine is symmetric, ``sim(u, v) = sim(v, u)``, so the users x users
product only needs its upper triangle: the block of users ``lo:hi`` is multiplied against the
users ``lo:`` (a suffix of the CSR rows, viewed without a copy), about half the work of the
full ``block x n_users`` product. Each block gives two kinds of candidates:

- its own users' neighbours among ``lo:`` (a column of the block product): the top k of it;
- for every later user ``v >= hi``, the block's users as candidates (a row of it): kept only
  when at least ``v``'s current k-th best similarity (a threshold that only rises, so a
  candidate dropped by it can never reach ``v``'s final top k).

Candidates gather in a buffer of ``(user, neighbour, sim)`` triples; when the buffer holds as
many as the running lists, both are merged per user by (similarity descending, neighbour
index ascending), the order ``user_knn``'s blocks give, and the thresholds rise. Peak memory:
the running lists (``n_users x k``), the buffer, and one ``(n_users - lo) x block`` product
per thread, never users x users.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

Products = Callable[[sp.csr_matrix, sp.csr_matrix, int, int], np.ndarray]
# The buffer is merged into the lists once it holds n_users x k triples, and at least this many.
MERGE_MIN = 1 << 16


def suffix_rows(m: sp.csr_matrix, lo: int) -> sp.csr_matrix:
    """Rows ``lo:`` of a CSR matrix sharing its data and indices (no copy of the nonzeros)."""
    start = m.indptr[lo]
    parts = (m.data[start:], m.indices[start:], m.indptr[lo:] - start)
    return sp.csr_matrix(parts, shape=(m.shape[0] - lo, m.shape[1]), copy=False)


class _Lists:
    """Each user's best k ``(neighbour, sim)`` so far, plus the buffer of new candidates."""

    def __init__(self, n_users: int, k: int):
        self.n, self.k = n_users, k
        self.idx = np.zeros((n_users, k), dtype=np.int64)
        self.sim = np.zeros((n_users, k), dtype=np.float32)
        self.threshold = np.zeros(n_users, dtype=np.float32)  # k-th best so far, 0 while fewer
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0

    def add(self, users: np.ndarray, nbrs: np.ndarray, sims: np.ndarray) -> None:
        self.buffer.append((users, nbrs, sims))
        self.buffered += len(users)
        if self.buffered >= max(self.n * self.k, MERGE_MIN):
            self.merge()

    def merge(self) -> None:
        if not self.buffer:
            return
        held = self.sim > 0
        users = np.concatenate([np.nonzero(held)[0], *(b[0] for b in self.buffer)])
        nbrs = np.concatenate([self.idx[held], *(b[1] for b in self.buffer)])
        sims = np.concatenate([self.sim[held], *(b[2] for b in self.buffer)])
        self.buffer, self.buffered = [], 0
        order = np.lexsort((nbrs, -sims, users))
        users, nbrs, sims = users[order], nbrs[order], sims[order]
        first = np.searchsorted(users, users, side="left")  # start of each user's run
        rank = np.arange(len(users)) - first
        keep = rank < self.k
        users, nbrs, sims, rank = users[keep], nbrs[keep], sims[keep], rank[keep]
        self.idx.fill(0)
        self.sim.fill(0.0)
        self.idx[users, rank], self.sim[users, rank] = nbrs, sims
        self.threshold = np.where(self.sim[:, -1] > 0, self.sim[:, -1], 0.0).astype(np.float32)


def symmetric_topk(
    products: Products, m: sp.csr_matrix, counts: sp.csr_matrix, k: int, block_size: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positive neighbours ``[n_users, k]`` (0-padded) of a symmetric similarity.

    ``products(rows, rows_counts, lo, hi)`` gives the similarity ``[n_rows, hi - lo]`` of the
    CSR ``rows`` (users ``lo:``) against users ``lo:hi`` (whose rows are the first ``hi - lo``);
    ``counts`` is ``m``'s co-rating indicator in the dtype the products want."""
    n = m.shape[0]
    lists = _Lists(n, k)

    def block(lo: int) -> tuple[np.ndarray, ...]:
        hi = min(lo + block_size, n)
        sim = products(suffix_rows(m, lo), suffix_rows(counts, lo), lo, hi)  # [n - lo, b]
        b = hi - lo
        sim[np.arange(b), np.arange(b)] = 0.0  # a user is not their own neighbour
        if lo == 0:
            sim[0, :] = 0.0  # user 0 is the padding / unknown user
        col = np.ascontiguousarray(sim.T)  # [b, n - lo]: the block's users' candidates
        take = min(k, col.shape[1])
        cand = np.argpartition(col, col.shape[1] - take, axis=1)[:, -take:]
        top = np.take_along_axis(col, cand, 1)
        ok = top > 0
        own = (np.nonzero(ok)[0] + lo, cand[ok] + lo, top[ok])
        later = sim[b:]  # [n - hi, b]: the block's users as candidates of users hi:
        r, c = np.nonzero((later > 0) & (later >= lists.threshold[hi:, None]))
        return (*own, r + hi, c + lo, later[r, c])

    starts = range(0, n, block_size)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for lo in starts:  # at most 2 blocks per thread in flight: results stay small
            pending.append(pool.submit(block, lo))
            if len(pending) >= 2 * max(1, threads):
                _collect(lists, pending.popleft().result())
        while pending:
            _collect(lists, pending.popleft().result())
    lists.merge()
    return lists.idx, lists.sim


def _collect(lists: _Lists, found: tuple[np.ndarray, ...]) -> None:
    own_u, own_v, own_s, later_u, later_v, later_s = found
    users, nbrs = np.concatenate([own_u, later_u]), np.concatenate([own_v, later_v])
    lists.add(users, nbrs, np.concatenate([own_s, later_s]))
