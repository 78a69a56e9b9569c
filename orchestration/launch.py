"""``recsys run``: launch the selected assets through Dagster's Python API on the persistent
instance, print one line per step, and keep the full event log in a file."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from pipeline.settings import REPO_ROOT, SettingsError

# -- `recsys run`: Dagster's Python API, one line per finished step -----------------------------

DEFINITIONS = "orchestration.definitions"
LAUNCH_TAG = "recsys/launch"  # finds the run execute_job creates, from the progress thread
# The job's console logger prints every event (DEBUG included) on stderr; the same events
# go to the run's log file (read back from the instance), so the console one is silenced.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
FINISHED = {"STEP_SUCCESS": "ok", "STEP_FAILURE": "failed", "STEP_SKIPPED": "skipped"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # dbt colours its errors
STACK_LINES = 6  # of a failing step's stack (and of its cause's), printed on the terminal
MESSAGE_LINES = 24  # of its message (dbt's errors quote every failed model and test)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _log_line(entry) -> str:
    """One event as Dagster's console logger would print it, plus its error and metadata."""
    import logging
    from datetime import datetime

    event = entry.dagster_event
    stamp = datetime.fromtimestamp(entry.timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f %z")
    fields = [stamp, logging.getLevelName(entry.level), entry.job_name, entry.run_id, entry.step_key or "-"]
    if event is not None:
        fields += [str(event.pid) if event.pid is not None else "-", event.event_type.name]
    line = " - ".join([*fields, entry.message or ""])
    extra: list[str] = []
    data = event.event_specific_data if event is not None else None
    error = getattr(data, "error", None) or entry.error_info
    if error is not None and hasattr(error, "to_string"):
        extra.append(error.to_string().rstrip())
    for holder in (getattr(data, "materialization", None), data if event is not None and
                   event.event_type.name == "ASSET_CHECK_EVALUATION" else None):  # fmt: skip
        for key, value in (getattr(holder, "metadata", None) or {}).items():
            extra.append(f"{key}: {getattr(value, 'value', value)}")
    return line + "".join("\n    " + part.replace("\n", "\n    ") for part in extra) + "\n"


def _error_tail(error, indent: str = "  ") -> list[str]:
    """The message and the last lines of the stack of an error and of each of its causes."""
    lines: list[str] = []
    while error is not None:
        message = [part for part in (error.message or "").rstrip().splitlines() if part.strip()]
        lines += [indent + part for part in message[:MESSAGE_LINES]]
        if len(message) > MESSAGE_LINES:
            lines.append(f"{indent}... {len(message) - MESSAGE_LINES} more lines in the log")
        stack = "".join(error.stack or []).rstrip().splitlines()
        if stack:
            lines.append(f"{indent}  ... last {min(len(stack), STACK_LINES)} lines of its stack:")
            lines += [f"{indent}  {part}" for part in stack[-STACK_LINES:]]
        error = error.cause
        if error is not None:
            lines.append(f"{indent}caused by:")
    return [ANSI.sub("", line) for line in lines]


def _check_failure_lines(evaluation) -> list[str]:
    """What a failed check reports: the contract's failed expectations, or its description."""
    metadata = {key: getattr(value, "value", value) for key, value in (evaluation.metadata or {}).items()}
    failed = metadata.get("failed")
    if isinstance(failed, list) and failed:
        lines = [
            f"    {row.get('expectation')}"
            + (f" on {row['column']}" if row.get("column") else "")
            + f": observed {row.get('observed')}"
            for row in failed[:5]
            if isinstance(row, dict)
        ]
        return lines + ([f"    ... and {len(failed) - 5} more"] if len(failed) > 5 else [])
    if evaluation.description:
        return [f"    {evaluation.description}"]
    return [
        f"    {key}: {value}"
        for key, value in list(metadata.items())[:6]
        if not isinstance(value, (dict, list))
    ]


class _Progress:
    """Follows a run in the instance's event log: writes every event to the run's log file and
    prints one line per finished step. Runs in a thread beside ``execute_job``."""

    def __init__(self, dagster_home: str, logs: Path, token: str, started: float, out: TextIO) -> None:
        import threading

        self.dagster_home, self.logs, self.token, self.started = dagster_home, logs, token, started
        self.stop = threading.Event()
        self.run_id: str | None = None
        self.log_path: Path | None = None
        self.total = 0
        self.finished: dict[str, str] = {}
        self.start_times: dict[str, float] = {}
        self.reused: set[str] = set()
        self.failures: dict[str, object] = {}  # step -> SerializableErrorInfo
        self.failed_checks: list[tuple[str, str, object]] = []  # (asset, check, evaluation)
        self.run_failure: str | None = None
        self.status: str | None = None
        self.problem: BaseException | None = None
        self.out = out  # the terminal, while the steps' own output goes to the log
        self.thread = threading.Thread(target=self._follow, name="recsys-progress", daemon=True)

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)

    def _follow(self) -> None:
        import dagster as dg

        try:
            with dg.DagsterInstance.from_config(self.dagster_home) as instance:
                while self.run_id is None:
                    runs = instance.get_runs(filters=dg.RunsFilter(tags={LAUNCH_TAG: self.token}), limit=1)
                    if runs:
                        self._begin(instance, runs[0])
                    elif self.stop.wait(0.2):
                        return
                cursor = None
                with self.log_path.open("a", encoding="utf-8") as log:
                    while True:
                        stopping = self.stop.is_set()  # read everything once more after the run ends
                        connection = instance.get_records_for_run(self.run_id, cursor=cursor, limit=500)
                        for record in connection.records:
                            log.write(_log_line(record.event_log_entry))
                            self._on(record.event_log_entry)
                        log.flush()
                        cursor = connection.cursor
                        if connection.has_more:
                            continue
                        if stopping:
                            break
                        self.stop.wait(0.3)
                run = instance.get_run_by_id(self.run_id)
                self.status = run.status.value if run is not None else None
        except BaseException as exc:  # shown by the caller: progress must not hide the run's outcome
            self.problem = exc

    def _begin(self, instance, run) -> None:
        self.run_id = run.run_id
        snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        self.total = len(snapshot.steps) if snapshot is not None else 0
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logs / f"run-{run.run_id}.log"
        self.say(f"recsys run: run {run.run_id}, {self.total} step{'' if self.total == 1 else 's'}")
        self.say(f"full Dagster log: {self.log_path}")

    def _on(self, entry) -> None:
        event = entry.dagster_event
        if event is None:
            return
        kind, step = event.event_type.name, entry.step_key
        data = event.event_specific_data
        if kind == "STEP_START" and step:
            self.start_times[step] = entry.timestamp
            width = 2 * len(str(self.total)) + 3
            self.say(f"{'':>{width}} {_clock(entry.timestamp - self.started):>7}  {'start':<7}  {step}")
        elif kind == "ASSET_MATERIALIZATION" and step:
            reused = (data.materialization.metadata or {}).get("reused")
            if getattr(reused, "value", reused) is True:
                self.reused.add(step)
        elif kind == "ASSET_CHECK_EVALUATION" and not data.passed and data.blocking:
            self.failed_checks.append((data.asset_key.to_user_string(), data.check_name, data))
        elif kind == "RUN_FAILURE":
            self.run_failure = entry.message
        elif kind in FINISHED and step:
            outcome = FINISHED[kind]
            if kind == "STEP_SUCCESS" and step in self.reused:
                outcome = "reused"
            if kind == "STEP_FAILURE":
                self.failures[step] = data.error
            self.finished[step] = outcome
            self._line(step, outcome, entry.timestamp)

    def _line(self, step: str, outcome: str, when: float) -> None:
        width = len(str(self.total))
        took = when - self.start_times[step] if step in self.start_times else None
        running = [s for s in self.start_times if s not in self.finished]
        line = (
            f"[{len(self.finished):>{width}}/{self.total}] {_clock(when - self.started):>7}  {outcome:<7}  "
            f"{step:<32} {f'{took:.1f}s' if took is not None else '':>8}"
        )
        if running:
            line += "   running: " + ", ".join(running)
        self.say(line)

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def report(self, success: bool, elapsed: float) -> None:
        counts = {name: sum(1 for o in self.finished.values() if o == name)
                  for name in ("ok", "reused", "failed", "skipped")}  # fmt: skip
        not_run = max(self.total - len(self.finished), 0)
        for asset, check, evaluation in self.failed_checks:
            print(f"\nblocking check failed: '{check}' on asset {asset}", flush=True)
            for line in _check_failure_lines(evaluation):
                print(line, flush=True)
        for step, error in self.failures.items():
            print(f"\nstep {step} failed:", flush=True)
            for line in _error_tail(error):
                print(line, flush=True)
        if not success and not self.failures and self.run_failure:
            print(f"\nrun failed: {self.run_failure}", flush=True)
        if not_run:
            why = "downstream of the failure" if not success else "not executed"
            print(f"\n{not_run} step(s) {why} were not run", flush=True)
        totals = ", ".join(f"{n} {name}" for name, n in counts.items())
        outcome = "succeeded" if success else "FAILED"
        print(
            f"\nrecsys run {outcome} in {_clock(elapsed)}: {len(self.finished)}/{self.total} steps finished "
            f"({totals}{f', {not_run} not run' if not_run else ''})",
            flush=True,
        )
        if self.log_path is not None:
            print(f"full Dagster log: {self.log_path}", flush=True)


