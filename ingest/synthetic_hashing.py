"""Per-event randomness: a counter-based hash (splitmix64) of ``(seed, stream, user, position,
slot)``, so a user's events do not depend on the block that generates them (*Determinism* in
:mod:`ingest.synthetic`), and the alias-table sampler of the choice candidates."""

from __future__ import annotations

import numpy as np

from ingest.synthetic_config import UNIFORM_PROPOSAL_SHARE

# Hash streams: one per kind of per-event randomness, so they never share bits.
_STREAM_CHOICE, _STREAM_SUCCESSOR, _STREAM_FALLBACK, _STREAM_RATING, _STREAM_TIME = range(5)


# --- per-event randomness: a counter-based hash ----------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (returns a new array)."""
    z = x + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _stream_keys(seed: int, stream: int, user_ids: np.ndarray) -> np.ndarray:
    """One uint64 key per user for one stream; mix it with a position for per-event keys."""
    base = _mix(np.array([seed], dtype=np.uint64))
    base = _mix(base ^ np.uint64(stream))
    return _mix(base ^ user_ids.astype(np.uint64))


def _bits(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)


def _unit(bits: np.ndarray, width: int) -> np.ndarray:
    """Integer bits -> float64 strictly inside (0, 1)."""
    return (bits.astype(np.float64) + 0.5) / float(1 << width)


def _gumbel(bits23: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise in float32 from 23 random bits (with 24, u could round to 1)."""
    u = (bits23.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    return -np.log(-np.log(u))


class _CandidateSampler:
    """Alias table of the proposal ``(1 - e) * pop + e / n`` for O(1) hashed draws."""

    def __init__(self, popularity: np.ndarray) -> None:
        n = len(popularity)
        proposal = (1 - UNIFORM_PROPOSAL_SHARE) * popularity + UNIFORM_PROPOSAL_SHARE / n
        self.n = n
        # log(target / proposal) with target ~ pop: the importance weight of a candidate.
        self.log_ratio = np.log(popularity / proposal).astype(np.float32)
        self.log_pop = np.log(popularity).astype(np.float32)
        prob, alias = _vose_alias(proposal)
        self.accept16 = np.rint(prob * 65_536).astype(np.uint64)  # accept if 16 bits < this
        self.alias = alias

    def draw(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates and their Gumbel noise from 64-bit hashes: 24 bits pick a column,
        16 bits decide column-or-alias, 23 of the last 24 bits make the noise."""
        column = ((h >> np.uint64(40)) * np.uint64(self.n)) >> np.uint64(24)
        column = column.astype(np.int64)
        keep = _bits(h, 24, 16) < self.accept16[column]
        return np.where(keep, column, self.alias[column]), _gumbel(_bits(h, 0, 23))


def _vose_alias(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(p)
    scaled = p * n / p.sum()
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias  # leftovers keep prob 1 (floating-point residue)
