"""The embedded synthetic source: determinism, the parquet contract and the planted structure."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest import synthetic, synthetic_cells, synthetic_events
from ingest.synthetic import (
    AGE_CODES,
    GENRES,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    OCCUPATIONS,
    USERS_SCHEMA,
    YEAR_SECONDS,
    YEAR_START,
    SyntheticConfig,
    SyntheticOutput,
    generate,
    plant,
    successors,
)

SMALL = SyntheticConfig(n_users=120, n_items=400, n_events=6_000, seed=7)
DEFAULT = SyntheticConfig()  # MovieLens-100K sized: generates in well under a second


def _events(out: SyntheticOutput) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in out.interactions)


def _frame(out: SyntheticOutput):
    """Events joined with users and items, in file order (user, then time)."""
    events = _events(out).to_pandas()
    users = pq.read_table(out.users).to_pandas()
    items = pq.read_table(out.items).to_pandas()
    return events.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")


def _follows(config: SyntheticConfig, user_id: np.ndarray, item_id: np.ndarray) -> np.ndarray:
    """Whether each event's item succeeds one of the user's previous `successor_window` items."""
    table = successors(config)  # row id - 1 -> successor ids
    hit = np.zeros(len(item_id), dtype=bool)
    for lag in range(1, config.successor_window + 1):
        prev_item, prev_user = np.roll(item_id, lag), np.roll(user_id, lag)
        same_user = prev_user == user_id
        same_user[:lag] = False
        hit |= same_user & (table[prev_item - 1] == item_id[:, None]).any(axis=1)
    return hit


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SyntheticOutput:
    return generate(SMALL, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def default_frame(tmp_path_factory):
    return _frame(generate(DEFAULT, tmp_path_factory.mktemp("default")))


def _file_bytes(out: SyntheticOutput) -> list[bytes]:
    return [p.read_bytes() for p in [*out.interactions, out.users, out.items]]


def test_same_seed_gives_identical_files_and_other_seed_differs(small, tmp_path):
    again = generate(SMALL, tmp_path / "again")
    assert _file_bytes(again) == _file_bytes(small)
    other = generate(dataclasses.replace(SMALL, seed=8), tmp_path / "other")
    assert not _events(other).equals(_events(small))
    assert not pq.read_table(other.users).equals(pq.read_table(small.users))


def _by_user_and_time(table: pa.Table) -> pa.Table:
    return table.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])


def test_tiny_blocks_give_the_same_rows_as_one_block(small, tmp_path):
    tiny = dataclasses.replace(SMALL, max_block_events=300)
    out = generate(tiny, tmp_path / "one", workers=1)
    # Worker processes write the same files as one process.
    assert _file_bytes(generate(tiny, tmp_path / "two", workers=2)) == _file_bytes(out)
    assert len(out.interactions) > 10 and len(small.interactions) == 1
    assert _by_user_and_time(_events(out)).equals(_events(small))
    # Heaviest users first; each part sorted by user then time, no user in two parts.
    parts = [pq.read_table(p).to_pandas() for p in out.interactions]
    counts = [part.groupby("user_id").size() for part in parts]
    assert all(a.min() >= b.max() for a, b in zip(counts, counts[1:]))
    for part in parts:
        assert part.user_id.is_monotonic_increasing
        assert (part.timestamp.diff()[part.user_id.diff() == 0] > 0).all()
    users = np.concatenate([p.user_id.unique() for p in parts])
    assert len(users) == len(set(users)) == SMALL.n_users


@pytest.mark.parametrize(
    ("dense_draws", "head", "block_users", "single_checks"),
    [(0.0, 37, 9, 0), (0.5, 150, 1000, 1), (0.5, 7, 50, 3), (10.0, 4096, 1000, 2)],
)
def test_sparse_cells_give_the_same_rows_as_dense_ones(
    small, tmp_path, monkeypatch, dense_draws, head, block_users, single_checks
):
    """Dense columns, users per block and one-at-a-time checks change how the choice is
    computed (table or cell by cell, hash set or table, one lookup or all), not what it
    chooses: every row is the same as with the whole catalogue dense."""
    assert SMALL.n_users * SMALL.n_items <= synthetic_cells.ALL_DENSE_CELLS  # the fixture is all dense
    monkeypatch.setattr(synthetic_cells, "ALL_DENSE_CELLS", 0)
    monkeypatch.setattr(synthetic_cells, "DENSE_DRAWS", dense_draws)
    monkeypatch.setattr(synthetic_cells, "HEAD_ITEMS", head)
    monkeypatch.setattr(synthetic_events, "_SINGLE_CHECKS", single_checks)
    monkeypatch.setattr(synthetic, "MAX_BLOCK_USERS", block_users)
    out = generate(SMALL, tmp_path, workers=1)  # the patched constants live in this process
    assert len(out.interactions) == -(-SMALL.n_users // block_users)
    assert _by_user_and_time(_events(out)).equals(_events(small))


def test_taste_at_cells_matches_whole_rows_bit_for_bit():
    planted = plant(SMALL)
    rng = np.random.default_rng(0)
    users = rng.integers(0, SMALL.n_users, 5_000)
    items = rng.integers(0, SMALL.n_items, 5_000)
    dense = planted.taste(np.arange(SMALL.n_users))
    assert planted.taste_at(users, items).tobytes() == dense[users, items].tobytes()
    subset = np.array([3, 0, 399, 17])
    assert planted.taste(users[:9], subset).tobytes() == dense[users[:9]][:, subset].tobytes()


def test_hash_set_agrees_with_a_python_set():
    rng = np.random.default_rng(1)
    seen = synthetic_cells._HashSet(4_000)
    reference: set[int] = set()
    for _ in range(40):  # batches that collide with each other and with earlier keys
        batch = np.unique(rng.integers(0, 20_000, 100))
        batch = batch[~np.isin(batch, list(reference))]
        seen.add(batch)
        reference.update(batch.tolist())
        probe = rng.integers(0, 20_000, 500)
        assert seen.contains(probe).tolist() == [int(k) in reference for k in probe]


def test_default_rows_are_the_ones_the_leaderboard_was_measured_on(default_frame):
    """The default data set is pinned: a change to the generator that moves a single row of it
    moves every figure measured on it, and must say so (update this digest in that commit)."""
    digest = hashlib.sha256()
    for column in ("user_id", "item_id", "rating", "timestamp"):
        digest.update(default_frame[column].to_numpy().tobytes())
    assert digest.hexdigest()[:16] == "a714d8cd2354d669"


def test_schemas_and_layout(small):
    root = small.users.parent
    assert small.interactions == [root / "interactions" / "part-00000.parquet"]
    assert small.users == root / "users.parquet" and small.items == root / "items.parquet"
    assert small.n_events == SMALL.n_events
    for path in small.interactions:
        assert pq.read_schema(path).remove_metadata() == INTERACTIONS_SCHEMA
    assert pq.read_schema(small.users).remove_metadata() == USERS_SCHEMA
    assert pq.read_schema(small.items).remove_metadata() == ITEMS_SCHEMA

    users = pq.read_table(small.users).to_pandas()
    assert users.user_id.tolist() == list(range(1, SMALL.n_users + 1))
    assert set(users.gender) == {"M", "F"}
    assert set(users.age) <= set(AGE_CODES)
    assert set(users.occupation) <= set(OCCUPATIONS) and users.occupation.nunique() >= 10
    assert users.zip_code.str.fullmatch(r"\d{5}").all()

    items = pq.read_table(small.items).to_pandas()
    assert items.item_id.tolist() == list(range(1, SMALL.n_items + 1))
    assert (
        items.title == [f"Synthetic Film {i} ({y})" for i, y in zip(items.item_id, items.year, strict=True)]
    ).all()
    assert items.year.between(1920, 1998).all()
    genres = items.genres.str.split("|")
    assert genres.map(len).between(1, 3).all()
    assert genres.map(lambda g: len(set(g)) == len(g) and set(g) <= set(GENRES)).all()
    assert (genres.str[0] == [GENRES[g] for g in plant(SMALL).item_genres[:, 0]]).all()


def test_events_are_valid(small):
    events = _events(small).to_pandas()
    assert len(events) == SMALL.n_events
    assert not events.duplicated(["user_id", "item_id"]).any()
    assert set(events.rating.unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert events.user_id.isin(range(1, SMALL.n_users + 1)).all()
    assert events.item_id.isin(range(1, SMALL.n_items + 1)).all()
    assert events.timestamp.between(YEAR_START, YEAR_START + YEAR_SECONDS - 1).all()
    # Written sorted by user then time, with no two events of a user at the same second.
    assert events.user_id.is_monotonic_increasing
    same_user = events.user_id.diff() == 0
    assert (events.timestamp.diff()[same_user] > 0).all()
    per_user = events.groupby("user_id").size()
    assert len(per_user) == SMALL.n_users
    assert per_user.min() >= SMALL.min_user_events
    assert per_user.max() <= SMALL.max_user_events
    assert (per_user.to_numpy() == plant(SMALL).user_events).all()


def test_rating_distribution_looks_like_movielens(default_frame):
    rating = default_frame.rating
    assert 3.3 < rating.mean() < 3.8
    assert 0.45 < (rating >= 4).mean() < 0.65
    assert 0.15 < (rating == 5).mean() < 0.30
    assert (rating == 1).mean() > 0.01


def test_popularity_and_activity_are_skewed(default_frame):
    counts = default_frame.item_id.value_counts().to_numpy()  # sorted, largest first
    top = DEFAULT.n_items // 10
    assert counts[:top].sum() / counts.sum() > 0.4
    per_user = default_frame.groupby("user_id").size()
    assert per_user.median() < 0.75 * per_user.mean()
    assert per_user.max() > 5 * per_user.min()


def test_gender_genre_effect_is_detectable_and_matches_the_plant(default_frame):
    primary = default_frame.genres.str.split("|").str[0]
    means = default_frame.groupby([primary, "gender"]).rating.mean().unstack()
    observed = (means["M"] - means["F"]).reindex(GENRES).to_numpy()
    # Planted gap: mean taste of men minus women over the items of each primary genre (the
    # shift matrix G plus the gender part of the latent factors).
    planted = plant(DEFAULT)
    taste = planted.taste(np.arange(DEFAULT.n_users)).astype(np.float64)
    men, women = planted.user_gender == 0, planted.user_gender == 1  # GENDERS = ("M", "F")
    genre_of = planted.item_genres[:, 0]
    expected = [
        taste[men][:, genre_of == g].mean() - taste[women][:, genre_of == g].mean()
        for g in range(len(GENRES))
    ]
    assert np.abs(observed).max() > 0.4
    assert np.corrcoef(observed, expected)[0, 1] > 0.8


def test_following_a_recent_item_raises_the_like_rate(default_frame):
    follows = _follows(DEFAULT, default_frame.user_id.to_numpy(), default_frame.item_id.to_numpy())
    like = default_frame.rating.to_numpy() >= 4
    assert 0.2 < follows.mean() < 0.5  # successor_prob = 0.3 plus chance hits
    assert like[follows].mean() - like[~follows].mean() > 0.2


def test_successors_stay_in_the_primary_genre(small):
    table = successors(SMALL)
    assert table.shape == (SMALL.n_items, SMALL.successors_per_item)
    ids = np.arange(1, SMALL.n_items + 1)
    assert (table != ids[:, None]).all()
    assert all(len(set(row)) == len(row) for row in table.tolist())
    primary = plant(SMALL).item_genres[:, 0]
    assert (primary[table - 1] == primary[:, None]).mean() > 0.95


def test_temporal_cut_leaves_most_later_events_with_earlier_history(default_frame):
    ts = default_frame.timestamp
    for quantile in (0.8, 0.9):
        cut = ts.quantile(quantile)
        seen_before = set(default_frame.user_id[ts < cut])
        later = default_frame.user_id[ts >= cut]
        assert later.isin(seen_before).mean() > 0.75


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_users": 0}, "n_users"),
        ({"n_events": 20 * 943 - 1}, "n_events"),
        ({"n_events": 10**9}, "n_events"),
        ({"n_items": 50}, "n_items"),
        ({"seed": -1}, "seed"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"successor_prob": 1.5}, "successor_prob"),
        ({"item_popularity_exponent": 5.0}, "item_popularity_exponent"),
        ({"max_user_item_share": 0.0}, "max_user_item_share"),
        ({"n_candidates": 2.5}, "n_candidates"),
        ({"successor_bonus": float("nan")}, "successor_bonus"),
        ({"max_block_events": 0}, "max_block_events"),
    ],
)
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field} must be"):
        SyntheticConfig(**change)
