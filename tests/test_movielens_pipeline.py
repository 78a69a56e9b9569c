"""MovieLens-format input through the whole graph, every family included, with no special
case: ml-1m layout files written by the test, the per-user split the README recommends."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from movielens_fixtures import toy, write_ml1m

from models.catalogue import FAMILIES

# Every family runs; the gradient-trained ones for a few epochs, since this test is about the
# layout reaching every family, not about how well each one learns.
SHORT = {"mf_sgd": 3, "mf_implicit": 3, "gmf": 3, "ncf_mlp": 3, "cdae": 3, "deepfm": 2, "wide_deep": 2,
         "dlrm": 2, "dcn_stacked": 2, "dcn_parallel": 2, "din": 2, "bst": 2, "mmoe": 2}  # fmt: skip


@pytest.mark.slow
def test_movielens_layout_runs_every_family_end_to_end(recsys_home, dagster_home, monkeypatch, tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", toy(n_users=300, n_items=400, per_user=40, seed=5))
    monkeypatch.setenv("RECSYS_SPLIT", "leave_last_out")
    config = tmp_path / "models.toml"
    config.write_text("".join(f"[{name}]\nepochs = {n}\n" for name, n in SHORT.items())
                      + "[neumf]\nepochs = 2\npretrain_epochs = 3\n[wals]\niterations = 4\n")  # fmt: skip
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(config))
    from orchestration.definitions import defs

    result = defs.resolve_job_def("refresh_all").execute_in_process(
        instance=dg.DagsterInstance.get(),
        raise_on_error=False,
        run_config={"ops": {"raw_tables": {"config": {"source": "movielens", "data_path": str(root)}}}},
    )
    assert result.success, [
        str(e.event_specific_data.error)[:500] for e in result.all_events if e.is_step_failure
    ]
    parity = {c.asset_key.to_user_string(): c.passed for c in result.get_asset_check_evaluations()
              if c.check_name == "parity"}  # fmt: skip
    assert parity == {f"onnx_{name}": True for name in FAMILIES}
    board = json.loads((recsys_home / "reports" / "leaderboard.json").read_text())
    assert {r["split"] for r in board["records"]} == {"leave_last_out"}
    assert set(FAMILIES) <= {r["model"] for r in board["records"]}
    # one test row per user: gAUC is undefined and therefore absent, never a made-up number
    ctr = [r for r in board["records"] if r["task"] == "ctr"]
    assert ctr and not any(r["metric"] == "gauc" for r in ctr)
