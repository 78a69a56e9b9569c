"""Real Dagster server processes for tests: ``dagster dev``, ``dagster-webserver`` and
``dagster-daemon run`` against a temporary DAGSTER_HOME / RECSYS_HOME.

Each process runs in its own session (its own process group) with default SIGINT/SIGTERM
handlers, so :meth:`DagsterProcess.stop` ends it *and* every child it spawned (code servers,
the daemon and webserver under ``dagster dev``): SIGTERM to the group, SIGKILL to whatever
is left after a grace period. A headless ``dagster dev`` started from a non-interactive shell
ignores SIGINT/SIGTERM (STACK.md), which is why the handlers are reset here.

    with dagster_dev(recsys_home, dagster_home, env={"RECSYS_FAMILIES": "wals"}) as ui:
        requests.get(ui.url)            # the webserver answers; the code location is loaded

    web = start_dagster_webserver(recsys_home, dagster_home)   # handle; web.stop() in finally
    daemon = start_dagster_daemon(recsys_home, dagster_home)   # ready once it heartbeats
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE = "orchestration.definitions"
DAGSTER_YAML = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"

# The code location must be loaded, not merely the webserver up: the UI shows nothing before.
WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


class DagsterProcessError(RuntimeError):
    """A Dagster process exited or did not become ready; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    # Runs in the child before exec: an inherited SIG_IGN would survive exec.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def dagster_env(home: Path, dagster_home: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ + ``env`` + RECSYS_HOME/DAGSTER_HOME and telemetry off; writes a dagster.yaml
    (telemetry off, one concurrency slot) into ``dagster_home`` when it has none."""
    dagster_home = Path(dagster_home).resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    full = dict(os.environ)
    full.update(env or {})
    full["RECSYS_HOME"] = str(Path(home).resolve())
    full["DAGSTER_HOME"] = str(dagster_home)
    for key, value in (("DBT_SEND_ANONYMOUS_USAGE_STATS", "false"), ("GX_ANALYTICS_ENABLED", "false"),
                       ("DO_NOT_TRACK", "1"), ("PYTHONUNBUFFERED", "1")):  # fmt: skip
        full.setdefault(key, value)
    return full


def _exe(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise DagsterProcessError(
            f"{path} does not exist: install the project into this venv (pip install -e '.[dev]')"
        )
    return str(path)


class DagsterProcess:
    """One started Dagster command. ``url`` is set for servers (dev, webserver)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path,
                 port: int | None = None) -> None:  # fmt: skip
        self.name = name
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.dagster_home = Path(env["DAGSTER_HOME"])
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_default_signals,
        )  # fmt: skip
        self.pgid = self.proc.pid  # a new session: the leader's pid is the group id

    # -- state -----------------------------------------------------------------------
    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _fail(self, what: str) -> DagsterProcessError:
        return DagsterProcessError(
            f"{self.name} ({' '.join(self.args)}) {what}; its log is {self.log_path}:\n{self.log_tail()}"
        )

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise self._fail(f"exited with code {code} before it was ready")

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 10.0) -> dict:
        """POST a GraphQL query to the webserver; returns the ``data`` object."""
        if self.url is None:
            raise DagsterProcessError(f"{self.name} serves no HTTP: it has no GraphQL endpoint")
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise DagsterProcessError(f"GraphQL errors from {self.url}: {payload['errors']}")
        return payload["data"]

    def wait_ready(self, timeout: float = 180.0) -> DagsterProcess:
        """Servers: until GraphQL answers and every code location is LOADED (a location that
        failed to load raises with its Python error). Daemon: until it has heartbeated."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = self._ready_state()
                if last == "ready":
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise self._fail(f"was not ready after {timeout:.0f} s (last state: {last})")

    def _ready_state(self) -> str:
        if self.url is None:
            return self._daemon_state()
        data = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
        if data["__typename"] != "Workspace":
            return f"workspace is {data['__typename']}"
        entries = data["locationEntries"]
        if not entries:
            return "no code location yet"
        for entry in entries:
            loaded = entry["locationOrLoadError"]
            if loaded and loaded["__typename"] == "PythonError":
                raise self._fail(f"could not load code location {entry['name']}: {loaded['message']}")
            if entry["loadStatus"] != "LOADED" or loaded is None:
                return f"code location {entry['name']} is {entry['loadStatus']}"
        return "ready"

    def _daemon_state(self) -> str:
        import dagster as dg

        with dg.DagsterInstance.from_config(str(self.dagster_home)) as instance:
            beats = instance.get_daemon_heartbeats()
        return "ready" if beats else "no daemon heartbeat yet"

    # -- stop ------------------------------------------------------------------------
    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole process group, SIGKILL to whatever is left after ``grace`` s.
        Safe to call twice."""
        try:
            if self._group_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline:
                    self.proc.poll()  # reap the leader so the group can empty
                    if not self._group_alive():
                        break
                    time.sleep(0.2)
                if self._group_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        finally:
            self._log.close()

    def __enter__(self) -> DagsterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(
    name: str,
    args: list[str],
    home: Path,
    dagster_home: Path,
    env: Mapping[str, str] | None,
    port: int | None,
    log_path: Path | None,
    timeout: float,
    wait: bool,
) -> DagsterProcess:
    full = dagster_env(home, dagster_home, env)
    log = log_path or Path(full["DAGSTER_HOME"]) / f"{name}.log"
    process = DagsterProcess(name, args, full, log, port=port)
    if wait:
        try:
            process.wait_ready(timeout)
        except BaseException:
            process.stop()
            raise
    return process


