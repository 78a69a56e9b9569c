"""benchmarks/bench_large_run.py: how --lanes shares the groups out, and whose memory a step's
peak RSS reads when two runs overlap."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_large_run as bench  # noqa: E402


def test_one_lane_runs_every_group_in_the_order_asked_with_embedding_after_mf():
    assert bench.plan_units(["embedding", "cf", "mf", "ctr"], 1) == [["cf", "mf", "embedding", "ctr"]]


def test_lanes_take_units_longest_first_with_embedding_right_after_mf():
    units = bench.plan_units(list(bench.GROUPS), 2)
    assert sorted(g for unit in units for g in unit) == sorted(bench.GROUPS)
    assert ["mf", "embedding"] in units
    minutes = [sum(bench.GROUP_MINUTES[g] for g in unit) for unit in units]
    assert minutes == sorted(minutes, reverse=True)
    assert bench.plan_units(["embedding", "ctr"], 2) == [["ctr"], ["embedding"]]  # mf not asked for


def test_two_lanes_run_side_by_side_and_the_free_one_takes_the_next_unit(monkeypatch, tmp_path):
    """The driver's lanes, with `recsys run` replaced by a recorder whose mf run lasts until ctr
    has run: the other lane takes every later unit, and the two overlap."""
    import threading

    seen, mf_running, ctr_done = [], threading.Event(), threading.Event()

    def fake_run(select, env, log, rss, label):
        seen.append((label, threading.get_ident()))
        if label == "mf":
            mf_running.set()
            assert ctr_done.wait(60), "the other lane did not take cf and ctr"
        elif label == "cf":
            assert mf_running.wait(60), "the second lane did not run beside the first"
        elif label == "ctr":
            ctr_done.set()
        return 0

    monkeypatch.setattr(bench, "_recsys_run", fake_run)
    monkeypatch.setattr(bench, "_training_slots", lambda home, slots: None)
    monkeypatch.setattr(bench, "report", lambda home: "")
    (tmp_path / "bench").mkdir()
    bench._save_state(tmp_path, {"prepared": True})
    groups = ["cf", "mf", "ctr", "embedding"]
    assert bench.drive(tmp_path, bench.SHAPE_25M, tmp_path / "m.toml", groups, 2) == 0
    lanes = {label: ident for label, ident in seen}
    assert lanes["embedding"] == lanes["mf"] != lanes["cf"] == lanes["ctr"]
    assert [label for label, _ in seen][-1] == "leaderboard"


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
