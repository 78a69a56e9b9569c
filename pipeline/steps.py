"""One family's chain as plain functions: train, export, evaluate, promote.

Each ``model_<family>``, ``onnx_<family>``, ``eval_<family>`` and ``registry_<family>`` asset
calls one of these and only turns the result into Dagster outputs and metadata, so the
logic (the reuse cache, blessing, promotion under the registry lock) runs and is tested
without Dagster. ``log`` is anything with ``info`` and ``warning`` (Dagster's context.log, a
``logging.Logger``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.io import atomic_write_json, folder_lock
from evaluation.evaluate import evaluate_onnx
from export.family_export import export_family
from export.registry import Blessing, Promotion, bless, promote_blessed
from models.base import CONFIG_FILE, WEIGHTS_FILE
from models.catalogue import Family
from models.config import config_values, parse_config
from models.runtime import Runtime, check_precision, resolve_device
from pipeline import torchrun
from pipeline.family_config import family_configs
from pipeline.fitting import UpstreamModels, fit_family, gradient_trained, upstream_input_name, upstream_read
from pipeline.reuse import (
    StepCache,
    code_digest,
    content_digest,
    model_key_parts,
    package_versions,
    reuse_key,
    snapshot_key,
)
from pipeline.settings import Settings, SettingsError, device_choice, precision_choice

ONNX_FILES = ("model.onnx", "signature.json", "lineage.json")


@dataclass(frozen=True)
class Reuse:
    """The reuse key of a step and, when an earlier run's output was reused, its pointer."""

    key: str
    record: dict | None

    @property
    def reused(self) -> bool:
        return self.record is not None

    def note(self, stage: str) -> str:
        if self.record is None:
            why = "new data, config or code, or a first run"
            return f"Computed: no earlier {stage} has reuse key {self.key} ({why})."
        return (
            f"Reused the {stage} that run {self.record['run_id']} wrote for reuse key {self.key} (same "
            f"snapshot inputs, config, code and libraries): nothing recomputed. Folder: {self.record['path']}"
        )


@contextlib.contextmanager
def in_use(settings: Settings, family: str, *inputs: str | Path) -> Iterator[None]:
    """Shared locks (``common.io.folder_lock``) on what a step reads and writes, held while it
    runs: its family's artifacts folder (the reuse pointers, the run folders they name, the run
    folder it writes), the artifacts folder of each family an input lies in, and every other
    input folder (the snapshot). Storage retention (``pipeline/retention.py``) takes these locks
    exclusively without waiting and leaves what is held alone, so nothing a running step uses
    is deleted under it."""
    artifacts = settings.artifacts_dir.resolve()
    own = artifacts / family
    own.mkdir(parents=True, exist_ok=True)
    folders = {own}
    for path in (Path(p).resolve() for p in inputs):
        # artifacts/<family>/<run>/model -> artifacts/<family>
        inside = path != artifacts and path.is_relative_to(artifacts)
        folders.add(artifacts / path.relative_to(artifacts).parts[0] if inside else path)
    with contextlib.ExitStack() as held:
        for folder in sorted(folders):
            held.enter_context(folder_lock(folder))
        yield


jsonable = config_values  # a config dataclass (or mapping) as plain JSON values




# --- train --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trained:
    out: Path
    reuse: Reuse
    fit_seconds: float
    history: list[dict]
    config: dict
    upstream_models: dict
    training: dict = field(default_factory=dict)  # device, threads, budget_hit, epochs (training_summary)