def start_dagster_dev(home: Path, dagster_home: Path, port: int | None = None,
                      env: Mapping[str, str] | None = None, *, log_path: Path | None = None,
                      timeout: float = 180.0, wait: bool = True) -> DagsterProcess:  # fmt: skip
    """``dagster dev -m orchestration.definitions`` (webserver + daemon) on 127.0.0.1:``port``
    (a free one when None); returns once the code location is loaded (``wait=False``: at once)."""
    port = port or free_port()
    args = [_exe("dagster"), "dev", "-m", MODULE, "-h", "127.0.0.1", "-p", str(port),
            "--live-data-poll-rate", "1000"]  # fmt: skip
    return _start("dagster-dev", args, home, dagster_home, env, port, log_path, timeout, wait)


def start_dagster_webserver(home: Path, dagster_home: Path, port: int | None = None,
                            env: Mapping[str, str] | None = None, *, log_path: Path | None = None,
                            timeout: float = 180.0, wait: bool = True) -> DagsterProcess:  # fmt: skip
    """``dagster-webserver -m orchestration.definitions`` alone (no daemon)."""
    port = port or free_port()
    args = [_exe("dagster-webserver"), "-m", MODULE, "-h", "127.0.0.1", "-p", str(port)]
    return _start("dagster-webserver", args, home, dagster_home, env, port, log_path, timeout, wait)


def start_dagster_daemon(home: Path, dagster_home: Path, env: Mapping[str, str] | None = None, *,
                         log_path: Path | None = None, timeout: float = 180.0,
                         wait: bool = True) -> DagsterProcess:  # fmt: skip
    """``dagster-daemon run -m orchestration.definitions``; ready once a daemon heartbeat is in
    the instance (schedules, sensors and the run queue are then being served)."""
    args = [_exe("dagster-daemon"), "run", "-m", MODULE]
    return _start("dagster-daemon", args, home, dagster_home, env, None, log_path, timeout, wait)


@contextlib.contextmanager
def dagster_dev(home: Path, dagster_home: Path, port: int | None = None,
                env: Mapping[str, str] | None = None, **kwargs) -> Iterator[DagsterProcess]:  # fmt: skip
    """``with dagster_dev(...) as ui:`` — started and ready inside, stopped (whole group) after."""
    process = start_dagster_dev(home, dagster_home, port, env, **kwargs)
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def dagster_webserver(
    home: Path, dagster_home: Path, port: int | None = None, env: Mapping[str, str] | None = None, **kwargs
) -> Iterator[DagsterProcess]:
    process = start_dagster_webserver(home, dagster_home, port, env, **kwargs)
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def dagster_daemon(home: Path, dagster_home: Path, env: Mapping[str, str] | None = None,
                   **kwargs) -> Iterator[DagsterProcess]:  # fmt: skip
    process = start_dagster_daemon(home, dagster_home, env, **kwargs)
    try:
        yield process
    finally:
        process.stop()
