"""A run that overrides the split is labelled and checked as what dbt built, everywhere.

RECSYS_SPLIT says temporal; the run config of the dbt step says leave_last_out. The marts,
``mart_build_info``, the snapshot meta, the contract bounds, the lineage stamped into
``model.onnx`` and the leaderboard must all say leave_last_out.

The graph runs in a subprocess: RECSYS_FAMILIES shapes the asset graph when the definitions
are imported, and this test wants one cheap family whatever the session imported before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from export.lineage import read_onnx_lineage

FAMILY = "item_knn"
SMALL = {"RECSYS_SYNTH_USERS": "150", "RECSYS_SYNTH_ITEMS": "200", "RECSYS_SYNTH_EVENTS": "5000"}

RUN = """
import json, sys
import dagster as dg
from orchestration.definitions import defs

result = defs.resolve_job_def("refresh_all").execute_in_process(
    instance=dg.DagsterInstance.get(), raise_on_error=False,
    run_config={"ops": {"transforms": {"config": {"split": "leave_last_out"}}}},
)
contracts = {
    c.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in c.metadata.items()
                                   if k in ("split", "parameters", "skipped_expectations")}
    | {"passed": c.passed}
    for c in result.get_asset_check_evaluations() if c.check_name == "contract"
}
summary = {
    "success": result.success,
    "failures": [e.message for e in result.all_events if e.is_failure],
    "materialised": sorted({e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}),
    "contracts": contracts,
}
json.dump(summary, open(sys.argv[1], "w"), default=str)
"""


@pytest.fixture(scope="module")
def overridden_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("split_override")
    home, dagster_home = tmp / "recsys_home", tmp / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(SMALL, RECSYS_HOME=str(home), DAGSTER_HOME=str(dagster_home), RECSYS_SPLIT="temporal",
               RECSYS_FAMILIES=FAMILY)  # fmt: skip
    summary_path = tmp / "summary.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(summary_path)],
        env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0 and summary_path.exists(), done.stderr[-4000:]
    return {"home": home, **json.loads(summary_path.read_text())}


@pytest.mark.slow
def test_the_run_built_what_it_was_asked(overridden_run):
    run = overridden_run
    assert run["success"], run["failures"]
    for key in ("mart_build_info", "training_snapshot", f"model_{FAMILY}", f"onnx_{FAMILY}", "leaderboard"):
        assert key in run["materialised"]
    con = duckdb.connect(str(run["home"] / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT split, history_len FROM main.mart_build_info").fetchall() == [
            ("leave_last_out", 50)
        ]
        # leave_last_out: each user's last event is test (temporal would cut globally by time)
        per_user = con.execute(
            "SELECT bool_and(last_is_test) FROM (SELECT user_id, "
            "max(ts) FILTER (split = 'test') = max(ts) AS last_is_test FROM main.fct_ratings "
            "GROUP BY user_id HAVING count(*) >= 3)"
        ).fetchone()[0]
        assert per_user
    finally:
        con.close()


@pytest.mark.slow
def test_snapshot_meta_carries_the_build_info(overridden_run):
    metas = [json.loads(p.read_text()) for p in (overridden_run["home"] / "snapshots").glob("*/meta.json")]
    assert len(metas) == 1
    meta = metas[0]
    assert meta["split"] == "leave_last_out" and meta["history_len"] == 50
    assert meta["build_info"] == {
        "split": "leave_last_out", "valid_frac": 0.1, "test_frac": 0.1, "split_seed": 42, "history_len": 50,
    }  # fmt: skip


@pytest.mark.slow
def test_contracts_used_the_bounds_of_the_built_split(overridden_run):
    contracts = overridden_run["contracts"]
    for mart in ("fct_ratings", "fct_ctr_samples"):
        assert contracts[mart]["passed"]
        assert contracts[mart]["split"] == "leave_last_out"
        # the temporal bounds (holdout fractions near valid_frac / test_frac) were not applied
        assert "min_holdout_frac" not in contracts[mart]["parameters"]
        assert contracts[mart]["skipped_expectations"] == []


@pytest.mark.slow
def test_lineage_and_leaderboard_say_the_built_split(overridden_run):
    home = overridden_run["home"]
    onnx_files = [p for p in home.rglob("model.onnx") if FAMILY in p.parts]
    assert onnx_files, sorted(str(p) for p in home.rglob("*.onnx"))
    for path in onnx_files:
        assert read_onnx_lineage(path)["split"] == "leave_last_out"
        assert json.loads((path.parent / "lineage.json").read_text())["split"] == "leave_last_out"
    board = json.loads((home / "reports" / "leaderboard.json").read_text())
    assert board["records"] and {r["split"] for r in board["records"]} == {"leave_last_out"}