def training_runtime(settings: Settings, device: str | None = None, procs: int = 1,
                     precision: str | None = None) -> Runtime:  # fmt: skip
    """Where a family trains: the run config's ``device`` or ``RECSYS_DEVICE`` resolved against
    torch (``cuda`` without CUDA fails, naming which one asked), ``RECSYS_TORCH_THREADS`` CPU
    threads, the run config's ``precision`` or ``RECSYS_PRECISION``, streamed rows shuffled
    ``RECSYS_STREAM_BUFFER_ROWS`` at a time, on ``procs`` processes (rank 0 of them here: the
    torchrun workers take their own ranks)."""
    name = "run config device" if device else "RECSYS_DEVICE"
    choice = device_choice(device, name) if device else settings.device
    precision_name = "run config precision" if precision else "RECSYS_PRECISION"
    precision = precision_choice(precision, precision_name) if precision else settings.precision
    runtime = Runtime(device=str(resolve_device(choice, name)), threads=settings.torch_threads,
                      buffer_rows=settings.stream_buffer_rows, world_size=procs,
                      sparse_min_rows=settings.sparse_min_rows, precision=precision)  # fmt: skip
    check_precision(runtime, precision_name)
    torchrun.check_devices(runtime)
    return runtime


def training_procs(family: Family, settings: Settings, procs: int | None, log) -> int:
    """The run config's ``procs`` or ``RECSYS_TRAIN_PROCS``; 1 for a family not trained by
    gradient (kNN, WALS), which DDP cannot spread."""
    if procs is not None and procs < 1:
        raise SettingsError(f"run config procs={procs} is below 1; set 1 (one process) or more.")
    n = procs or settings.train_procs
    if n > 1 and not gradient_trained(family):
        log.info(f"{family.name} is not trained by gradient steps: it fits in one process, not {n}")
        return 1
    return n


def _saved(out: Path, reuse: Reuse, seconds: float) -> Trained:
    """The ``Trained`` of a model folder on disk (a reused checkpoint, or one a torchrun group saved)."""
    saved = json.loads((out / CONFIG_FILE).read_text())
    meta = saved.get("meta") or {}
    return Trained(out, reuse, seconds, saved.get("history") or [], saved.get("config") or {},
                   meta.get("upstream_models") or {}, meta.get("training") or {})  # fmt: skip


def train(
    family: Family, snapshot: str, settings: Settings, run_id: str, log, code_version: str,
    upstream_dirs: Mapping[str, str] | None = None, device: str | None = None, procs: int | None = None,
    precision: str | None = None,
) -> Trained:  # fmt: skip
    """Fit ``family`` on the snapshot, or reuse the checkpoint of an earlier run with the same key.

    With ``procs`` (or RECSYS_TRAIN_PROCS) N > 1 a gradient-trained family trains in a torchrun
    group of N DDP processes (``pipeline.torchrun``), whose rank 0 saves the model where this
    process would; the step's log gets the group's output.

    Raises:
        ValueError: the model config for this family is unreadable or has unknown fields.
        DeviceUnavailable: ``device`` (or RECSYS_DEVICE) is ``cuda`` and torch sees no CUDA device
            (or fewer GPUs than processes).
        TrainingProcessFailed: a rank of the torchrun group failed; the message names it and its error.
    """
    upstream_dirs = dict(upstream_dirs or {})
    with in_use(settings, family.name, snapshot, *upstream_dirs.values()):
        config = parse_config(family.config_cls, family_configs(settings).get(family.name, {}))
        # only the upstream models fit reads: they are the checkpoint's inputs (emb_knn on
        # mf_implicit is not retrained because gmf was)
        read = {u: upstream_dirs[upstream_input_name(u)] for u in upstream_read(family, config)
                if upstream_input_name(u) in upstream_dirs}  # fmt: skip
        parts = model_key_parts(family.name, code_version, jsonable(config), snapshot_key(snapshot),
                                {upstream_input_name(u): d for u, d in read.items()})  # fmt: skip
        runtime = training_runtime(settings, device, training_procs(family, settings, procs, log), precision)
        parts["runtime"] = runtime.key()  # CPU and CUDA weights differ, and so do 1 and N processes
        key = reuse_key("model", parts)
        cache = StepCache(settings.artifacts_dir, family.name, "model", (WEIGHTS_FILE, CONFIG_FILE))
        hit = cache.lookup(key, log)
        reuse = Reuse(key, hit)
        if hit is not None:
            log.info(reuse.note("checkpoint"))
            return _saved(Path(hit["path"]), reuse, hit.get("fit_seconds", 0.0))
        start = time.perf_counter()
        out = settings.artifacts_dir / family.name / run_id / "model"
        if runtime.world_size > 1:
            job = torchrun.Job(family.name, snapshot, jsonable(config), str(out), runtime.torch_device.type,
                               runtime.threads, runtime.buffer_rows, runtime.world_size, read,
                               runtime.precision)  # fmt: skip
            torchrun.launch(job, out.parent / "torchrun", log)
            seconds = round(time.perf_counter() - start, 2)
            cache.record(key, out, run_id, {"fit_seconds": seconds})
            return _saved(out, reuse, seconds)
        if family.upstream:
            upstream = UpstreamModels(read)
            model = fit_family(family, snapshot, config, log.info, runtime, upstream)
            # saved in config.json's meta, read back by the export step into lineage.json
            model.meta["upstream_models"] = upstream.used()
        else:
            model = fit_family(family, snapshot, config, log.info, runtime)
        seconds = round(time.perf_counter() - start, 2)
        model.save(out)
        cache.record(key, out, run_id, {"fit_seconds": seconds})
        return Trained(out, reuse, seconds, model.history, jsonable(model.config),
                       model.meta.get("upstream_models") or {}, model.meta["training"])  # fmt: skip


