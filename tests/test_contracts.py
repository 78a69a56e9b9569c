"""Data contracts: every suite passes on a small warehouse built per docs/DATA_MODEL.md,
and each kind of breakage fails the right expectation with the bad values reported."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from data_contracts import runner
from data_contracts.runner import (
    ContractError,
    ContractResult,
    ExpectationOutcome,
    MissingRelationError,
    list_suites,
    load_suite,
    run_suite,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SUITES = [
    "raw_interactions",
    "raw_users",
    "raw_items",
    "dim_users",
    "dim_items",
    "fct_ratings",
    "fct_ctr_samples",
    "user_stats",
    "item_stats",
]

# A miniature of ingest + dbt: 12 users x 15 events over 20 items, temporal split
# (last 10% of events test, the 10% before valid), indices fitted on train rows.
WAREHOUSE_SQL = """
CREATE SCHEMA raw;
CREATE TABLE raw.interactions AS
SELECT u AS user_id,
       CAST(101 + (u * 5 + k) % 20 AS BIGINT) AS item_id,
       0.5 * (1 + (u * 3 + k * 7) % 10) AS rating,
       CAST(1000000000 + k * 86400 + u * 3600 AS BIGINT) AS ts,
       'ratings.csv' AS source_file,
       CAST(row_number() OVER (ORDER BY u, k) AS BIGINT) AS source_row
FROM range(1, 13) AS users(u), range(15) AS events(k);

CREATE TABLE raw.users AS
SELECT u AS user_id,
       CASE WHEN u % 2 = 0 THEN 'M' ELSE 'F' END AS gender,
       CAST(CASE WHEN u = 3 THEN NULL ELSE 18 + u END AS INTEGER) AS age,
       CASE WHEN u = 4 THEN NULL ELSE 'occupation_' || (u % 3) END AS occupation,
       CAST(10000 + u AS VARCHAR) AS zip_code
FROM range(1, 13) AS users(u);

-- Item 121 is never rated: raw tables may hold items without interactions.
CREATE TABLE raw.items AS
SELECT i AS item_id,
       'Movie ' || i AS title,
       CAST(CASE WHEN i = 105 THEN NULL ELSE 1980 + i % 30 END AS INTEGER) AS year,
       CASE WHEN i % 7 = 0 THEN NULL ELSE 'Drama|Comedy' END AS genres
FROM range(101, 122) AS items(i);

CREATE TEMP TABLE split_events AS
SELECT *,
       CASE WHEN pos > 0.9 * n THEN 'test' WHEN pos > 0.8 * n THEN 'valid' ELSE 'train' END
           AS split
FROM (
    SELECT *, row_number() OVER (ORDER BY ts, user_id, item_id) AS pos, count(*) OVER () AS n
    FROM raw.interactions
);

