"""The hidden structure of a config (:class:`Planted`): every per-item and per-user constant,
drawn from seeded numpy generators (steps 1-3 and the successor table of step 5 of *Planted
structure* in :mod:`ingest.synthetic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ingest.synthetic_config import (
    _AGE_P,
    _GENDER_P,
    _GENRE_COUNT_P,
    _GENRE_WEIGHTS,
    _OCCUPATION_W,
    _QUANT,
    AFFINITY_SCALE,
    AGE_CODES,
    AGE_SHIFT_SD,
    GENDER_SHIFT_SD,
    GENDERS,
    GENRES,
    ITEM_BIAS_SD,
    ITEM_POPULARITY_BIAS,
    MAX_SPAN_DAYS,
    MIN_SPAN_DAYS,
    OCCUPATIONS,
    SPAN_MEDIAN_DAYS,
    USER_BIAS_SD,
    SyntheticConfig,
)

# Rejection rounds of a distinct weighted draw before the exact per-row fallback.
_REJECTION_ROUNDS = 8


@dataclass(frozen=True, eq=False)
class Planted:
    """The hidden structure of a config; arrays are indexed by ``id - 1``."""

    item_genres: np.ndarray  # (n_items, 3) int64 genre indices into GENRES, primary first, -1 pad
    item_genre_weights: np.ndarray  # (n_items, 18) float64, rows sum to 1
    item_year: np.ndarray  # (n_items,) int32
    item_popularity: np.ndarray  # (n_items,) float64, sums to 1
    item_bias: np.ndarray  # (n_items,) float64
    item_factors: np.ndarray  # (n_items, d) float32, integer-valued (quantised, x _QUANT)
    successors: np.ndarray  # (n_items, successors_per_item) int64 item indices (id - 1)
    user_gender: np.ndarray  # (n_users,) int64 index into GENDERS
    user_age: np.ndarray  # (n_users,) int64 index into AGE_CODES
    user_occupation: np.ndarray  # (n_users,) int64 index into OCCUPATIONS
    user_zip: np.ndarray  # (n_users,) int64 in [10000, 99999]
    user_factors: np.ndarray  # (n_users, d) float32, integer-valued (quantised, x _QUANT)
    user_bias: np.ndarray  # (n_users,) float64
    user_events: np.ndarray  # (n_users,) int64, sums to n_events
    user_span_s: np.ndarray  # (n_users,) int64 target active span in seconds
    user_start_u: np.ndarray  # (n_users,) float64 in [0, 1): where the window sits in the year
    gender_genre: np.ndarray  # (2, 18) float64 taste shift G
    age_genre: np.ndarray  # (7, 18) float64 taste shift A
    group_shift: np.ndarray  # (2 * 7, n_items) float32: shift of (gender, age) group per item

    def taste(self, users: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """``taste(u, i)`` for the user indices ``users`` over all items (or over the item
        indices ``items``), float32 (len(users), n_items or len(items)).

        The factor product is exact (integer-valued float32 below 2**24), so a cell is the same
        bits whichever block, item subset or summation order computes it.
        """
        factors = self.item_factors if items is None else self.item_factors[items]
        taste = self.user_factors[users] @ np.ascontiguousarray(factors.T)
        taste *= self._scale()
        shift = self.group_shift if items is None else self.group_shift[:, items]
        taste += shift[self._group(users)]
        return taste

    def taste_at(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``taste(users[k], items[k])`` cell by cell (two 1-D index arrays), float32, the same
        bits as the matching cells of :meth:`taste`; the cost follows the cells, not the rows."""
        dot = np.einsum("nd,nd->n", _rows(self.item_factors, items), _rows(self.user_factors, users))
        dot *= self._scale()
        dot += self.group_shift[self._group(users), items]
        return dot

    def _scale(self) -> np.float32:
        latent_dim = self.item_factors.shape[1]
        return np.float32(AFFINITY_SCALE / (_QUANT * _QUANT * math.sqrt(latent_dim)))

    def _group(self, users: np.ndarray) -> np.ndarray:
        return self._user_group[users]

    @cached_property
    def _user_group(self) -> np.ndarray:
        return self.user_gender * len(AGE_CODES) + self.user_age


