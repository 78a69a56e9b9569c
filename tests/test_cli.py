"""``recsys run`` for real, as a person runs it: a fresh RECSYS_HOME, small synthetic data, a
selection that finishes quickly. The terminal gets one line per step and a verdict; the whole
Dagster event log goes to a file under RECSYS_HOME; the run is recorded in the persistent
instance at ``$RECSYS_HOME/dagster`` (what ``recsys ui`` shows)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "RECSYS_FAMILIES": "wals",
    "RECSYS_SYNTH_USERS": "100",
    "RECSYS_SYNTH_ITEMS": "400",
    "RECSYS_SYNTH_EVENTS": "5000",
    "RECSYS_MAX_CONCURRENT": "1",
}
CLEARED = ("DAGSTER_HOME", "RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_COLUMN_MAP", "RECSYS_SPLIT",
           "RECSYS_MODEL_CONFIG", "RECSYS_MIN_EVENTS")  # fmt: skip
LOG_LINE = re.compile(r"^full Dagster log: (\S+)$", re.MULTILINE)
STEP_LINE = re.compile(r"^\[\s*(\d+)/(\d+)\]\s+\d+:\d\d\s+(ok|reused|failed|skipped)\s+(\S+)", re.MULTILINE)


def _recsys_run(home: Path, select: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(
        SMALL, RECSYS_HOME=str(home), DBT_SEND_ANONYMOUS_USAGE_STATS="false", GX_ANALYTICS_ENABLED="false"
    )
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "run", "--select", select],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _log_path(out: str) -> Path:
    paths = LOG_LINE.findall(out)
    assert len(paths) == 2 and paths[0] == paths[1], (
        f"the log path is printed at the start and the end:\n{out}"
    )
    return Path(paths[0])


def _run_id(log: Path) -> str:
    match = re.fullmatch(r"run-(.+)\.log", log.name)
    assert match, log
    return match.group(1)


def _quiet(done: subprocess.CompletedProcess[str]) -> None:
    both = done.stdout + done.stderr
    for noise in ("DEBUG", "SupersessionWarning", "superseded", "dg launch", "STEP_START"):
        assert noise not in both, f"{noise!r} reached the terminal:\n{both[-3000:]}"


def test_run_prints_one_line_per_step_and_logs_every_event(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _recsys_run(home, "raw_interactions")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    _quiet(done)

    # one progress line per finished step, counted against the plan's total
    steps = STEP_LINE.findall(out)
    assert steps == [("1", "1", "ok", "raw_tables")], out
    assert re.search(r"^recsys run succeeded in \d+:\d\d: 1/1 steps finished \(1 ok", out, re.MULTILINE), out
    assert "built together with the selection" in out, "raw_users/raw_items come with raw_interactions"

    # the full event log, DEBUG included, sits under RECSYS_HOME and is named on the terminal
    log = _log_path(out)
    assert log.parent == home.resolve() / "logs" and log.is_file()
    text = log.read_text()
    run_id = _run_id(log)
    for marker in (" - DEBUG - ", "STEP_START", "ASSET_MATERIALIZATION", "STEP_SUCCESS", "RUN_SUCCESS"):
        assert marker in text, f"{marker} missing from {log}"

    # recorded in the persistent instance the UI reads, with every event in the file
    dagster_home = home / "dagster"
    assert "max_concurrent_runs" in (dagster_home / "dagster.yaml").read_text()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        events = instance.all_logs(run_id)
        typed = [e.dagster_event.event_type.name for e in events if e.dagster_event is not None]
    assert len(events) > 10
    for kind in set(typed):
        assert text.count(f" - {kind} - ") == typed.count(kind), kind
    # the summary still follows
    assert "warehouse:" in out and "raw.interactions" in out


def test_blocking_contract_failure_names_check_asset_and_skipped_steps(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _recsys_run(home, "*", RECSYS_MIN_EVENTS="100000")  # 5,000 synthetic events: too few
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    _quiet(done)
    assert "blocking check failed: 'contract' on asset raw_interactions" in out, out
    assert "expect_table_row_count_to_be_between" in out, "the failed expectation is shown"
    assert ("1", "10", "failed", "raw_tables") in STEP_LINE.findall(out), out
    assert re.search(r"^9 step\(s\) downstream of the failure were not run$", out, re.MULTILINE), out
    assert "recsys run FAILED" in out and "1 failed" in out and "9 not run" in out
    log = _log_path(out)
    assert "STEP_FAILURE" in log.read_text()
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert instance.get_run_by_id(_run_id(log)).status == dg.DagsterRunStatus.FAILURE


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_failing_step_prints_its_error_and_the_log(tmp_path: Path, case: str) -> None:
    home = tmp_path / "home"
    data = tmp_path / "nowhere" / "ratings.csv"
    if case == "malformed":
        data = tmp_path / "ratings.csv"
        data.write_bytes(b"\x00\x01garbage\xff\xfe" * 200)
    done = _recsys_run(home, "raw_interactions", RECSYS_SOURCE="files", RECSYS_DATA_PATH=str(data))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    _quiet(done)
    assert ("1", "1", "failed", "raw_tables") in STEP_LINE.findall(out), out
    error = out[out.index("step raw_tables failed:") :]
    assert str(data) in error or data.name in error, f"the error names the file:\n{error}"
    if case == "missing":
        assert "does not exist" in error
    assert "last" in error and "lines of its stack" in error
    assert error.count('File "') <= 12, "only the tail of the stack, not all of it"
    log = _log_path(out)
    assert log.is_file() and "STEP_FAILURE" in log.read_text()
