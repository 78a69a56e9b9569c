"""The embedded synthetic data source: MovieLens-shaped parquet files with planted structure.

The pipeline needs a data set that exists without a download, is the size of MovieLens-100K by
default, scales to tens of millions of events, and holds structure that each model family can
find (and that tests can check). :func:`generate` writes it in the layout a user's parquet files
would have; :func:`plant` returns the hidden structure so tests and model diagnostics can compare
what a model learnt with what was planted.

Ids are 1-based (user ``u`` is row ``u - 1`` of every per-user array, item ``i`` row ``i - 1``).

Planted structure
-----------------
Let ``g(i)`` be item ``i``'s genres (1-3 of the 18 MovieLens genres, primary first) with weights
``w_ig`` (primary 2, others 1, normalised to sum 1), and ``s(u)``, ``a(u)``, ``o(u)`` user ``u``'s
gender, age code and occupation.

1. Latent factors, dimension ``d = latent_dim``. With ``E_g``, ``F_s``, ``F_a``, ``F_o`` and the
   noises ``e_i``, ``e_u`` all standard normal vectors::

       v_i = sqrt(0.6) * sum_g w_ig E_g / |w_i|  +  sqrt(0.4) * e_i    (then centred over items)
       p_u = sqrt(0.5) * (F_s(u) + F_a(u) + F_o(u)) / sqrt(3)  +  sqrt(0.5) * e_u
       affinity(u, i) = AFFINITY_SCALE * p_u . v_i / sqrt(d)

   (``p_u`` and ``v_i`` are quantised to multiples of 1/32 so the block matrix product is exact
   integer arithmetic, whatever the block shape or BLAS kernel: see *Determinism*.)
2. Demographic taste shifts: ``G`` (2 x 18, sd ``GENDER_SHIFT_SD``) and ``A`` (7 x 18, sd
   ``AGE_SHIFT_SD``) are seeded preference matrices, each row centred (weighted by genre
   frequency). The demographic part of ``p_u`` adds further group x genre effects through
   ``F_s . E_g``; ``Planted.taste`` holds the sum::

       taste(u, i) = affinity(u, i) + sum_g w_ig * (G[s(u), g] + A[a(u), g])

3. Popularity: item ``i`` has Zipf weight ``pop_i ~ rank_i ** -item_popularity_exponent`` where
   ``rank_i`` (1 = most popular) is a seeded random permutation of the items. User activity:
   ``n_u = min_user_events + extra_u`` with ``extra_u`` proportional to a Lomax
   (Pareto II, index ``user_activity_exponent``) draw, capped at
   ``max_user_events - min_user_events`` by water-filling, and rounded so the counts sum to
   exactly ``n_events``.
4. Choice: each next item of user ``u`` is drawn, among items ``u`` has not seen, from
   ``P(i) ~ pop_i * exp(CHOICE_WEIGHT * taste(u, i))`` by sampling-importance-resampling:
   ``n_candidates`` candidates from a popularity proposal (mixed with a little uniform mass so
   tail items can appear), then Gumbel-max over ``CHOICE_WEIGHT * taste + log(pop / proposal)``.
   When every candidate was seen the exact Gumbel-max over the whole unseen catalogue is used.
5. Sequential habits: every item has ``successors_per_item`` fixed successors, drawn within its
   primary genre with weight ``pop``. With probability ``successor_prob`` the next item is
   instead a successor of one of the user's last ``successor_window`` items (Gumbel-max over
   ``CHOICE_WEIGHT * taste`` among the unseen ones; the normal draw if none is left).
6. Ratings. With ``b_u ~ N(0, USER_BIAS_SD)``, an item bias that favours hits
   ``b_i ~ N(0, ITEM_BIAS_SD) + ITEM_POPULARITY_BIAS * (1 - 2 (rank_i - 1) / (n_items - 1))``,
   and ``follow(u, t) = 1`` when the item is a successor of one of the user's previous
   ``successor_window`` items (however it was drawn)::

       rating = clip(round(RATING_MEAN + b_u + b_i + taste(u, i)
                           + successor_bonus * follow(u, t) + RATING_NOISE_SD * N(0, 1)), 1, 5)

   ``RATING_MEAN`` is calibrated for the observed shape of MovieLens-100K (mean 3.53, 55 % of
   ratings >= 4, 21 % fives): the default config gives 3.55 / 53 % / 22 %, and 70k users x 10k
   items x 10M events 3.62 / 56 % / 24 % (heavier users, more choice).
7. Time: 2020 (a leap year, from 2020-01-01 UTC). User ``u`` gets a target active span
   ``SPAN_MEDIAN_DAYS * exp(0.8 z) * (n_u / min_user_events) ** 0.3`` days (clipped); each event
   after the first opens a new session with probability ``1 / MEAN_SESSION_EVENTS``. Events inside
   a session are ``30 s + Exp(150 s)`` apart (capped at 30 min); session breaks are at least one
   hour and share the rest of the span in proportion to ``Exp(1)`` weights. The user's window
   starts at a uniform point of the year that still fits it, so users overlap any global time cut
   and a temporal split leaves most test users with earlier (train) activity. Timestamps are
   strictly increasing per user and fall inside 2020 unless a user has more than ~50k events
   (the minimum gaps alone would then fill the year; the window then starts on 2020-01-01).

Determinism
-----------
Per-user and per-item constants come from seeded numpy generators over the whole population.
Every per-event random number is a counter-based hash (splitmix64) of ``(seed, stream, user,
position, slot)``, so a user's events do not depend on which other users share their block: the
output is byte-identical for a given config, and generating with tiny blocks yields the same rows
as one big block (only the split into part files differs).

Scale
-----
The cost follows the events, not users x items. Users are taken heaviest first and cut into
blocks of at most ``max_block_events`` events and ``MAX_BLOCK_USERS`` users; each block is
written as one parquet part (sorted by user, then time), and the blocks are independent, so
worker processes generate them side by side. Inside a block the work is vectorised over users,
looping over event positions: the heavy users share the first block, so only it loops long.
A block keeps dense ``users x head`` taste and seen tables for the most popular items (as many
as pay for themselves: those draw most candidates, see :mod:`ingest.synthetic_cells`), computes
the other cells' taste where it needs them and keeps them in a hash set. A small catalogue is
all head. None of this changes a row: the choice is the same argmax over the same numbers.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.synthetic_cells import MAX_BLOCK_USERS
from ingest.synthetic_config import (
    AGE_CODES,
    GENDERS,
    GENRES,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    OCCUPATIONS,
    USERS_SCHEMA,
    YEAR_SECONDS,
    YEAR_START,
    SyntheticConfig,
)
from ingest.synthetic_events import _generate_block
from ingest.synthetic_hashing import _CandidateSampler
from ingest.synthetic_planted import Planted, plant, successors

__all__ = [
    "AGE_CODES",
    "GENDERS",
    "GENRES",
    "INTERACTIONS_SCHEMA",
    "ITEMS_SCHEMA",
    "OCCUPATIONS",
    "USERS_SCHEMA",
    "YEAR_SECONDS",
    "YEAR_START",
    "Planted",
    "SyntheticConfig",
    "SyntheticOutput",
    "generate",
    "plant",
    "successors",
]


@dataclass(frozen=True)
class SyntheticOutput:
    interactions: list[Path]  # parquet part files, one per block of users (heaviest first)
    users: Path
    items: Path
    n_events: int  # rows actually written (always config.n_events)


def generate(config: SyntheticConfig, out_dir: Path, workers: int | None = None) -> SyntheticOutput:
    """Write ``users.parquet``, ``items.parquet`` and ``interactions/part-NNNNN.parquet``.

    Blocks are independent (*Determinism*), so up to ``workers`` processes (default: the cores
    this process may use) generate them side by side; the files are the same for any number.
    """
    out_dir = Path(out_dir)
    parts_dir = out_dir / "interactions"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob("part-*.parquet"):  # a rerun with fewer blocks must not mix
        stale.unlink()
    planted = plant(config)

    users_path = out_dir / "users.parquet"
    pq.write_table(_users_table(planted), users_path)
    items_path = out_dir / "items.parquet"
    pq.write_table(_items_table(planted), items_path)

    blocks = _blocks(planted.user_events, config.max_block_events)
    parts = [parts_dir / f"part-{block:05d}.parquet" for block in range(len(blocks))]
    sampler = _CandidateSampler(planted.item_popularity)
    workers = min(len(blocks), workers or len(os.sched_getaffinity(0)))
    if workers <= 1:
        written = sum(
            _write_block(config, planted, sampler, b, p) for b, p in zip(blocks, parts, strict=True)
        )
    else:  # spawn: a fork of a threaded parent (a Dagster step) can inherit a held lock
        context = multiprocessing.get_context("spawn")
        init = (config, planted, sampler)
        with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=init) as pool:
            written = sum(pool.map(_write_block_in_worker, blocks, parts))  # heaviest block first
    return SyntheticOutput(interactions=parts, users=users_path, items=items_path, n_events=written)


def _write_block(
    config: SyntheticConfig, planted: Planted, sampler: _CandidateSampler, users: np.ndarray, path: Path
) -> int:
    table = _generate_block(config, planted, sampler, users)
    pq.write_table(table, path)
    return table.num_rows


_WORKER: tuple[SyntheticConfig, Planted, _CandidateSampler] | None = None


def _start_worker(config: SyntheticConfig, planted: Planted, sampler: _CandidateSampler) -> None:
    global _WORKER
    _WORKER = (config, planted, sampler)


def _write_block_in_worker(users: np.ndarray, path: Path) -> int:
    assert _WORKER is not None, "_start_worker runs first in every worker"
    return _write_block(*_WORKER, users, path)


def _blocks(user_events: np.ndarray, max_block_events: int) -> list[np.ndarray]:
    """The users of each block, ascending. Users are taken heaviest first (stable by id), a block
    closing after ``max_block_events`` events or ``MAX_BLOCK_USERS`` users (its first user's
    window of either), so the few heavy users share one block: the position loop of a block
    runs as long as its heaviest user, and the light blocks finish in a few hundred steps."""
    order = np.argsort(-user_events, kind="stable")
    first = np.cumsum(user_events[order]) - user_events[order]
    window = np.maximum(first // max_block_events, np.arange(len(order)) // MAX_BLOCK_USERS)
    starts = np.flatnonzero(np.diff(window)) + 1
    return [np.sort(users) for users in np.split(order, starts)]


def _users_table(p: Planted) -> pa.Table:
    n = len(p.user_gender)
    return pa.table(
        {
            "user_id": pa.array(np.arange(1, n + 1), pa.int64()),
            "gender": pa.array(np.array(GENDERS)[p.user_gender], pa.string()),
            "age": pa.array(np.array(AGE_CODES)[p.user_age], pa.int32()),
            "occupation": pa.array(np.array(OCCUPATIONS)[p.user_occupation], pa.string()),
            "zip_code": pa.array(p.user_zip.astype(str), pa.string()),
        },
        schema=USERS_SCHEMA,
    )


def _items_table(p: Planted) -> pa.Table:
    n = len(p.item_year)
    names = np.array(GENRES + ("",))  # index -1 (padding) maps to ""
    genres = ["|".join(g for g in row if g) for row in names[p.item_genres]]
    titles = [f"Synthetic Film {i} ({y})" for i, y in enumerate(p.item_year.tolist(), start=1)]
    return pa.table(
        {
            "item_id": pa.array(np.arange(1, n + 1), pa.int64()),
            "title": pa.array(titles, pa.string()),
            "year": pa.array(p.item_year, pa.int32()),
            "genres": pa.array(genres, pa.string()),
        },
        schema=ITEMS_SCHEMA,
    )