# --- export -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    out: Path
    reuse: Reuse
    parity: dict  # passed, tolerance, max_abs_diff, markdown
    lineage: dict
    signature: dict


def export(
    family: Family, model_dir: str, snapshot: str, settings: Settings, run_id: str, log, code_version: str
) -> Exported:
    """ONNX export + parity gate + lineage, or the export of an earlier run with the same key.

    A failed parity gate is never recorded for reuse: the next run tries again."""
    with in_use(settings, family.name, snapshot, model_dir):
        key = reuse_key(
            "onnx",
            {"model_dir": model_dir, "checkpoint": content_digest(Path(model_dir) / WEIGHTS_FILE),
             "code_version": code_version, "export_code": code_digest("export"),
             "model_code": code_digest("models", "common"), "packages": package_versions(),
             "snapshot": snapshot_key(snapshot)},
        )  # fmt: skip
        cache = StepCache(settings.artifacts_dir, family.name, "onnx", ONNX_FILES)
        hit = cache.lookup(key, log)
        if hit is not None and not isinstance(hit.get("parity"), dict):
            hit = None  # a pointer without its parity report cannot re-emit the check
        reuse = Reuse(key, hit)
        if hit is not None:
            log.info(reuse.note("ONNX export"))
            out = Path(hit["path"])
            read = lambda name: json.loads((out / name).read_text())  # noqa: E731
            return Exported(out, reuse, hit["parity"], read("lineage.json"), read("signature.json"))
        out = settings.artifacts_dir / family.name / run_id / "onnx"
        result = export_family(family=family, model_dir=Path(model_dir), snapshot_dir=Path(snapshot),
                               out_dir=out, asset_code_version=code_version, run_id=run_id)  # fmt: skip
        parity = {
            "passed": bool(result.parity_passed),
            "tolerance": result.parity_tolerance,
            "max_abs_diff": float(result.parity_max_abs_diff),
            "markdown": result.parity_markdown,
        }
        if parity["passed"]:
            # model_dir: storage retention keeps the checkpoint a kept registry version came from
            cache.record(key, out, run_id, {"parity": parity, "model_dir": model_dir})
        return Exported(out, reuse, parity, result.lineage, result.signature)


