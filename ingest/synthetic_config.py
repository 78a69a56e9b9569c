"""The constants and the :class:`SyntheticConfig` of the synthetic data set: MovieLens
population shares, effect sizes, time constants and the parquet schemas (what they do is
described in :mod:`ingest.synthetic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
# How many MovieLens-100K films carry each genre: primary and secondary genres are drawn with
# these weights so the genre mix looks familiar (Drama and Comedy dominate, Fantasy is rare).
_GENRE_WEIGHTS = np.array(
    [251, 135, 42, 122, 505, 109, 50, 725, 22, 24, 92, 56, 61, 247, 101, 251, 71, 27], float
)
# Share of items with 1, 2, 3 genres (close to MovieLens-100K).
_GENRE_COUNT_P = np.array([0.5, 0.35, 0.15])

GENDERS = ("M", "F")
_GENDER_P = np.array([0.71, 0.29])  # MovieLens-100K/1M are about 71 % male.
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # MovieLens-1M age brackets.
_AGE_P = np.array([0.04, 0.18, 0.35, 0.20, 0.09, 0.08, 0.06])  # MovieLens-1M shares.
OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
_OCCUPATION_W = np.array(
    [711, 528, 267, 173, 759, 112, 236, 679, 17, 92, 195, 129, 388, 142, 302, 144, 241, 502, 70,
     72, 281], float,
)  # fmt: skip  # MovieLens-1M users per occupation.

# Effect sizes (rating points). Together with the noise they give a rating whose variance is
# about 1.2, close to MovieLens-100K's 1.27, with every planted term a visible share of it.
AFFINITY_SCALE = 0.6  # sd of affinity(u, i): the part only a CF/MF model can explain.
GENDER_SHIFT_SD = 0.3  # per (gender, genre): gender gaps of 0.4-0.8 in the strongest genres.
AGE_SHIFT_SD = 0.2  # per (age bracket, genre).
USER_BIAS_SD = 0.4
ITEM_BIAS_SD = 0.45
# Hits are rated higher: the most popular item gets +this, the least popular -this, linear in
# popularity rank (a rank, not log popularity, so the effect does not grow with n_items).
ITEM_POPULARITY_BIAS = 0.3
RATING_NOISE_SD = 0.6  # irreducible noise, so no model gets RMSE far below ~0.7.
RATING_MEAN = 2.58  # calibrated: observed mean ~3.5 once choice favours liked items (see 6.).
# Logit weight of taste in the choice of the next item. On MovieLens a personalised ranker
# beats the popularity ranking by a wide margin; at 1.5 even an oracle that knows the planted
# taste beat popularity by only ~9 % NDCG@10, so implicit top-K models had almost nothing
# to find. At 3.5 (with 64 candidates) the oracle is ~40 % above popularity, and popularity
# still dominates catalogue shares.
CHOICE_WEIGHT = 3.5
# Uniform share of the candidate proposal: without it tail items would almost never be
# candidates and a user who exhausted the hits would always fall back to the full-row draw.
UNIFORM_PROPOSAL_SHARE = 0.05

YEAR_START = 1_577_836_800  # 2020-01-01T00:00:00Z
YEAR_SECONDS = 366 * 86_400  # 2020 is a leap year.
MEAN_SESSION_EVENTS = 8  # a few films rated per visit, as in MovieLens rating bursts.
IN_SESSION_MIN_GAP_S = 30
IN_SESSION_MEAN_EXTRA_S = 150  # events a few minutes apart inside a session...
IN_SESSION_MAX_GAP_S = 1_800
MIN_SESSION_GAP_S = 3_600  # ...and sessions at least an hour apart.
SPAN_MEDIAN_DAYS = 90.0  # long enough that most users straddle a 80/90 % global time cut.
MIN_SPAN_DAYS = 2.0
MAX_SPAN_DAYS = 330.0

# Exactness bound of the quantised factor product: |p|, |v| <= 127 so d * 127**2 < 2**24.
_QUANT = 32.0
_MAX_LATENT_DIM = 256

INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("rating", pa.float64()),
        ("timestamp", pa.int64()),
    ]
)
USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("gender", pa.string()),
        ("age", pa.int32()),
        ("occupation", pa.string()),
        ("zip_code", pa.string()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("year", pa.int32()),
        ("genres", pa.string()),
    ]
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, seed and structural knobs of the synthetic data set (defaults: MovieLens-100K)."""

    n_users: int = 943
    n_items: int = 1682
    n_events: int = 100_000
    seed: int = 42
    # MF on MovieLens saturates around 10-50 factors; 16 gives CF/MF/NCF real structure to
    # recover from 100k events without needing millions to learn it.
    latent_dim: int = 16
    # MovieLens keeps only users with at least 20 ratings.
    min_user_events: int = 20
    # A user rates at most this share of the catalogue. MovieLens-100K's most active user rated
    # 44 %; a lower cap keeps the tail realistic and the candidate sampling cheap (a user who has
    # seen most popular items makes every candidate a repeat).
    max_user_item_share: float = 0.25
    # Zipf exponent of the popularity weights: the no-repeat rule and the taste term flatten the
    # observed shares, so 1.2 is what puts about half of all events on the top 10 % of items,
    # as in MovieLens-100K.
    item_popularity_exponent: float = 1.2
    # Pareto tail index of user activity above the minimum: 1.3 gives a MovieLens-like median
    # well below the mean and a few very heavy users.
    user_activity_exponent: float = 1.3
    # Candidates per draw of the importance resampling: with a popularity proposal, 16 left the
    # choice close to popularity whatever the taste weight; 64 lets taste act (measured with
    # the oracle ranking) for ~30 % more generation time.
    n_candidates: int = 64
    # Successors per item: a few "what people watch next" links, sparse enough that a sequence
    # model must attend to the right history item, dense enough to matter.
    successors_per_item: int = 3
    # Chance that the next item follows a recent one: about a third of events, strong enough for
    # DIN/BST to exploit, weak enough that popularity and taste still drive most choices.
    successor_prob: float = 0.3
    # How far back "recent" reaches, both for the choice and for the rating bonus.
    successor_window: int = 3
    # Rating bonus of a followed item: +1 point moves a "3" to a "4", so rating >= 4 is far more
    # likely after a related item, which only a model that sees the history can predict.
    successor_bonus: float = 1.0
    # Events per block (a block is the users whose first event falls in one window of this many
    # events). Memory follows it, ~150 bytes an event plus a dense users x 2,048 taste table
    # (~0.5 GB in all at 2**21), and big blocks amortise the per-position Python loop.
    max_block_events: int = 2**21

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        def is_int(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        def is_real(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int | float | np.number) and math.isfinite(value)

        for name in (
            "n_users", "n_items", "n_events", "seed", "latent_dim", "min_user_events",
            "n_candidates", "successors_per_item", "successor_window", "max_block_events",
        ):  # fmt: skip
            need(is_int(name), name, "an integer")
        for name in (
            "max_user_item_share", "item_popularity_exponent", "user_activity_exponent",
            "successor_prob", "successor_bonus",
        ):  # fmt: skip
            need(is_real(name), name, "a finite number")
        need(self.n_users >= 1, "n_users", ">= 1")
        need(0 <= self.seed < 2**63, "seed", "in [0, 2**63)")
        need(1 <= self.latent_dim <= _MAX_LATENT_DIM, "latent_dim", f"in [1, {_MAX_LATENT_DIM}]")
        need(self.min_user_events >= 1, "min_user_events", ">= 1")
        need(0 < self.max_user_item_share <= 1, "max_user_item_share", "in (0, 1]")
        need(
            self.n_items >= self.min_user_events / self.max_user_item_share
            and self.n_items > self.successors_per_item,
            "n_items",
            f">= min_user_events / max_user_item_share "
            f"({math.ceil(self.min_user_events / self.max_user_item_share)}) and "
            f"> successors_per_item ({self.successors_per_item})",
        )
        low = self.min_user_events * self.n_users
        high = self.max_user_events * self.n_users
        need(
            low <= self.n_events <= high,
            "n_events",
            f"in [min_user_events * n_users, max_user_events * n_users] = [{low}, {high}] "
            f"(max_user_events = floor(max_user_item_share * n_items) = {self.max_user_events})",
        )
        # Beyond these the weights underflow or one item/user takes everything.
        need(0 <= self.item_popularity_exponent <= 3, "item_popularity_exponent", "in [0, 3]")
        need(0.5 <= self.user_activity_exponent <= 10, "user_activity_exponent", "in [0.5, 10]")
        need(self.n_candidates >= 1, "n_candidates", ">= 1")
        need(self.successors_per_item >= 1, "successors_per_item", ">= 1")
        need(0 <= self.successor_prob <= 1, "successor_prob", "in [0, 1]")
        need(self.successor_window >= 1, "successor_window", ">= 1")
        need(self.successor_bonus >= 0, "successor_bonus", ">= 0")
        need(self.max_block_events >= 1, "max_block_events", ">= 1")

    @property
    def max_user_events(self) -> int:
        return math.floor(self.max_user_item_share * self.n_items)
