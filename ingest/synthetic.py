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
Users are generated in blocks of ``max(1, max_block_cells // n_items)`` users; a block holds a
float32 taste matrix and a bool seen-matrix (5 bytes per cell) and is written as one parquet part,
so memory is bounded by ``max_block_cells``, not by ``n_events``. Inside a block the work is
vectorised over users, looping over event positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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

# Rejection rounds of a distinct weighted draw before the exact per-row fallback.
_REJECTION_ROUNDS = 8

# Exactness bound of the quantised factor product: |p|, |v| <= 127 so d * 127**2 < 2**24.
_QUANT = 32.0
_MAX_LATENT_DIM = 256

# Hash streams: one per kind of per-event randomness, so they never share bits.
_STREAM_CHOICE, _STREAM_SUCCESSOR, _STREAM_FALLBACK, _STREAM_RATING, _STREAM_TIME = range(5)

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
    # Cells (users x items) per block: 2**24 cells cost ~84 MB (float32 taste + bool seen) and
    # give blocks big enough that the per-position Python loop is amortised.
    max_block_cells: int = 2**24

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
            "n_candidates", "successors_per_item", "successor_window", "max_block_cells",
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
        need(self.max_block_cells >= 1, "max_block_cells", ">= 1")

    @property
    def max_user_events(self) -> int:
        return math.floor(self.max_user_item_share * self.n_items)

    @property
    def users_per_block(self) -> int:
        return max(1, self.max_block_cells // self.n_items)


@dataclass(frozen=True)
class SyntheticOutput:
    interactions: list[Path]  # parquet part files, one per user block, in user-id order
    users: Path
    items: Path
    n_events: int  # rows actually written (always config.n_events)


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

    def taste(self, users: np.ndarray) -> np.ndarray:
        """``taste(u, i)`` for the user indices ``users`` over all items, float32 (len, n_items).

        The factor product is exact (integer-valued float32 below 2**24), so a user's row is the
        same bits whichever block computes it.
        """
        latent_dim = self.item_factors.shape[1]
        scale = np.float32(AFFINITY_SCALE / (_QUANT * _QUANT * math.sqrt(latent_dim)))
        taste = self.user_factors[users] @ self.item_factors.T
        taste *= scale
        group = self.user_gender[users] * len(AGE_CODES) + self.user_age[users]
        taste += self.group_shift[group]
        return taste


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


def generate(config: SyntheticConfig, out_dir: Path) -> SyntheticOutput:
    """Write ``users.parquet``, ``items.parquet`` and ``interactions/part-NNNNN.parquet``."""
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

    sampler = _CandidateSampler(planted.item_popularity)
    parts: list[Path] = []
    written = 0
    step = config.users_per_block
    for block, lo in enumerate(range(0, config.n_users, step)):
        table = _generate_block(config, planted, sampler, lo, min(lo + step, config.n_users))
        path = parts_dir / f"part-{block:05d}.parquet"
        pq.write_table(table, path)
        parts.append(path)
        written += table.num_rows
    return SyntheticOutput(interactions=parts, users=users_path, items=items_path, n_events=written)


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


# --- one block of users ---------------------------------------------------------------------


def _generate_block(
    c: SyntheticConfig, planted: Planted, sampler: _CandidateSampler, lo: int, hi: int
) -> pa.Table:
    """Events of users ``lo..hi-1`` (indices), sorted by user then time."""
    n_items = c.n_items
    users = np.arange(lo, hi)
    counts = planted.user_events[users]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Work in order of decreasing count so the users still active at position p are a prefix.
    order = np.argsort(-counts, kind="stable")
    sorted_users = users[order]
    sorted_offsets = offsets[order]
    max_count = int(counts.max())
    n_active = np.searchsorted(-counts[order], -np.arange(max_count), side="left")

    taste = planted.taste(sorted_users)  # rows in sorted order
    taste_flat = taste.reshape(-1)
    seen = np.zeros(len(users) * n_items, dtype=bool)
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
        row_base = rows * n_items
        h = _mix(choice_keys[:n] ^ np.uint64(pos))
        chosen = np.full(n, -1, dtype=np.int64)

        # Sequential habit: follow one of the last items, preferring the ones the user likes.
        if pos > 0 and c.successor_prob > 0:
            follow = rows[(h >> np.uint64(40)) < follow_threshold]
            recent = history[follow]
            cand = planted.successors[recent].reshape(len(follow), n_follow)
            flat = row_base[follow, None] + cand
            valid = np.repeat(recent >= 0, c.successors_per_item, axis=1) & ~seen[flat]
            hs = _mix(_mix(successor_keys[follow] ^ np.uint64(pos))[:, None] ^ follow_slots)
            score = weight * taste_flat[flat] + _gumbel(_bits(hs, 0, 23))
            score[~valid] = -np.inf
            best = score.argmax(axis=1)
            ok = valid.any(axis=1)
            chosen[follow[ok]] = cand[ok, best[ok]]

        # Normal draw: popularity candidates re-sampled by taste (importance weights).
        undrawn = np.flatnonzero(chosen < 0)
        if undrawn.size:
            cand, noise = sampler.draw(_mix(h[undrawn, None] ^ slots))
            flat = row_base[undrawn, None] + cand
            score = weight * taste_flat[flat] + sampler.log_ratio[cand] + noise
            score[seen[flat]] = -np.inf
            best = score.argmax(axis=1)
            chosen[undrawn] = cand[np.arange(undrawn.size), best]
            stuck = undrawn[np.isneginf(score[np.arange(undrawn.size), best])]
            if stuck.size:  # every candidate already seen: exact draw over the unseen items
                hf = _mix(
                    _mix(fallback_keys[stuck] ^ np.uint64(pos))[:, None] ^ np.arange(n_items, dtype=np.uint64)
                )
                full = weight * taste[stuck] + sampler.log_pop + _gumbel(_bits(hf, 0, 23))
                full[seen.reshape(len(users), n_items)[stuck]] = -np.inf
                chosen[stuck] = full.argmax(axis=1)

        seen[row_base + chosen] = True
        history[:n, pos % c.successor_window] = chosen
        items[sorted_offsets[:n] + pos] = chosen

    # Per-event columns, in (user, position) order.
    local = np.repeat(np.arange(len(users)), counts)
    position = np.arange(len(items)) - offsets[local]
    user_index = users[local]
    sorted_row = np.empty(len(users), dtype=np.int64)
    sorted_row[order] = np.arange(len(users))
    event_taste = taste_flat[sorted_row[local] * n_items + items].astype(np.float64)

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
