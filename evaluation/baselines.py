"""Random and popularity baselines for every task, fitted on train arrays only.

Each function takes train arrays and the eval rows and returns what a model of that task
would output for those rows (top-K score rows, rating predictions, CTR logits), so the
evaluator scores baselines with exactly the code path it uses for models.

Random baselines are seeded: the same (seed, eval rows) always give the same output.
Popularity baselines shrink per-item statistics towards the global one with a damping
``beta`` (a Bayesian average): an item seen ``n`` times gets
``(sum of its values + beta * global_mean) / (n + beta)``. Without it an item rated once
with 5 stars would outrank every well-liked item; ``beta`` acts as that many pseudo-
observations at the global mean. Items never seen in train (index 0 included) get the
global value.
"""

from __future__ import annotations

import numpy as np

# Pseudo-observations at the global mean. 10 is a common choice for rating data (a movie
# needs about ten ratings before its own mean dominates); it is a baseline, not a tuned model.
DEFAULT_DAMPING = 10.0
# Score of the padding column 0 in top-K rows, as in the exported `scores` output.
PADDING_SCORE = -1e9


def _nonempty(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        raise ValueError(f"{name} is empty: a baseline needs train rows to be fitted on.")
    return a


def _damped_item_mean(
    train_item_idx: np.ndarray, train_values: np.ndarray, n_items: int, damping: float
) -> tuple[np.ndarray, float]:
    """Per-item ``(sum_i + damping * mu) / (n_i + damping)`` and the global mean ``mu``."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0; got {damping}.")
    items = _nonempty("train_item_idx", train_item_idx).astype(np.int64)
    values = _nonempty("train values", train_values).astype(np.float64)
    if items.shape != values.shape:
        raise ValueError(f"train_item_idx has {items.size} rows but the values have {values.size}.")
    mu = float(values.mean())
    sums = np.bincount(items, weights=values, minlength=n_items)
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # damping 0 and n_i 0: filled below
        means = (sums + damping * mu) / (counts + damping)
    means[counts == 0] = mu
    return means, mu


def _lookup(table: np.ndarray, idx: np.ndarray, fill: float) -> np.ndarray:
    """``table[idx]``, with ``fill`` for indices outside the table (items unknown to train)."""
    idx = np.asarray(idx, dtype=np.int64)
    inside = (idx >= 0) & (idx < table.size)
    return np.where(inside, table[np.clip(idx, 0, table.size - 1)], fill)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)  # a rate of exactly 0 or 1 would be an infinite logit
    return np.log(p) - np.log1p(-p)


# --------------------------------------------------------------------------------------
# Top-K: rows of scores [len(users), n_items], column 0 = PADDING_SCORE
# --------------------------------------------------------------------------------------
def topk_popularity(train_item_idx: np.ndarray, n_items: int, users: np.ndarray) -> np.ndarray:
    """Every user gets the train interaction count of each item as its score.

    Returned as a read-only broadcast view (no ``len(users) * n_items`` copy).
    """
    counts = np.bincount(_nonempty("train_item_idx", train_item_idx).astype(np.int64), minlength=n_items)
    row = counts[:n_items].astype(np.float32)
    row[0] = PADDING_SCORE
    return np.broadcast_to(row, (np.size(users), n_items))


def topk_random(n_items: int, users: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) scores; one generator per (seed, user), so a user's row is the same
    whatever batch it is scored in."""
    users = np.ravel(users)
    out = np.empty((users.size, n_items), dtype=np.float32)
    for row, user in enumerate(users):
        out[row] = np.random.default_rng([seed, int(user)]).random(n_items, dtype=np.float32)
    out[:, 0] = PADDING_SCORE
    return out


# --------------------------------------------------------------------------------------
# Rating: predictions [len(eval rows)]
# --------------------------------------------------------------------------------------
def rating_global_mean(train_rating: np.ndarray, eval_item_idx: np.ndarray) -> np.ndarray:
    """The mean train rating for every eval row."""
    mu = float(_nonempty("train_rating", train_rating).astype(np.float64).mean())
    return np.full(np.size(eval_item_idx), mu, dtype=np.float32)


def rating_popularity(
    train_item_idx: np.ndarray,
    train_rating: np.ndarray,
    eval_item_idx: np.ndarray,
    n_items: int,
    damping: float = DEFAULT_DAMPING,
) -> np.ndarray:
    """Damped item mean rating (module docstring); unseen items get the global mean."""
    means, mu = _damped_item_mean(train_item_idx, train_rating, n_items, damping)
    return _lookup(means, eval_item_idx, mu).astype(np.float32)


def rating_random(train_rating: np.ndarray, eval_item_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform in ``[min, max]`` of the train ratings, one seeded draw per eval row."""
    r = _nonempty("train_rating", train_rating)
    rng = np.random.default_rng(seed)
    return rng.uniform(float(r.min()), float(r.max()), size=np.size(eval_item_idx)).astype(np.float32)


# --------------------------------------------------------------------------------------
# CTR: logits [len(eval rows)]
# --------------------------------------------------------------------------------------
def ctr_popularity(
    train_item_idx: np.ndarray,
    train_label: np.ndarray,
    eval_item_idx: np.ndarray,
    n_items: int,
    damping: float = DEFAULT_DAMPING,
) -> np.ndarray:
    """Logit of the damped item like-rate (module docstring), clipped to ``[1e-7, 1 - 1e-7]``;
    unseen items get the global train like-rate."""
    rates, p = _damped_item_mean(train_item_idx, train_label, n_items, damping)
    return _logit(_lookup(rates, eval_item_idx, p)).astype(np.float32)


def ctr_random(eval_item_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logit of a uniform probability in (0, 1), one seeded draw per eval row (AUC ≈ 0.5)."""
    p = np.random.default_rng(seed).random(np.size(eval_item_idx))
    return _logit(p).astype(np.float32)
