"""Memory budgets for scoring: how many rows (and items) one scoring call may take.

Scoring memory grows with the call's shape, not with the data: item-kNN's scorer holds
``rows x k x history`` cells, a top-K scorer ``users x items``. Callers size each call from a
budget in bytes instead of a fixed row count, so one user with a 50,000-item history or a
catalogue of millions of items cannot take the machine down. The pipeline reads the budget from
``RECSYS_SCORE_MEMORY_MB`` (pipeline/settings.py) and passes it down; libraries take it as a
parameter with ``DEFAULT_SCORE_MEMORY_BYTES``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# 256 MiB per scoring call: small next to the few GB a training step of the neural families
# takes, and large enough that the default data (943 x 1,682, histories up to ~420 ratings)
# scores in the same calls as without a budget.
DEFAULT_SCORE_MEMORY_MB = 256
DEFAULT_SCORE_MEMORY_BYTES = DEFAULT_SCORE_MEMORY_MB * 2**20


def budget_bytes(memory_mb: float) -> int:
    """``memory_mb`` (MiB, > 0) as bytes; a clear error for anything else."""
    if not memory_mb > 0:
        raise ValueError(
            f"score memory budget must be > 0 MiB, got {memory_mb!r}: set RECSYS_SCORE_MEMORY_MB to a "
            "positive number of MiB (default 256)"
        )
    return int(memory_mb * 2**20)


def row_chunks(
    widths: np.ndarray, bytes_per_slot: int, memory_bytes: int, max_rows: int
) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` row ranges of rows sorted by ``widths`` (ascending), each at most ``max_rows``
    rows and ``rows x max(width) x bytes_per_slot <= memory_bytes``.

    A range is padded to its widest row (the last one, since rows are sorted), which is why the
    rows must come sorted. A single row wider than the budget still gets a range of its own:
    one row is the smallest call a scorer can take, so that row alone may exceed the budget.
    """
    widths = np.asarray(widths)
    if widths.size > 1 and np.any(np.diff(widths) < 0):
        raise ValueError("row_chunks: widths must be sorted ascending (order rows by history length first)")
    if bytes_per_slot < 1 or max_rows < 1:
        raise ValueError(f"row_chunks: bytes_per_slot={bytes_per_slot} and max_rows={max_rows} must be >= 1")
    n, lo = widths.size, 0
    while lo < n:
        hi = min(lo + max_rows, n)
        # Shrink until the range fits; each step re-reads the (smaller) widest row of the range.
        while hi - lo > 1:
            fit = memory_bytes // (max(int(widths[hi - 1]), 1) * bytes_per_slot)
            if hi - lo <= fit:
                break
            hi = lo + max(int(fit), 1)
        yield lo, hi
        lo = hi


def rows_per_call(bytes_per_row: int, memory_bytes: int) -> int:
    """Rows of ``bytes_per_row`` each that fit in ``memory_bytes`` (at least 1)."""
    return max(int(memory_bytes // max(int(bytes_per_row), 1)), 1)
