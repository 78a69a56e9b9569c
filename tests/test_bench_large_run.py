"""benchmarks/bench_large_run.py: how --lanes shares the groups out, and whose memory a step's
peak RSS reads when two runs overlap."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_large_run as bench  # noqa: E402


def test_one_lane_runs_every_group_in_the_order_asked_with_embedding_after_mf():
    assert bench.plan_lanes(["embedding", "cf", "mf", "ctr"], 1) == [["cf", "mf", "embedding", "ctr"]]


def test_two_lanes_balance_the_measured_minutes_and_keep_embedding_with_mf():
    plan = bench.plan_lanes(list(bench.GROUPS), 2)
    assert len(plan) == 2
    assert sorted(g for lane in plan for g in lane) == sorted(bench.GROUPS)
    mf_lane = next(lane for lane in plan if "mf" in lane)
    assert mf_lane.index("embedding") > mf_lane.index("mf")
    loads = [sum(bench.GROUP_MINUTES[g] for g in lane) for lane in plan]
    # longest first onto the least loaded lane: no move of one unit evens them out further
    assert max(loads) - min(loads) <= min(bench.GROUP_MINUTES.values())


def test_more_lanes_than_groups_gives_one_lane_per_group():
    assert bench.plan_lanes(["ctr", "sequence"], 4) == [["ctr"], ["sequence"]]
    assert bench.plan_lanes(["embedding"], 2) == [["embedding"]]


def test_a_steps_peak_reads_only_its_own_runs_samples():
    step = bench.Step("run", start=100.0, end=200.0, status="ok")
    samples = [(150.0, 3 * 2**30, "mf"), (150.2, 5 * 2**30, "ctr"), (250.0, 9 * 2**30, "mf")]
    assert bench._peak_gib(samples, step, "mf") == "3.00"
    assert bench._peak_gib(samples, step, "ctr") == "5.00"
    assert bench._peak_gib(samples, step, "sequence") == "-"


def test_lanes_below_one_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_large_run.py", "--home", str(tmp_path), "--lanes", "0"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2
    assert "--lanes must be at least 1" in capsys.readouterr().err


def test_lanes_let_that_many_model_steps_train_at_once_on_the_homes_instance(tmp_path):
    """The project's instance runs one step per pool at a time across runs: the lanes raise the
    training pool to their count on the benchmark's own instance, and one lane sets it back."""
    import dagster as dg

    from orchestration.assets.families import TRAINING_POOL

    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for slots in (2, 1):
        bench._training_slots(tmp_path, slots)
        with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
            assert instance.event_log_storage.get_concurrency_info(TRAINING_POOL).slot_count == slots
