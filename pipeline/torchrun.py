"""Data-parallel training as a real child process group.

``launch`` starts ``python -m torch.distributed.run`` (torchrun) with ``--nproc-per-node N`` in a
session of its own. torchrun starts N workers of this module (``main``); each joins the group
(``models.distributed.start``: gloo on CPU, NCCL with one GPU per rank), fits the family on its
share of the snapshot (``pipeline.fitting.fit_family``, the in-process path's own function), and
rank 0 alone saves the ``TrainedModel`` into the model folder the in-process path writes.

What the step sees:
- the group's output, line by line, in its log (torchrun's ``--tee`` prefixes each worker's line
  with its rank, ``[default0]:``); every rank's output also lands under ``<run>/torchrun/logs-*``;
- a failed rank as ``TrainingProcessFailed`` naming that rank and its error and traceback, read
  from the error file torchrun's ``@record`` writes for every failed worker. When one rank dies
  the others fail too, in their next collective ("Connection closed by peer"): those are
  collateral, and the first failure that is not is reported;
- an interrupted step (a cancelled run) stops the whole group: SIGTERM to its process group, then
  SIGKILL after ``STOP_GRACE_S``.

Several hosts (configuration only, not exercised here): run the same worker under torchrun on
each host with ``--nnodes``, ``--node-rank`` and a shared ``--rdzv-endpoint``; see the README.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from common.io import atomic_write_json
from models import distributed
from models.catalogue import FAMILIES
from models.config import parse_config
from models.runtime import DeviceUnavailable, Runtime
from pipeline.fitting import UpstreamModels, fit_family
from pipeline.settings import REPO_ROOT

WORKER = "pipeline.torchrun"
# Errors of a rank that failed only because another rank died first.
COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
              "Broken pipe", "Signal 15", "SIGTERM")  # fmt: skip
STOP_GRACE_S = 30
TAIL_LINES = 40


class TrainingProcessFailed(RuntimeError):
    """A rank of a data-parallel fit failed; the message names the rank, its error and traceback."""


@dataclass(frozen=True)
class Job:
    """What every worker reads (``job.json``): the family, its parsed config as JSON, the snapshot,
    the model folder rank 0 saves into, and the runtime's device, threads and buffer."""

    family: str
    snapshot: str
    config: dict
    out: str
    device: str  # "cpu" or "cuda": rank r trains on cuda:<local rank>
    threads: int
    buffer_rows: int
    procs: int
    upstream: dict = field(default_factory=dict)  # upstream family -> its saved model dir
    precision: str = "auto"  # models.runtime.PRECISIONS


def check_devices(runtime: Runtime, variable: str = "RECSYS_TRAIN_PROCS") -> None:
    """NCCL puts one rank on each GPU: N processes on CUDA need N visible GPUs."""
    if runtime.world_size > 1 and runtime.torch_device.type == "cuda":
        if torch.cuda.device_count() < runtime.world_size:
            raise DeviceUnavailable(
                f"{variable}={runtime.world_size} on CUDA needs {runtime.world_size} GPUs (one per "
                f"process); torch sees {torch.cuda.device_count()}. Lower {variable} or train on cpu."
            )


def command(job_file: Path, procs: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "--max-restarts=0", f"--log-dir={log_dir}", "--tee=3", "-m", WORKER, str(job_file)]  # fmt: skip


def launch(job: Job, work: Path, log) -> None:
    """Run ``job`` under torchrun and wait for it; ``log.info`` gets every line of its output.

    Raises:
        TrainingProcessFailed: a rank failed (or the group died without an error file).
    """
    work.mkdir(parents=True, exist_ok=True)
    job_file = atomic_write_json(work / "job.json", asdict(job))
    log_dir = Path(tempfile.mkdtemp(dir=work, prefix="logs-"))  # one per attempt: its error files only
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(job.threads), "PYTHONPATH": path}
    cmd = command(job_file, job.procs, log_dir)
    log.info(f"{job.family}: data-parallel training on {job.procs} processes: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, cwd=REPO_ROOT, env=env,
                            start_new_session=True)  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        for line in proc.stdout:
            if line.strip():
                tail.append(line.rstrip())
                log.info(line.rstrip())
        code = proc.wait()
    except BaseException:
        stop(proc)
        raise
    if code != 0:
        raise TrainingProcessFailed(failure_message(job, code, log_dir, list(tail)))


def stop(proc: subprocess.Popen) -> None:
    """Stop the whole group (torchrun and its workers share the session ``launch`` started)."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def rank_errors(log_dir: Path) -> list[dict]:
    """Every failed rank's error file (``rank``, ``message``, ``traceback``, ``timestamp``), root
    cause first: an error that is not collateral, then the earliest."""
    found = []
    for path in log_dir.rglob("error.json"):
        try:
            doc = json.loads(path.read_text())["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        doc = doc if isinstance(doc, dict) else {"message": str(doc)}
        info = doc.get("extraInfo") or {}
        found.append({"rank": path.parent.name, "message": str(doc.get("message", "")),
                      "traceback": str(info.get("py_callstack", "")),
                      "timestamp": int(info.get("timestamp") or 0)})  # fmt: skip
    return sorted(found, key=lambda e: (any(c in e["message"] for c in COLLATERAL), e["timestamp"]))


def failure_message(job: Job, code: int, log_dir: Path, tail: list[str]) -> str:
    errors = rank_errors(log_dir)
    if not errors:
        lines = "\n".join(tail[-20:])
        return (f"{job.family}: data-parallel training on {job.procs} processes exited with code {code} "
                f"and no rank left an error file (killed, or out of memory?). Every rank's output is under "
                f"{log_dir}; the last lines:\n{lines}")  # fmt: skip
    root = errors[0]
    trace = "\n".join(root["traceback"].strip().splitlines()[-12:])
    others = [f"rank {e['rank']}" for e in errors[1:]]
    also = f" ({', '.join(others)} failed after it)" if others else ""
    return (f"{job.family}: rank {root['rank']} of {job.procs} failed{also}: {root['message']}\n{trace}\n"
            f"Every rank's output and error file is under {log_dir}.")  # fmt: skip


@record
def main(argv: list[str] | None = None) -> None:
    """A torchrun worker: ``python -m pipeline.torchrun <job.json>``."""
    args = sys.argv[1:] if argv is None else argv
    job = Job(**json.loads(Path(args[0]).read_text()))
    rt = distributed.start(job.device, job.threads, job.buffer_rows, job.precision)
    try:
        family = FAMILIES[job.family]
        config = parse_config(family.config_cls, job.config)
        print(f"[{job.family}] rank {rt.rank} of {rt.world_size} on {rt.device} ({distributed.backend()})")
        log = print if rt.rank == 0 else (lambda _line: None)  # rank 0 speaks for the group
        upstream = UpstreamModels(job.upstream)
        model = fit_family(family, job.snapshot, config, log, rt, *([upstream] if family.upstream else []))
        if family.upstream:
            model.meta["upstream_models"] = upstream.used()
        if rt.rank == 0:
            model.meta["training"]["backend"] = distributed.backend()
            model.save(job.out)
            print(f"[{job.family}] rank 0 saved the model in {job.out}")
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
