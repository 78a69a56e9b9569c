"""The events of one block of users: choice, ratings and timestamps (steps 4-7 of *Planted
structure* in :mod:`ingest.synthetic`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ingest.synthetic_cells import BlockCells
from ingest.synthetic_config import (
    CHOICE_WEIGHT,
    IN_SESSION_MAX_GAP_S,
    IN_SESSION_MEAN_EXTRA_S,
    IN_SESSION_MIN_GAP_S,
    INTERACTIONS_SCHEMA,
    MEAN_SESSION_EVENTS,
    MIN_SESSION_GAP_S,
    RATING_MEAN,
    RATING_NOISE_SD,
    YEAR_SECONDS,
    YEAR_START,
    SyntheticConfig,
)
from ingest.synthetic_hashing import (
    _STREAM_CHOICE,
    _STREAM_FALLBACK,
    _STREAM_RATING,
    _STREAM_SUCCESSOR,
    _STREAM_TIME,
    _bits,
    _CandidateSampler,
    _gumbel,
    _mix,
    _stream_keys,
    _unit,
)
from ingest.synthetic_planted import Planted

# --- one block of users ---------------------------------------------------------------------

# Candidates checked one at a time, best score first, before checking the whole row.
_SINGLE_CHECKS = 2


def _generate_block(
    c: SyntheticConfig, planted: Planted, sampler: _CandidateSampler, users: np.ndarray
) -> pa.Table:
    """Events of the users with (ascending) indices ``users``, sorted by user then time."""
    n_items = c.n_items
    counts = planted.user_events[users]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Work in order of decreasing count so the users still active at position p are a prefix.
    order = np.argsort(-counts, kind="stable")
    sorted_users = users[order]
    sorted_offsets = offsets[order]
    max_count = int(counts.max())
    n_active = np.searchsorted(-counts[order], -np.arange(max_count), side="left")

    cells = BlockCells(planted, sorted_users, int(counts.sum()), c.n_candidates)  # rows in sorted order
    history = np.full((len(users), c.successor_window), -1, dtype=np.int64)  # ring buffer
    items = np.empty(int(counts.sum()), dtype=np.int64)
    user_ids = sorted_users + 1
    choice_keys = _stream_keys(c.seed, _STREAM_CHOICE, user_ids)
    successor_keys = _stream_keys(c.seed, _STREAM_SUCCESSOR, user_ids)
    fallback_keys = _stream_keys(c.seed, _STREAM_FALLBACK, user_ids)
    slots = np.arange(c.n_candidates, dtype=np.uint64)
    n_follow = c.successor_window * c.successors_per_item
    follow_slots = np.arange(n_follow, dtype=np.uint64)
    follow_threshold = np.uint64(round(c.successor_prob * 2**24))
    weight = np.float32(CHOICE_WEIGHT)

    for pos in range(max_count):
        n = int(n_active[pos])
        rows = np.arange(n)
        h = _mix(choice_keys[:n] ^ np.uint64(pos))
        chosen = np.full(n, -1, dtype=np.int64)

        # Sequential habit: follow one of the last items, preferring the ones the user likes.
        if pos > 0 and c.successor_prob > 0:
            follow = rows[(h >> np.uint64(40)) < follow_threshold]
            recent = history[follow]
            cand = planted.successors[recent].reshape(len(follow), n_follow)
            valid = np.repeat(recent >= 0, c.successors_per_item, axis=1)
            valid &= ~cells.seen(follow, cand)
            hs = _mix(_mix(successor_keys[follow] ^ np.uint64(pos))[:, None] ^ follow_slots)
            score = weight * cells.taste(follow, cand) + _gumbel(_bits(hs, 0, 23))
            score[~valid] = -np.inf
            best = score.argmax(axis=1)
            ok = valid.any(axis=1)
            chosen[follow[ok]] = cand[ok, best[ok]]

        # Normal draw: popularity candidates re-sampled by taste (importance weights).
        undrawn = np.flatnonzero(chosen < 0)
        if undrawn.size:
            cand, noise = sampler.draw(_mix(h[undrawn, None] ^ slots))
            score = weight * cells.taste(undrawn, cand) + sampler.log_ratio[cand] + noise
            best = _best_unseen(score, cand, undrawn, cells)
            chosen[undrawn] = cand[np.arange(undrawn.size), best]
            stuck = undrawn[np.isneginf(score[np.arange(undrawn.size), best])]
            if stuck.size:  # every candidate already seen: exact draw over the unseen items
                hf = _mix(
                    _mix(fallback_keys[stuck] ^ np.uint64(pos))[:, None] ^ np.arange(n_items, dtype=np.uint64)
                )
                full = weight * cells.taste_rows(stuck) + sampler.log_pop + _gumbel(_bits(hf, 0, 23))
                earlier = items[sorted_offsets[stuck, None] + np.arange(pos)]
                full[np.arange(stuck.size)[:, None], earlier] = -np.inf
                chosen[stuck] = full.argmax(axis=1)

        cells.add(rows, chosen)
        history[:n, pos % c.successor_window] = chosen
        items[sorted_offsets[:n] + pos] = chosen

    # Per-event columns, in (user, position) order.
    local = np.repeat(np.arange(len(users)), counts)
    position = np.arange(len(items)) - offsets[local]
    user_index = users[local]
    sorted_row = np.empty(len(users), dtype=np.int64)
    sorted_row[order] = np.arange(len(users))
    event_taste = cells.taste(sorted_row[local], items).astype(np.float64)

    follows = np.zeros(len(items), dtype=bool)
    for lag in range(1, c.successor_window + 1):
        prev = np.roll(items, lag)
        hit = (planted.successors[prev] == items[:, None]).any(axis=1)
        follows |= hit & (position >= lag)

    event_keys = _mix(_stream_keys(c.seed, _STREAM_RATING, user_index + 1) ^ position.astype(np.uint64))
    u1, u2 = _unit(_bits(event_keys, 32, 32), 32), _unit(_bits(event_keys, 0, 32), 32)
    noise = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    latent = (
        RATING_MEAN
        + planted.user_bias[user_index]
        + planted.item_bias[items]
        + event_taste
        + c.successor_bonus * follows
        + RATING_NOISE_SD * noise
    )
    rating = np.clip(np.rint(latent), 1.0, 5.0)

    timestamp = _timestamps(c, planted, users, counts, offsets, local, position)
    return pa.table(
        {
            "user_id": pa.array(user_index + 1, pa.int64()),
            "item_id": pa.array(items + 1, pa.int64()),
            "rating": pa.array(rating, pa.float64()),
            "timestamp": pa.array(timestamp, pa.int64()),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def _timestamps(
    c: SyntheticConfig,
    planted: Planted,
    users: np.ndarray,
    counts: np.ndarray,
    offsets: np.ndarray,
    local: np.ndarray,
    position: np.ndarray,
) -> np.ndarray:
    """Session-structured, strictly increasing unix seconds per user (integer arithmetic, so
    sums are exact whatever the block)."""
    h = _mix(_stream_keys(c.seed, _STREAM_TIME, users[local] + 1) ^ position.astype(np.uint64))
    later = position > 0
    new_session = later & (_bits(h, 48, 16) < np.uint64(65_536 // MEAN_SESSION_EVENTS))
    in_gap = IN_SESSION_MIN_GAP_S + np.floor(
        -np.log(_unit(_bits(h, 24, 24), 24)) * IN_SESSION_MEAN_EXTRA_S
    ).astype(np.int64)
    in_gap = np.where(later & ~new_session, np.minimum(in_gap, IN_SESSION_MAX_GAP_S), 0)
    # Session breaks share the span left after the in-session time, by Exp(1) weights.
    weight = np.where(
        new_session, 1 + np.floor(-np.log(_unit(_bits(h, 0, 24), 24)) * 1e6).astype(np.int64), 0
    )
    in_total = np.add.reduceat(in_gap, offsets)
    n_breaks = np.add.reduceat(new_session.astype(np.int64), offsets)
    weight_total = np.maximum(np.add.reduceat(weight, offsets), 1)
    budget = np.maximum(0, planted.user_span_s[users] - in_total - n_breaks * MIN_SESSION_GAP_S)
    break_gap = MIN_SESSION_GAP_S + budget[local] * weight // weight_total[local]
    gap = in_gap + np.where(new_session, break_gap, 0)
    elapsed = np.cumsum(gap)
    elapsed -= elapsed[offsets][local]  # first event of each user: gap 0, elapsed 0
    span = elapsed[offsets + counts - 1]
    room = np.maximum(0, YEAR_SECONDS - 1 - span)
    start = np.floor(planted.user_start_u[users] * room).astype(np.int64)
    return YEAR_START + start[local] + elapsed


def _best_unseen(score: np.ndarray, cand: np.ndarray, rows: np.ndarray, cells: BlockCells) -> np.ndarray:
    """Per row, the index of the best-scoring candidate not seen yet: ``argmax`` of ``score``
    with seen candidates set to ``-inf`` (in place), so ties and an all-seen row (index 0, score
    ``-inf``) come out exactly as one masked ``argmax`` would give them. The best candidate is
    mostly unseen, so most rows need one lookup instead of ``n_candidates``."""
    best = score.argmax(axis=1)
    pending = np.arange(len(score))
    for _ in range(_SINGLE_CHECKS):
        repeat = cells.seen(rows[pending], cand[pending, best[pending]])
        pending = pending[repeat]
        if not pending.size:
            return best
        score[pending, best[pending]] = -np.inf
        best[pending] = score[pending].argmax(axis=1)
    rest = score[pending]
    rest[cells.seen(rows[pending], cand[pending])] = -np.inf
    score[pending] = rest
    best[pending] = rest.argmax(axis=1)
    return best
