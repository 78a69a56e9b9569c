"""Full-catalogue top-K evaluation in memory-sized chunks, for any catalogue size.

``common.metrics.evaluate_topk`` scores 256 users against every item at once and ranks the
whole block: about ``256 x n_items x 20`` bytes, 51 GB for a 10M-item catalogue. Here:

- users are scored in chunks of ``memory / 2 / bytes_per_user`` (the scorer's live peak for
  one user, ``export.runtime.OrtScorer.bytes_per_row``, at least the ``n_items x 4`` score
  row), so a chunk's scores never exceed half the budget;
- each chunk's scores are ranked in item chunks whose masks and ranking temporaries
  (``RANK_BYTES_PER_CELL`` per user and item) fit in the other half, keeping a running top-K
  that is merged with each item chunk's own top-K.

The result is exactly ``evaluate_topk``'s on the same scores: the merge orders candidates by
(score descending, item index ascending), which is ``rank_topk``'s order, so the top-K lists
are the same whatever the chunking; and the per-user metrics are summed in the same groups of
``metric_batch`` users in the same order, so the float sums are the same too. Only a catalogue
whose single score row exceeds the budget goes over it (by that one row): a scorer returns
whole rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from common.budget import rows_per_call
from common.metrics import DEFAULT_KS, rank_topk, topk_hit_metrics

# Bytes per (user, item) cell while an item chunk is ranked: the masked float32 scores, the
# excluded/relevant masks, and rank_topk's partition copy, comparison masks and cumsum.
RANK_BYTES_PER_CELL = 24


def _mask(rows: sp.csr_matrix, lo: int, hi: int) -> np.ndarray:
    """Dense bool ``[n_rows, hi - lo]`` of the stored entries (any value) of columns [lo, hi)."""
    part = rows[:, lo:hi].tocsr()
    out = np.zeros((rows.shape[0], hi - lo), dtype=bool)
    out[np.repeat(np.arange(rows.shape[0]), np.diff(part.indptr)), part.indices] = True
    return out


def _top_of_block(block: np.ndarray, excl: sp.csr_matrix, rel: sp.csr_matrix, k_max: int, width: int):
    """Top ``k_max`` items of each row of ``block`` (excluded items last), walking item chunks
    of ``width``; returns (top, valid, hits) ``[rows, k_max]`` and the relevant counts ``[rows]``."""
    n, n_items = block.shape
    best_s = np.zeros((n, 0), dtype=block.dtype)
    best_i = np.zeros((n, 0), dtype=np.int64)
    best_x = np.zeros((n, 0), dtype=bool)
    best_r = np.zeros((n, 0), dtype=bool)
    n_rel = np.zeros(n, dtype=np.int64)
    for lo in range(0, n_items, width):
        hi = min(lo + width, n_items)
        excluded = _mask(excl, lo, hi)
        if lo == 0:
            excluded[:, 0] = True  # the padding column is never ranked
        relevant = _mask(rel, lo, hi) & ~excluded
        n_rel += relevant.sum(axis=1)
        s = np.where(excluded, -np.inf, block[:, lo:hi])
        top = rank_topk(s, min(k_max, hi - lo))
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + lo], axis=1)
        cand_x = np.concatenate([best_x, np.take_along_axis(excluded, top, 1)], axis=1)
        cand_r = np.concatenate([best_r, np.take_along_axis(relevant, top, 1)], axis=1)
        # rank_topk's order: score descending, ties to the lower item index
        keep = np.lexsort((cand_i, -cand_s), axis=1)[:, :k_max]
        best_s, best_i, best_x, best_r = (np.take_along_axis(a, keep, 1) for a in (cand_s, cand_i, cand_x, cand_r))  # noqa: E501
    top, valid, hits = best_i, ~best_x, best_r
    if top.shape[1] < k_max:  # fewer items than k_max: padded as invalid slots, as evaluate_topk
        pad = ((0, 0), (0, k_max - top.shape[1]))
        top, valid, hits = np.pad(top, pad), np.pad(valid, pad), np.pad(hits, pad)
    return top, valid, hits, n_rel


def evaluate_topk_chunked(
    score: Callable[[np.ndarray], np.ndarray],
    exclude: sp.spmatrix | sp.sparray,
    relevant: sp.spmatrix | sp.sparray,
    users: np.ndarray,
    *,
    bytes_per_user: int,
    memory_bytes: int,
    ks: Sequence[int] = DEFAULT_KS,
    metric_batch: int = 256,
    max_users_per_call: int | None = None,
) -> dict[str, float]:
    """``common.metrics.evaluate_topk(score, exclude, relevant, users, ks=ks,
    batch_size=metric_batch)``, bit for bit, within ``memory_bytes`` (module docstring).

    Args:
        score: ``f(user_idx int64 [b]) -> [b, n_items]`` scores, called once per user chunk.
        bytes_per_user: memory one user's scoring call takes (>= ``n_items x 4``).
        memory_bytes: the budget the score block and the ranking share.
        metric_batch: users per group of the metric sums (``evaluate_topk``'s ``batch_size``).
        max_users_per_call: an upper bound on the user chunk (e.g. the scorer's batch size).
    """
    exclude, relevant = sp.csr_matrix(exclude), sp.csr_matrix(relevant)
    if exclude.shape != relevant.shape:
        raise ValueError(f"exclude is {exclude.shape} but relevant is {relevant.shape}; both users x items.")
    n_items = relevant.shape[1]
    users = np.asarray(users, dtype=np.int64).ravel()
    if users.size == 0:
        raise ValueError("no users to evaluate: `users` is empty.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs; got {ks}.")
    catalogue = np.setdiff1d(np.unique(exclude.indices).astype(np.int64), [0])
    if catalogue.size == 0:
        raise ValueError("the coverage catalogue is empty: no item has a train interaction in `exclude`.")
    k_max = max(ks)
    chunk = rows_per_call(max(bytes_per_user, 4 * n_items), memory_bytes // 2)
    chunk = min(chunk, max_users_per_call or chunk, users.size)

    sums: dict[str, float] = {}
    recommended = {k: np.zeros(n_items, dtype=bool) for k in ks}
    n_users = 0
    pending: list[tuple[np.ndarray, ...]] = []

    def flush(top, valid, hits, n_rel) -> None:  # one metric group, exactly as evaluate_topk
        nonlocal n_users
        keep = n_rel > 0
        if not keep.any():
            return
        top, valid, hits, n_rel = top[keep], valid[keep], hits[keep], n_rel[keep]
        n_users += int(keep.sum())
        for k in ks:
            for name, per_user in topk_hit_metrics(hits, n_rel, k).items():
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + float(per_user.sum())
        for k in ks:
            recommended[k][top[:, :k][valid[:, :k]]] = True

    for start in range(0, users.size, chunk):
        rows = users[start : start + chunk]
        block = np.asarray(score(rows))
        if block.shape != (rows.size, n_items):
            want = (rows.size, n_items)
            raise ValueError(f"scorer returned {block.shape} for {rows.size} users, not {want}.")
        if np.isnan(block).any():
            raise ValueError(f"scores for users {rows[np.isnan(block).any(axis=1)][:5]} contain NaN.")
        width = max(k_max, memory_bytes // 2 // (RANK_BYTES_PER_CELL * rows.size))
        pending.append(_top_of_block(block, exclude[rows], relevant[rows], k_max, width))
        del block
        while sum(p[0].shape[0] for p in pending) >= metric_batch or (
            start + chunk >= users.size and pending
        ):
            merged = [np.concatenate(parts) for parts in zip(*pending)]
            head = [a[:metric_batch] for a in merged]
            rest = [a[metric_batch:] for a in merged]
            flush(*head)
            pending = [tuple(rest)] if rest[0].shape[0] else []

    if n_users == 0:
        raise ValueError(
            f"none of the {users.size} users has a relevant item outside their train items; "
            "check that `relevant` holds the test split and `exclude` the train split."
        )
    out: dict[str, float] = {key: total / n_users for key, total in sorted(sums.items())}
    for k in ks:
        out[f"coverage@{k}"] = float(recommended[k][catalogue].sum() / catalogue.size)
    out["n_users"] = n_users
    out["n_users_skipped"] = int(users.size - n_users)
    out["catalogue_size"] = int(catalogue.size)
    return out
