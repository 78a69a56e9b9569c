"""Materialising part of the dbt graph, as a user does from the UI: real Dagster, real dbt.

A dbt test with several parents runs only when each parent is selected or already built:
from a fresh home a subset must not run tests on marts that do not exist yet, and once
everything exists a subset still runs the tests between what it rebuilds and the rest.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest

from pipeline.dbt_selection import subset_selection

SMALL = {"RECSYS_SYNTH_USERS": "150", "RECSYS_SYNTH_ITEMS": "200", "RECSYS_SYNTH_EVENTS": "5000"}
MAIN_MARTS = ("dim_users", "dim_items", "fct_ratings", "fct_ctr_samples")
DATA_GROUPS = {"ingest", "staging", "intermediate", "marts"}
USERS_TO_STG = "relationships_dim_users_user_id__user_id__ref_stg_users_"
RATINGS_TO_DIM_USERS = "relationships_fct_ratings_user_idx__user_idx__ref_dim_users_"
RATINGS_TO_DIM_ITEMS = "relationships_fct_ratings_item_idx__item_idx__ref_dim_items_"


def _defs():
    from orchestration.definitions import defs

    return defs


def _upstream_of(*names: str) -> list[dg.AssetKey]:
    graph = _defs().get_repository_def().asset_graph
    return sorted(dg.AssetSelection.assets(*names).upstream().resolve(graph))


def _materialise(keys) -> dg.ExecuteInProcessResult:
    job = _defs().resolve_job_def("refresh_all")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(), asset_selection=list(keys), raise_on_error=False
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _checks(result) -> dict[tuple[str, str], bool]:
    return {
        (c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()
    }


def _fresh_home(tmp_path, monkeypatch, name: str):
    home = tmp_path / name
    monkeypatch.setenv("RECSYS_HOME", str(home))
    return home


def test_full_build_adds_nothing(tmp_path):
    from orchestration.assets.transforms import ensure_manifest

    manifest = json.loads(ensure_manifest().read_text())
    models = {n["name"] for n in manifest["nodes"].values() if n["resource_type"] == "model"}
    assert subset_selection(manifest, models, tmp_path / "absent.duckdb").args() == []
    only_dims = subset_selection(manifest, {"dim_users"}, tmp_path / "absent.duckdb")
    assert only_dims.indirect_selection == "cautious"
    assert only_dims.extra_tests == ()  # nothing is built: no test reaches outside the selection


@pytest.mark.slow
def test_subsets_from_a_fresh_home_and_after_a_full_build(recsys_home, dagster_home, tmp_path, monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)

    # `*dim_users` on a fresh home: dim_items' test against stg_items must not run.
    result = _materialise(_upstream_of("dim_users"))
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "dim_users" in mats and "dim_items" not in mats
    checks = _checks(result)
    assert checks[("dim_users", USERS_TO_STG)]
    assert all(checks.values()), checks

    # The four main marts on another fresh home, without user_stats / item_stats.
    _fresh_home(tmp_path, monkeypatch, "second_home")
    result = _materialise(_upstream_of(*MAIN_MARTS))
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert set(MAIN_MARTS) <= mats and not {"user_stats", "item_stats"} & mats
    checks = _checks(result)
    assert checks[("fct_ratings", RATINGS_TO_DIM_USERS)] and all(checks.values()), checks

    # Everything built: a subset still runs its tests against the marts it does not rebuild.
    graph = _defs().get_repository_def().asset_graph
    _materialise(k for k in graph.get_all_asset_keys() if graph.get(k).group_name in DATA_GROUPS)
    result = _materialise([dg.AssetKey("fct_ratings")])
    checks = _checks(result)
    assert checks[("fct_ratings", RATINGS_TO_DIM_USERS)] and checks[("fct_ratings", RATINGS_TO_DIM_ITEMS)]
    assert checks[("fct_ratings", "assert_indices_fitted_on_train")]  # reads dims and int_feature_vocab
    assert all(checks.values()), checks
    observed = {
        str(e.event_specific_data.asset_observation.metadata["unique_id"].value).rsplit(".", 1)[-1]
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
        and "unique_id" in e.event_specific_data.asset_observation.metadata
    }
    # a test that is a check of an unselected mart (user_stats) but reads fct_ratings ran too
    assert "assert_stats_match_train_counts" in observed, observed