# --- evaluate -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluated:
    out: Path
    reuse: Reuse
    metrics: dict
    blessing: Blessing
    data_version: str | None = None  # of the raw interactions the snapshot was built from
    popularity: Mapping[str, float] | None = None  # the baseline it was blessed against
    snapshot: str | None = None  # the snapshot folder it scored (the leaderboard labels it)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.json"

    def record(self, family: Family, onnx_dir: str) -> dict:
        """What the leaderboard and :func:`promote` read (the ``eval_<family>`` asset's value)."""
        return {
            "family": family.name,
            "task": family.task.value,
            "metrics": self.metrics,
            "onnx_dir": onnx_dir,
            "metrics_path": str(self.metrics_path),
            "blessed": self.blessing.blessed,
            "blessing_reasons": list(self.blessing.reasons),
            "popularity": dict(self.popularity or {}),
            "data_version": self.data_version,
            "snapshot": self.snapshot,
        }


def evaluate(
    family: Family, onnx_dir: str, snapshot: str, popularity: Mapping[str, float], settings: Settings,
    run_id: str, log,
) -> Evaluated:  # fmt: skip
    """onnxruntime-only metrics on the test split (reused when the key matches), then the
    blessing against the popularity baseline and the last blessed version, decided every time."""
    with in_use(settings, family.name, snapshot, onnx_dir):
        task = family.task.value
        key = reuse_key(
            "eval",
            {"onnx_dir": onnx_dir, "onnx_sha256": content_digest(Path(onnx_dir) / "model.onnx"), "task": task,
             "export_code": code_digest("export", "evaluation", "common"), "packages": package_versions(),
             "snapshot": snapshot_key(snapshot)},
        )  # fmt: skip
        cache = StepCache(settings.artifacts_dir, family.name, "eval", ("metrics.json",))
        hit = cache.lookup(key, log)
        reuse = Reuse(key, hit)
        if hit is not None:
            log.info(reuse.note("evaluation"))
            out = Path(hit["path"])
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = evaluate_onnx(Path(onnx_dir), Path(snapshot), task,
                                    score_memory_mb=settings.score_memory_mb)  # fmt: skip
            out = settings.artifacts_dir / family.name / run_id / "eval"
            atomic_write_json(out / "metrics.json", metrics)
            cache.record(key, out, run_id)
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
        # compared with the blessed version's lineage.json data_fingerprint
        data_version = (meta.get("upstream") or {}).get("raw_interactions")
        blessing = bless(family.name, task, metrics, dict(popularity), settings.registry_dir,
                         settings.bless_tolerance, data_version=data_version)  # fmt: skip
        return Evaluated(out, reuse, metrics, blessing, data_version, dict(popularity), snapshot)


# --- promote ------------------------------------------------------------------------------
def promote(family: Family, evaluation: Mapping[str, Any], settings: Settings, run_id: str, log) -> Promotion:
    """Copy a blessed export into the registry under its lock (idempotent; see ``promote_blessed``).

    ``evaluation`` is the evaluate step's record (``onnx_dir``, ``metrics_path``, ``metrics``,
    ``popularity``, ``data_version``): the blessing is decided again under the lock against the
    version current then, so a run that overlapped another's promotion cannot undo it."""

    def recheck() -> Blessing:
        return bless(
            family.name,
            family.task.value,
            dict(evaluation["metrics"]),
            dict(evaluation["popularity"]),
            settings.registry_dir,
            settings.bless_tolerance,
            data_version=evaluation.get("data_version"),
        )

    staging = settings.artifacts_dir / family.name / run_id / "release"
    with in_use(settings, family.name, evaluation["onnx_dir"], evaluation["metrics_path"]):
        promotion = promote_blessed(
            family.name,
            evaluation["onnx_dir"],
            evaluation["metrics_path"],
            settings.registry_dir,
            staging,
            on_wait=log.info,
            recheck=recheck,
        )
    if promotion.swept:
        log.warning(f"removed leftovers of interrupted promotions of {family.name}: {promotion.swept}")
    log.info(f"{family.name}: {promotion.note}")
    return promotion
