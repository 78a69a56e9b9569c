"""The (user, item) cells a block of users needs, taste and seen, in memory that grows with the
block's users and events rather than with its users x items (*Scale* in :mod:`ingest.synthetic`)."""

from __future__ import annotations

import numpy as np

from ingest.synthetic_config import UNIFORM_PROPOSAL_SHARE
from ingest.synthetic_planted import Planted

# A column is dense in a block when the block's average user is expected to draw it as a
# candidate at least this often: a dense cell costs its share of one matrix product (~10 ns)
# whether it is read or not, a sparse one a gathered 16-factor dot product (~60 ns) each time.
DENSE_DRAWS = 0.2
# At most this many dense columns (the most popular items) and users per block: the tables cost
# 5 bytes a cell, ~340 MB at 16,384 x 4,096.
HEAD_ITEMS = 4096
MAX_BLOCK_USERS = 16_384
# A block this small in users x items is all dense (~84 MB of tables): cheap, and the fastest.
ALL_DENSE_CELLS = 2**24

_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: multiplicative hashing
_EMPTY = -1
_NONE = np.empty(0, dtype=np.int64)


class _HashSet:
    """Open-addressing set of non-negative int64 keys: linear probing, load at most 1/2."""

    def __init__(self, max_keys: int) -> None:
        bits = max(4, (2 * max(max_keys, 1) - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        self._table = np.full(1 << bits, _EMPTY, dtype=np.int64)

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * _FIBONACCI) >> self._shift).astype(np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(keys.size, dtype=bool)
        pending = np.arange(keys.size)
        slot = self._slot(keys)
        while pending.size:
            held = self._table[slot]
            hit = held == keys[pending]
            found[pending[hit]] = True
            go_on = ~hit & (held != _EMPTY)
            pending, slot = pending[go_on], (slot[go_on] + 1) & self._mask
        return found

    def add(self, keys: np.ndarray) -> None:
        """Insert distinct keys that are not in the set yet."""
        slot = self._slot(keys)
        while keys.size:
            free = self._table[slot] == _EMPTY
            self._table[slot[free]] = keys[free]  # keys aiming at one free slot: the last wins
            placed = self._table[slot] == keys
            keys, slot = keys[~placed], (slot[~placed] + 1) & self._mask


class BlockCells:
    """``taste(u, i)`` and "``u`` has seen ``i``" for the users of one block (rows), at any cells.

    Head items (the most popular, as many as :data:`DENSE_DRAWS` makes worth it) are dense: a
    float32 taste table and a bool seen table, ``rows x head`` cells, columns in popularity
    order so the cells read most share a few cache lines per row. The other (tail) cells are
    computed where they are needed (taste) and kept in a hash set (seen). A catalogue that is all
    head (the default one) reads every cell from the tables, as every block once did. Taste is
    bit for bit what ``Planted.taste`` gives for the whole row.
    """

    def __init__(self, planted: Planted, users: np.ndarray, n_events: int, n_candidates: int) -> None:
        popularity = planted.item_popularity
        n_items = len(popularity)
        proposal = (1 - UNIFORM_PROPOSAL_SHARE) * popularity + UNIFORM_PROPOSAL_SHARE / n_items
        draws = proposal * n_candidates * n_events / max(len(users), 1)
        n_head = max(1, min(HEAD_ITEMS, int((draws >= DENSE_DRAWS).sum())))
        if len(users) * n_items <= ALL_DENSE_CELLS:
            n_head = n_items
        self._planted = planted
        self._users = users
        self._n_items = n_items
        self._all_head = n_head == n_items
        if self._all_head:
            head = np.arange(n_items)
        else:
            head = np.argsort(-popularity, kind="stable")[:n_head]
        self._width = n_head
        self._column = np.full(n_items, -1, dtype=np.int64)  # tail: -1, a cell that is never used
        self._column[head] = np.arange(n_head)
        self._taste = planted.taste(users, head).reshape(-1)
        self._seen = np.zeros(len(users) * self._width, dtype=bool)
        self._tail_seen = _HashSet(0 if self._all_head else n_events)

    def _cells(self, rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For block rows ``rows`` (1-D) and ``items`` (``(len(rows),)`` or ``(len(rows), k)``):
        the flat head-table cells (a tail item's cell is a valid index whose value is replaced),
        the flat positions of tail items and their rows."""
        column = self._column[items]
        cells = (rows[:, None] if items.ndim == 2 else rows) * self._width + column
        if self._all_head:
            return cells, _NONE, _NONE
        tail = np.flatnonzero(column < 0)
        return cells, tail, rows[tail // (items.shape[1] if items.ndim == 2 else 1)]

    def taste(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Taste of block rows ``rows`` at ``items`` (one row per entry of ``rows``), float32."""
        cells, tail, tail_rows = self._cells(rows, items)
        out = self._taste[cells]
        if tail.size:
            out.reshape(-1)[tail] = self._planted.taste_at(self._users[tail_rows], items.reshape(-1)[tail])
        return out

    def seen(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether block rows ``rows`` have seen ``items`` (one row per entry of ``rows``)."""
        cells, tail, tail_rows = self._cells(rows, items)
        out = self._seen[cells]
        if tail.size:
            keys = tail_rows * self._n_items + items.reshape(-1)[tail]
            out.reshape(-1)[tail] = self._tail_seen.contains(keys)
        return out

    def add(self, rows: np.ndarray, items: np.ndarray) -> None:
        """Mark one unseen item per row as seen (1-D, distinct rows)."""
        cells, tail, tail_rows = self._cells(rows, items)
        if tail.size:
            self._tail_seen.add(tail_rows * self._n_items + items[tail])
            cells = np.delete(cells, tail)
        self._seen[cells] = True

    def taste_rows(self, rows: np.ndarray) -> np.ndarray:
        """Whole catalogue rows of block rows ``rows``, (len, n_items) float32."""
        return self._planted.taste(self._users[rows])