def _rows(matrix: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``matrix[index]`` for a C-contiguous 2-D array, gathering each row as one opaque element
    (several times faster than numpy's row-wise fancy indexing for short rows)."""
    row = np.dtype((np.void, matrix.shape[1] * matrix.itemsize))
    return matrix.view(row).reshape(-1)[index].view(matrix.dtype).reshape(len(index), -1)


def successors(config: SyntheticConfig) -> np.ndarray:
    """The successor table by id: row ``i - 1`` holds the successor item ids of item ``i``."""
    return plant(config).successors + 1


def plant(config: SyntheticConfig) -> Planted:
    """Draw every per-user and per-item constant of ``config`` (cheap: no events)."""
    c = config

    def rng(purpose: int) -> np.random.Generator:
        return np.random.default_rng([c.seed, purpose])

    n_genres = len(GENRES)

    # Items: genres, year, popularity, bias, factors, successors.
    r = rng(1)
    primary = r.choice(n_genres, size=c.n_items, p=_GENRE_WEIGHTS / _GENRE_WEIGHTS.sum())
    n_item_genres = 1 + r.choice(3, size=c.n_items, p=_GENRE_COUNT_P)
    extra = _distinct_draws(r, np.arange(n_genres), _GENRE_WEIGHTS, 2, exclude=primary)
    item_genres = np.column_stack([primary, extra])
    item_genres[np.arange(3)[None, :] >= n_item_genres[:, None]] = -1
    genre_w = np.zeros((c.n_items, n_genres))
    rows = np.arange(c.n_items)
    for slot, weight in enumerate((2.0, 1.0, 1.0)):
        has = item_genres[:, slot] >= 0
        genre_w[rows[has], item_genres[has, slot]] = weight
    genre_w /= genre_w.sum(axis=1, keepdims=True)
    # Mostly 1990s films with a tail back to 1920, like MovieLens-100K.
    year = np.clip(1998 - np.floor(r.exponential(7.0, c.n_items)), 1920, 1998).astype(np.int32)
    rank = r.permutation(c.n_items)
    popularity = (rank + 1.0) ** -c.item_popularity_exponent
    popularity /= popularity.sum()
    item_bias = ITEM_BIAS_SD * r.standard_normal(c.n_items) + ITEM_POPULARITY_BIAS * (
        1.0 - 2.0 * rank / max(c.n_items - 1, 1)
    )
    genre_factors = r.standard_normal((n_genres, c.latent_dim))
    mix = genre_w @ genre_factors / np.linalg.norm(genre_w, axis=1, keepdims=True)
    item_factors = math.sqrt(0.6) * mix + math.sqrt(0.4) * r.standard_normal(mix.shape)
    # Centred over items so no user likes the whole catalogue more than another (that is what
    # b_u is for) and the seed does not move the global mean rating.
    item_factors -= item_factors.mean(axis=0)
    succ = _successor_table(r, primary, popularity, c.successors_per_item)

    # Users: demographics, factors, bias, activity, time window.
    r = rng(2)
    gender = r.choice(len(GENDERS), size=c.n_users, p=_GENDER_P)
    age = r.choice(len(AGE_CODES), size=c.n_users, p=_AGE_P)
    occupation = r.choice(len(OCCUPATIONS), size=c.n_users, p=_OCCUPATION_W / _OCCUPATION_W.sum())
    zip_code = r.integers(10_000, 100_000, size=c.n_users)
    demo = (
        r.standard_normal((len(GENDERS), c.latent_dim))[gender]
        + r.standard_normal((len(AGE_CODES), c.latent_dim))[age]
        + r.standard_normal((len(OCCUPATIONS), c.latent_dim))[occupation]
    ) / math.sqrt(3.0)
    user_factors = math.sqrt(0.5) * demo + math.sqrt(0.5) * r.standard_normal(demo.shape)
    user_bias = USER_BIAS_SD * r.standard_normal(c.n_users)
    # Lomax (Pareto shifted to start at 0) so the lightest users sit at the minimum; the small
    # floor keeps every weight positive for the water-filling.
    activity = r.pareto(c.user_activity_exponent, c.n_users) + 0.01
    events = _allocate_events(activity, c)
    span_days = SPAN_MEDIAN_DAYS * np.exp(0.8 * r.standard_normal(c.n_users))
    span_days *= (events / c.min_user_events) ** 0.3  # heavy users stay around longer
    span_s = (np.clip(span_days, MIN_SPAN_DAYS, MAX_SPAN_DAYS) * 86_400).astype(np.int64)
    start_u = r.random(c.n_users)

    r = rng(3)
    # Centred per row (weighted by genre frequency) so the shifts move tastes between genres
    # without moving a group's, or the data set's, mean rating.
    genre_p = _GENRE_WEIGHTS / _GENRE_WEIGHTS.sum()
    gender_genre = GENDER_SHIFT_SD * r.standard_normal((len(GENDERS), n_genres))
    gender_genre -= (gender_genre @ genre_p)[:, None]
    age_genre = AGE_SHIFT_SD * r.standard_normal((len(AGE_CODES), n_genres))
    age_genre -= (age_genre @ genre_p)[:, None]
    group_genre = (gender_genre[:, None, :] + age_genre[None, :, :]).reshape(-1, n_genres)
    group_shift = (group_genre @ genre_w.T).astype(np.float32)

    return Planted(
        item_genres=item_genres,
        item_genre_weights=genre_w,
        item_year=year,
        item_popularity=popularity,
        item_bias=item_bias,
        item_factors=_quantise(item_factors),
        successors=succ,
        user_gender=gender,
        user_age=age,
        user_occupation=occupation,
        user_zip=zip_code,
        user_factors=_quantise(user_factors),
        user_bias=user_bias,
        user_events=events,
        user_span_s=span_s,
        user_start_u=start_u,
        gender_genre=gender_genre,
        age_genre=age_genre,
        group_shift=group_shift,
    )


# --- per-item and per-user constants -------------------------------------------------------


def _quantise(x: np.ndarray) -> np.ndarray:
    """Round to multiples of 1/_QUANT (stored x _QUANT) so products are exact in float32."""
    return np.clip(np.rint(x * _QUANT), -127, 127).astype(np.float32)


def _distinct_draws(
    r: np.random.Generator, pool: np.ndarray, weights: np.ndarray, k: int, exclude: np.ndarray
) -> np.ndarray:
    """For each entry of ``exclude``, ``k`` distinct weighted draws from ``pool`` != it.

    Rejection sampling, vectorised over rows: each round redraws only the rows whose draw
    collided. A row whose excluded values hold nearly all the weight (a small genre dominated
    by its own hit) would take many rounds, so after a few it draws exactly from its allowed
    values instead. Needs ``len(pool) > k``.
    """
    cumulative = np.cumsum(weights)
    log_weights = np.log(weights)
    out = np.full((len(exclude), k), -1, dtype=np.int64)
    for slot in range(k):
        pending = np.arange(len(exclude))
        for _ in range(_REJECTION_ROUNDS):
            draw = np.searchsorted(cumulative, r.random(pending.size) * cumulative[-1], "right")
            value = pool[np.minimum(draw, len(pool) - 1)]
            bad = (value == exclude[pending]) | (out[pending, :slot] == value[:, None]).any(1)
            out[pending[~bad], slot] = value[~bad]
            pending = pending[bad]
        for row in pending:  # Gumbel-max over the allowed values only
            keys = log_weights + r.gumbel(size=len(pool))
            keys[np.isin(pool, [exclude[row], *out[row, :slot]])] = -np.inf
            out[row, slot] = pool[keys.argmax()]
    return out


def _successor_table(
    r: np.random.Generator, primary: np.ndarray, popularity: np.ndarray, k: int
) -> np.ndarray:
    """``k`` successors per item within its primary genre, weighted by popularity.

    Follow-ups lead to hits (as sequels and "people also watched" lists do), which keeps the
    catalogue shares as skewed as the normal draw makes them. A genre too small to supply ``k``
    distinct other items draws from the whole catalogue.
    """
    n_items = len(primary)
    succ = np.empty((n_items, k), dtype=np.int64)
    everyone = np.arange(n_items)
    for genre in range(len(GENRES)):
        members = np.flatnonzero(primary == genre)
        if members.size == 0:
            continue
        pool = members if members.size > k else everyone
        succ[members] = _distinct_draws(r, pool, popularity[pool], k, exclude=members)
    return succ


def _allocate_events(activity: np.ndarray, c: SyntheticConfig) -> np.ndarray:
    """Per-user event counts: minimum + share of the rest ~ activity, capped, summing exactly."""
    extra_total = c.n_events - c.min_user_events * c.n_users
    cap = c.max_user_events - c.min_user_events
    # Water-filling: the scale s with sum(min(cap, s * activity)) == extra_total, by bisection
    # (keeping the side whose total does not exceed it).
    lo, hi = 0.0, extra_total / activity.min() + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(cap, mid * activity).sum() <= extra_total:
            lo = mid
        else:
            hi = mid
    share = np.minimum(cap, lo * activity)
    extra = np.floor(share).astype(np.int64)
    # Largest remainders get the last few events; capped users sort after everyone else.
    missing = extra_total - int(extra.sum())
    order = np.argsort((extra >= cap) - (share - extra), kind="stable")
    extra[order[:missing]] += 1
    return c.min_user_events + extra