@contextlib.contextmanager
def _redirected(path: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so also what dbt, the
    steps and their child processes print) to ``path``; yields a stream on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
    with path.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


def _append_output(output: Path, log_path: Path | None) -> None:
    """What the steps printed (dbt's console output, warnings) goes after the events in the log."""
    if not output.exists():
        return
    text = output.read_text(encoding="utf-8", errors="replace")
    if log_path is None:  # no run was created: whatever was printed belongs on the terminal
        sys.stderr.write(text)
    elif text:
        with log_path.open("a", encoding="utf-8") as log:
            log.write("\n==== what the steps printed (stdout and stderr) ====\n" + text)
    output.unlink()


def with_fitted_upstream(instance, keys: set) -> list[str]:
    """Add to ``keys`` the upstream model of every selected family that builds on another
    (emb_knn on mf_implicit's embeddings) when that model is not selected and its latest
    materialisation was not fitted on the snapshot this run uses, and what that one needs in
    turn. Returns one line per addition saying why.

    Dagster hands an unselected asset's latest value to its children, so ``--select
    'model_wals*'`` after new data would give emb_knn a model fitted on the previous snapshot
    (its step refuses it). Adding the model is what a consistent run needs, and costs nothing
    when it is up to date: it is only added when stale, and then trained or reused."""
    import dagster as dg

    from models.catalogue import FAMILIES
    from orchestration.assets.families import read_upstream, upstream_not_fitted_on

    snapshot_key = dg.AssetKey("training_snapshot")
    snapshot = None
    if snapshot_key not in keys:  # else rebuilt in this run: which one is not known yet
        event = instance.get_latest_materialization_event(snapshot_key)
        path = event.asset_materialization.metadata.get("snapshot_dir") if event is not None else None
        if path is None:
            return []  # the run fails on the missing snapshot, whatever else it has
        snapshot = str(path.value)
    lines, pending = [], sorted(keys)
    while pending:
        name = pending.pop().to_user_string()
        family = FAMILIES.get(name.removeprefix("model_")) if name.startswith("model_") else None
        if family is None or not family.upstream:
            continue
        if snapshot is None:
            why = {f"model_{up}": "training_snapshot is rebuilt in this run (it is reused if "
                   "already fitted on the same inputs)" for up in read_upstream(family)}  # fmt: skip
        else:
            why = upstream_not_fitted_on(instance, family, snapshot)
        for upstream, reason in why.items():
            key = dg.AssetKey(upstream)
            if key not in keys:
                keys.add(key)
                pending.append(key)
                lines.append(f"recsys run: also running {upstream}: {name} builds on it and {reason}")
    return lines