CREATE TABLE dim_users AS
SELECT CAST(row_number() OVER (ORDER BY u.user_id) AS INTEGER) AS user_idx,
       u.user_id, u.gender, u.age, u.occupation,
       CAST(CASE u.gender WHEN 'M' THEN 1 WHEN 'F' THEN 2 ELSE 0 END AS INTEGER) AS gender_idx,
       CAST(coalesce(u.age // 10, 0) AS INTEGER) AS age_idx,
       CAST(coalesce(length(u.occupation), 0) AS INTEGER) AS occupation_idx,
       CAST(t.n AS INTEGER) AS n_train_events
FROM (SELECT user_id, count(*) AS n FROM split_events WHERE split = 'train' GROUP BY 1) AS t
JOIN raw.users AS u USING (user_id);

CREATE TABLE dim_items AS
SELECT CAST(row_number() OVER (ORDER BY i.item_id) AS INTEGER) AS item_idx,
       i.item_id, i.title, i.year, i.genres,
       CAST(CASE WHEN i.genres IS NULL THEN 0 ELSE 1 END AS INTEGER) AS genre_idx,
       CAST(coalesce(i.year // 10 - 197, 0) AS INTEGER) AS year_idx,
       CAST(t.n AS INTEGER) AS n_train_events
FROM (SELECT item_id, count(*) AS n FROM split_events WHERE split = 'train' GROUP BY 1) AS t
JOIN raw.items AS i USING (item_id);

CREATE TABLE fct_ratings AS
SELECT CAST(s.pos AS BIGINT) AS event_id, s.user_id, s.item_id,
       coalesce(du.user_idx, 0) AS user_idx, coalesce(di.item_idx, 0) AS item_idx,
       s.rating, s.ts, s.split
FROM split_events AS s
LEFT JOIN dim_users AS du USING (user_id)
LEFT JOIN dim_items AS di USING (item_id);

CREATE TABLE fct_ctr_samples AS
WITH base AS (
    SELECT f.*, coalesce(du.gender_idx, 0) AS gender_idx, coalesce(du.age_idx, 0) AS age_idx,
           coalesce(du.occupation_idx, 0) AS occupation_idx,
           coalesce(di.genre_idx, 0) AS genre_idx, coalesce(di.year_idx, 0) AS year_idx,
           CAST(coalesce(du.n_train_events, 0) + f.user_idx % 3 AS DOUBLE) AS user_activity,
           CAST(coalesce(di.n_train_events, 0) AS DOUBLE) AS item_popularity,
           CAST(coalesce(di.year, 1995) AS DOUBLE) AS item_year,
           list_filter(
               coalesce(list(f.item_idx) OVER (
                   PARTITION BY f.user_id ORDER BY f.ts
                   ROWS BETWEEN 50 PRECEDING AND 1 PRECEDING), []),
               lambda x: x > 0) AS history_item_idx
    FROM fct_ratings AS f
    LEFT JOIN dim_users AS du USING (user_idx)
    LEFT JOIN dim_items AS di USING (item_idx)
)
SELECT event_id, split, ts,
       CAST(rating >= 4.0 AS INTEGER) AS label_like,
       CAST(rating >= 4.5 AS INTEGER) AS label_love,
       user_idx, item_idx, gender_idx, age_idx, occupation_idx, genre_idx, year_idx,
       CAST(hour(to_timestamp(ts)) + 1 AS INTEGER) AS hour_idx,
       CAST(isodow(to_timestamp(ts)) AS INTEGER) AS weekday_idx,
       (user_activity - avg(user_activity) OVER ())
           / stddev_pop(user_activity) OVER () AS dense_user_activity,
       (item_popularity - avg(item_popularity) OVER ())
           / stddev_pop(item_popularity) OVER () AS dense_item_popularity,
       (item_year - avg(item_year) OVER ()) / stddev_pop(item_year) OVER () AS dense_item_age,
       CAST(history_item_idx AS INTEGER[]) AS history_item_idx,
       CAST(len(history_item_idx) AS INTEGER) AS history_len
FROM base;

CREATE TABLE user_stats AS
SELECT user_idx, user_id, count(*) AS n_ratings, avg(rating) AS mean_rating,
       avg(CAST(rating >= 4.0 AS DOUBLE)) AS like_rate, min(ts) AS first_ts, max(ts) AS last_ts
FROM fct_ratings WHERE split = 'train' GROUP BY ALL;

CREATE TABLE item_stats AS
SELECT item_idx, item_id, count(*) AS n_ratings, avg(rating) AS mean_rating,
       avg(CAST(rating >= 4.0 AS DOUBLE)) AS like_rate,
       row_number() OVER (ORDER BY count(*) DESC, item_id) AS popularity_rank
FROM fct_ratings WHERE split = 'train' GROUP BY item_idx, item_id;
"""


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contracts") / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(WAREHOUSE_SQL)
    return path


@pytest.fixture
def con(warehouse: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection inside a transaction that is rolled back: tests break tables freely."""
    connection = duckdb.connect(str(warehouse))
    connection.begin()
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()


def failing(result: ContractResult, expectation: str, column: str | None) -> ExpectationOutcome:
    matches = [o for o in result.failed() if (o.expectation, o.column) == (expectation, column)]
    assert matches, f"{expectation} on {column} did not fail:\n{result.to_markdown()}"
    return matches[0]


# --- the suites themselves --------------------------------------------------------------


def test_every_table_has_a_suite() -> None:
    assert list_suites() == sorted(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_suite_file_is_a_canonical_gx_suite(name: str) -> None:
    import great_expectations as gx

    suite = load_suite(name)
    # Written in GX's own format: loading and re-serialising changes nothing.
    assert gx.ExpectationSuite(**suite).to_json_dict() == suite
    assert suite["name"] == name
    assert suite["meta"]["asset"] == name


@pytest.mark.parametrize("name", SUITES)
def test_suite_sql_is_valid_on_the_good_warehouse(con: duckdb.DuckDBPyConnection, name: str) -> None:
    meta = load_suite(name)["meta"]
    derived = [f"{sql} AS {alias}" for alias, sql in meta.get("derived", {}).items()]
    con.execute(f"SELECT {', '.join(meta['columns'] + derived)} FROM {meta['relation']}")
    for sql in meta.get("parameters", {}).values():
        assert con.execute(sql).fetchone()[0] > 0


# --- a good warehouse passes ------------------------------------------------------------


@pytest.mark.parametrize("name", SUITES)
def test_good_warehouse_passes(con: duckdb.DuckDBPyConnection, name: str) -> None:
    result = run_suite(con, name)
    assert result.success, result.to_markdown()
    assert result.n_rows > 0
    assert len(result.outcomes) == len(load_suite(name)["expectations"])


# --- each kind of breakage fails the right expectation ---------------------------------

BREAKAGES = {
    "null key": (
        "UPDATE fct_ratings SET user_idx = NULL WHERE event_id = 7",
        "fct_ratings",
        "expect_column_values_to_not_be_null",
        "user_idx",
        None,
    ),
    "rating out of range": (
        "UPDATE raw.interactions SET rating = 7.5 WHERE user_id = 2 AND source_row = 16",
        "raw_interactions",
        "expect_column_values_to_be_between",
        "rating",
        7.5,
    ),
    "duplicate id": (
        "UPDATE raw.users SET user_id = 2 WHERE user_id = 1",
        "raw_users",
        "expect_column_values_to_be_unique",
        "user_id",
        2,
    ),
    "duplicate interaction": (
        "INSERT INTO raw.interactions SELECT * FROM raw.interactions WHERE source_row = 1",
        "raw_interactions",
        "expect_compound_columns_to_be_unique",
        "user_id,item_id,ts",
        {"user_id": 1, "item_id": 106, "ts": 1000003600},
    ),
    "bad split value": (
        "UPDATE fct_ratings SET split = 'holdout' WHERE event_id = 3",
        "fct_ratings",
        "expect_column_values_to_be_in_set",
        "split",
        "holdout",
    ),
    "love without like": (
        "UPDATE fct_ctr_samples SET label_like = 0, label_love = 1 WHERE event_id = 5",
        "fct_ctr_samples",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "label_like,label_love",
        [0, 1],
    ),
    "dense feature not finite": (
        "UPDATE fct_ctr_samples SET dense_item_age = 'inf' WHERE event_id = 9",
        "fct_ctr_samples",
        "expect_column_values_to_be_between",
        "dense_item_age",
        math.inf,
    ),
    "hour out of range": (
        "UPDATE fct_ctr_samples SET hour_idx = 0 WHERE event_id = 9",
        "fct_ctr_samples",
        "expect_column_values_to_be_between",
        "hour_idx",
        0,
    ),
    "history length disagrees": (
        "UPDATE fct_ctr_samples SET history_len = history_len + 1 WHERE event_id = 100",
        "fct_ctr_samples",
        "expect_column_pair_values_to_be_equal",
        "history_len_check,history_len",
        None,
    ),
    "dim index gap": (
        "UPDATE dim_users SET user_idx = 99 WHERE user_idx = 12",
        "dim_users",
        "expect_column_values_to_be_between",
        "user_idx",
        99,
    ),
    "last before first": (
        "UPDATE user_stats SET first_ts = last_ts + 1 WHERE user_idx = 2",
        "user_stats",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "last_ts,first_ts",
        None,
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_breakage_fails_with_sample(con: duckdb.DuckDBPyConnection, breakage: str) -> None:
    sql, suite, expectation, column, bad_value = BREAKAGES[breakage]
    con.execute(sql)
    result = run_suite(con, suite)
    assert not result.success
    outcome = failing(result, expectation, column)
    assert outcome.unexpected_count and outcome.unexpected_count >= 1
    assert outcome.sample_bad_values, outcome
    if bad_value is not None:
        assert bad_value in outcome.sample_bad_values
    # The failing rows are identified by the suite's key columns.
    key = load_suite(suite)["meta"]["key"]
    assert outcome.sample_bad_rows and set(key) <= outcome.sample_bad_rows[0].keys()
    assert expectation in result.to_markdown()


def test_null_is_reported_with_the_row_key(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE fct_ratings SET user_idx = NULL WHERE event_id = 7")
    outcome = failing(run_suite(con, "fct_ratings"), "expect_column_values_to_not_be_null", "user_idx")
    assert outcome.sample_bad_values == [None]
    assert outcome.sample_bad_rows == [{"event_id": 7, "user_idx": None}]


def test_split_fraction_bounds(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE fct_ratings SET split = 'train' WHERE split = 'test'")
    outcome = failing(run_suite(con, "fct_ratings"), "expect_column_mean_to_be_between", "is_test")
    assert outcome.observed == 0.0


def test_label_rate_of_one_fails(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE fct_ctr_samples SET label_like = 1")
    result = run_suite(con, "fct_ctr_samples")
    assert failing(result, "expect_column_mean_to_be_between", "label_like").observed == 1.0


def test_row_count_must_match_raw(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DELETE FROM raw.interactions WHERE source_row = 1")
    for suite in ("fct_ratings", "fct_ctr_samples"):
        outcome = failing(run_suite(con, suite), "expect_table_row_count_to_equal", None)
        assert outcome.observed == 180
        assert outcome.kwargs["value"] == 179


def test_min_rows_comes_from_the_caller(con: duckdb.DuckDBPyConnection) -> None:
    assert run_suite(con, "raw_interactions", {"min_rows": 180}).success
    result = run_suite(con, "raw_interactions", {"min_rows": 181, "unused_elsewhere": 1})
    outcome = failing(result, "expect_table_row_count_to_be_between", None)
    assert (outcome.observed, outcome.kwargs["min_value"]) == (180, 181)


def test_caller_overrides_sql_parameters(con: duckdb.DuckDBPyConnection) -> None:
    result = run_suite(con, "fct_ratings", {"expected_rows": 5})
    assert failing(result, "expect_table_row_count_to_equal", None).kwargs["value"] == 5


# --- schema drift and errors ------------------------------------------------------------


def test_missing_column_fails_its_expectations(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE dim_items DROP COLUMN genre_idx")
    result = run_suite(con, "dim_items")
    failing(result, "expect_column_to_exist", "genre_idx")
    # Expectations that cannot evaluate count as failed, with GX's error as observed.
    errored = failing(result, "expect_column_values_to_not_be_null", "genre_idx")
    assert "genre_idx" in str(errored.observed)
    assert all(o.success for o in result.outcomes if o.column != "genre_idx")


def test_unbindable_derived_column_fails(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE fct_ctr_samples DROP COLUMN history_item_idx")
    result = run_suite(con, "fct_ctr_samples")
    outcome = failing(result, "derived_column_is_computable", "history_len_check")
    assert "history_item_idx" in str(outcome.observed)


def test_missing_relation_names_the_asset(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DROP TABLE user_stats")
    with pytest.raises(MissingRelationError, match=r"main\.user_stats .*`user_stats`"):
        run_suite(con, "user_stats")


def test_missing_upstream_of_a_parameter_names_its_asset(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute("DROP TABLE raw.interactions")
    with pytest.raises(MissingRelationError, match=r"raw\.interactions .*`raw_interactions`"):
        run_suite(con, "fct_ratings")


def test_bad_suite_files_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, con: duckdb.DuckDBPyConnection
) -> None:
    monkeypatch.setattr(runner, "SUITES_DIR", tmp_path)
    with pytest.raises(ContractError, match="nope.json does not exist"):
        load_suite("nope")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ContractError, match="broken.json is not valid JSON"):
        load_suite("broken")
    suite = {
        "name": "unfilled",
        "expectations": [
            {
                "type": "expect_table_row_count_to_equal",
                "kwargs": {"value": {"$PARAMETER": "n"}},
            }
        ],
        "meta": {"relation": "main.fct_ratings", "columns": ["event_id"]},
    }
    (tmp_path / "unfilled.json").write_text(json.dumps(suite))
    with pytest.raises(ContractError, match="needs parameter"):
        run_suite(con, "unfilled")
    assert run_suite(con, "unfilled", {"n": 180}).success


def test_markdown_is_a_compact_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE raw.items SET genres = '' WHERE item_id = 102")
    markdown = run_suite(con, "raw_items").to_markdown()
    assert markdown.startswith("**raw_items** on `raw.items` FAILED")
    header = "| | expectation | column | observed | sample bad values |"
    assert header in markdown
    fail_row = markdown.splitlines()[4]
    assert fail_row.startswith("| FAIL | expect_column_value_lengths_to_be_between | genres |")


def test_large_tables_are_sampled_but_counted_in_full(con: duckdb.DuckDBPyConnection) -> None:
    """Above max_rows GX sees a sample; row counts still come from the whole table."""
    result = run_suite(con, "fct_ratings", max_rows=50)
    assert result.success and result.n_rows == 180 and result.sampled_rows == 50
    assert "sample of 50" in result.to_markdown()
    con.execute("DELETE FROM raw.interactions WHERE source_row = 1")
    outcome = failing(run_suite(con, "fct_ratings", max_rows=50), "expect_table_row_count_to_equal", None)
    assert (outcome.observed, outcome.kwargs["value"]) == (180, 179)


def test_sampled_run_still_catches_a_broken_column(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE fct_ratings SET rating = 9")
    result = run_suite(con, "fct_ratings", max_rows=50)
    assert failing(result, "expect_column_values_to_be_between", "rating").unexpected_count == 50


def test_unbuilt_upstream_of_a_parameter_is_skipped_on_request(con: duckdb.DuckDBPyConnection) -> None:
    # A partial build on a fresh warehouse: dim_users exists, fct_ratings does not yet.
    con.execute("DROP TABLE fct_ctr_samples")
    con.execute("DROP TABLE fct_ratings")
    with pytest.raises(MissingRelationError, match=r"main\.fct_ratings"):
        run_suite(con, "dim_users")
    result = run_suite(con, "dim_users", skip_unbuilt_upstream=True)
    assert result.success
    assert result.skipped and all("needs main.fct_ratings" in s for s in result.skipped)
    assert "expect_table_row_count_to_equal" in " ".join(result.skipped)
    assert "Not run, upstream not built yet" in result.to_markdown()
    assert run_suite(con, "dim_items", skip_unbuilt_upstream=True).success


def test_contract_bounds_follow_the_split_dbt_built() -> None:
    from orchestration.assets.contracts import contract_parameters
    from pipeline.settings import load_settings

    settings = load_settings({"RECSYS_SPLIT": "temporal"})
    built = {
        "split": "leave_last_out",
        "valid_frac": 0.1,
        "test_frac": 0.1,
        "split_seed": 42,
        "history_len": 20,
    }
    params = contract_parameters(settings, built)
    assert "min_holdout_frac" not in params and params["history_len"] == 20
    temporal = contract_parameters(settings, {**built, "split": "temporal", "test_frac": 0.2})
    assert temporal["min_holdout_frac"] == pytest.approx(0.05)
    assert temporal["max_holdout_frac"] == pytest.approx(0.45)
    assert "min_holdout_frac" not in contract_parameters(settings)  # not built: the suites' own bounds