def run(select: str, env: dict[str, str]) -> int:
    """Materialise the selected assets through ``execute_job`` on the persistent instance at
    ``$DAGSTER_HOME``: the run is recorded there (the UI shows it), the code location's executor
    and the instance's pools apply. The terminal gets one line per step; the full event log
    goes to ``$RECSYS_HOME/logs/run-<run_id>.log``."""
    import time
    import uuid
    import warnings

    os.environ.update(env)  # the code location reads its settings from the environment at import
    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    for category in (dg.BetaWarning, dg.PreviewWarning, dg.SupersessionWarning):
        warnings.filterwarnings("ignore", category=category)
    repo = ReconstructableRepository.for_module(DEFINITIONS, "defs", working_directory=str(REPO_ROOT))
    try:
        definition = repo.get_definition()
        selection = dg.AssetSelection.from_coercible(select.split(","))
        asked = selection.resolve(definition.asset_graph)
        # a multi-asset that cannot be subset runs whole: 'raw_interactions' brings raw_users/_items
        keys = set(selection.required_multi_asset_neighbors().resolve(definition.asset_graph))
        job = definition.get_implicit_job_def_for_assets(keys)
    except SettingsError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 2
    except dg.DagsterError as exc:
        print(f"recsys run: --select {select!r}: {exc}", file=sys.stderr)
        return 2
    if not keys or job is None:
        print(f"recsys run: --select {select!r} selects no asset", file=sys.stderr)
        return 2
    if keys != asked:
        extra = ", ".join(sorted(key.to_user_string() for key in keys - asked))
        print(f"recsys run: also selected {extra} (built together with the selection)", flush=True)
    started = time.time()
    token = uuid.uuid4().hex
    logs = Path(env["RECSYS_HOME"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    output = logs / f".output-{token}.txt"
    result = refused = None
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for line in with_fitted_upstream(instance, keys):
            print(line, flush=True)
        job = definition.get_implicit_job_def_for_assets(keys)
        with (
            _redirected(output) as terminal,
            _Progress(env["DAGSTER_HOME"], logs, token, started, out=terminal) as progress,
        ):
            try:
                result = dg.execute_job(
                    repo.get_reconstructable_job(job.name),
                    instance=instance,
                    run_config=QUIET_CONSOLE,
                    tags={LAUNCH_TAG: token, "recsys/select": select},
                    asset_selection=sorted(keys),
                )
            except dg.DagsterInvalidSubsetError as exc:  # raised before a run is created
                refused = exc
    _append_output(output, progress.log_path)
    if refused is not None or result is None:
        print(f"recsys run: --select {select!r}: {refused}", file=sys.stderr)
        return 2
    if progress.problem is not None:
        print(f"recsys run: could not follow the run's progress: {progress.problem!r}", file=sys.stderr)
    progress.report(result.success, time.time() - started)
    return 0 if result.success else 1


