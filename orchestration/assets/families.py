"""The per-family chain of assets, built by one factory for every registered family.

Re-running on unchanged inputs is cheap. Each of ``model_<family>``, ``onnx_<family>`` and
``eval_<family>`` computes a *reuse key*: a hash of everything its output depends on (what
the training snapshot was built from, the family's and the shared code's source hashes, the
parsed config, the library versions, the upstream folder). When an earlier run already produced
that key (a pointer ``$RECSYS_HOME/artifacts/<family>/by_key/<stage>-<key>.json`` written
only after the output was complete), the step returns that output instead of recomputing it,
with metadata ``reused: true`` and a ``reuse`` line saying from which run. The key is also
the step's Dagster data version, so the UI shows downstream assets as up to date. Any change
of data, config or code gives a new key, and the step recomputes.

``registry_<family>`` promotes idempotently: a model file identical to the current version's
is not promoted again. Promotions take ``$RECSYS_HOME/locks/registry.lock`` (an OS file lock,
released by the kernel if the process dies), so two runs cannot race for the registry.
"""

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path

import dagster as dg

from orchestration.assets.snapshot import training_snapshot
from pipeline.family_config import family_configs
from pipeline.settings import REPO_ROOT, load_settings

# Transient failures (a killed worker, a full temp dir that was cleaned) get one more try;
# a deterministic bug fails the same way twice, which is cheap at this size.
TRAINING_POOL = "model_training"
RETRY = dg.RetryPolicy(max_retries=1, delay=5)


def _source_version(obj) -> str:
    """Code version of a family = hash of its source file, so the UI marks it stale on edits."""
    source = Path(inspect.getsourcefile(obj)).read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


# Bump to invalidate every reuse pointer at once (e.g. when the pointer layout changes).
REUSE_FORMAT = 1
# Libraries whose version changes what a step produces.
_PACKAGES = ("torch", "numpy", "scipy", "onnx", "onnxruntime", "onnxscript")


@functools.cache
def code_digest(*paths: str) -> str:
    """Hash of these repository files, and of every ``*.py`` in these repository folders: shared
    code a family's file imports (``models/base.py``, ``models/train.py``, ``export/*.py``)
    changes outputs too."""
    digest = hashlib.sha256()
    for name in paths:
        path = REPO_ROOT / name
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def reuse_key(stage: str, parts: Mapping[str, object]) -> str:
    """The reuse key of one step: a hash of ``stage`` and everything its output depends on."""
    payload = json.dumps({"stage": stage, "format": REUSE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def model_key_parts(
    family: str, code_version: str, config: Mapping, snapshot: str, upstream: Mapping[str, str]
) -> dict[str, object]:
    """What a trained model depends on; equal parts = the same checkpoint (training is seeded)."""
    return {
        "family": family,
        "code_version": code_version,
        "model_code": code_digest("models"),
        "packages": package_versions(),
        "config": dict(config),
        "snapshot": snapshot,
        "upstream": dict(sorted(upstream.items())),
    }


# What a snapshot was built from, exactly (its meta.json). The content fingerprint is not
# used: the marts' float features (means and deviations from parallel DuckDB aggregates)
# differ in the last bits from one dbt build to the next, so unchanged inputs would get a new
# fingerprint every run. Raw data versions (content hashes), the dbt mart versions Dagster
# records, the dbt manifest and variables, and the integer shape of the snapshot are exact.
SNAPSHOT_INPUT_FIELDS = ("upstream", "dbt_manifest_sha256", "split", "history_len", "split_rows", "n_users",
                         "n_items", "sparse_cardinality", "rating_range", "max_history_len")  # fmt: skip


def snapshot_key(snapshot: str) -> str:
    """The part of a reuse key that stands for the training snapshot (see above); a snapshot
    written without upstream data versions falls back to its content fingerprint."""
    try:
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
    except (OSError, ValueError):
        return f"content:{Path(snapshot).name}"
    if not meta.get("upstream"):
        return f"content:{meta.get('fingerprint') or Path(snapshot).name}"
    inputs = {name: meta.get(name) for name in SNAPSHOT_INPUT_FIELDS}
    inputs["dbt_vars"] = load_settings().dbt_vars(meta.get("split"))
    inputs["snapshot_code"] = code_digest("pipeline/snapshot.py")
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return f"inputs:{digest[:16]}"


class StepCache:
    """Pointers from a reuse key to the folder an earlier run wrote for it:
    ``<artifacts>/<family>/by_key/<stage>-<key>.json``. A pointer is written after the folder is
    complete, so a run killed midway leaves none; one whose folder lost a file is ignored."""

    def __init__(self, artifacts_dir: Path, family: str, stage: str, required: tuple[str, ...]):
        self.folder = Path(artifacts_dir) / family / "by_key"
        self.stage = stage
        self.required = required

    def pointer(self, key: str) -> Path:
        return self.folder / f"{self.stage}-{key}.json"

    def lookup(self, key: str, log) -> dict | None:
        pointer = self.pointer(key)
        if not pointer.is_file():
            return None
        try:
            record = json.loads(pointer.read_text())
            folder = Path(record["path"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(f"ignoring unreadable reuse pointer {pointer} ({exc}); recomputing")
            return None
        missing = [name for name in self.required if not (folder / name).is_file()]
        if missing:
            log.warning(f"reuse pointer {pointer} names {folder}, which lacks {missing}; recomputing")
            return None
        return record

    def record(self, key: str, path: Path, run_id: str, extra: Mapping[str, object] | None = None) -> None:
        from common.io import atomic_write_json

        atomic_write_json(
            self.pointer(key),
            {"key": key, "stage": self.stage, "path": str(path), "run_id": run_id,
             "created": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {})},
        )  # fmt: skip


def _reuse_note(stage: str, record: dict | None, key: str) -> str:
    if record is None:
        return f"Computed: no earlier {stage} has reuse key {key} (new data, config or code, or a first run)."
    return (
        f"Reused the {stage} that run {record['run_id']} wrote for reuse key {key} (same snapshot "
        f"inputs, config, code and libraries): nothing recomputed. Folder: {record['path']}"
    )


@contextlib.contextmanager
def registry_lock(home: Path, log) -> Iterator[None]:
    """An exclusive OS lock on ``<home>/locks/registry.lock`` for one promotion. The kernel
    releases it when the holder exits, killed or not, so a dead run never blocks the next."""
    path = Path(home) / "locks" / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for {path}: another run is promoting a model")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sweep_dead_promotions(family_dir: Path, log) -> list[str]:
    """Remove hidden ``.*.tmp`` leftovers of promotions whose process died (killed mid-copy).
    Called under :func:`registry_lock`, so no live promotion owns them."""
    removed = []
    if not family_dir.is_dir():
        return removed
    for path in family_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.warning(f"removed leftovers of interrupted promotions in {family_dir}: {sorted(removed)}")
    return removed


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _curve_markdown(history: list[dict]) -> str:
    if not history:
        return "(no epochs recorded)"
    cols = list(history[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in history:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metrics_markdown(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> str:
    names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    header = "| metric | model | " + " | ".join(baselines) + " |"
    lines = [header, "|" + "---|" * (2 + len(baselines))]
    for name in names:
        cells = [f"{metrics[name]:.4f}"] + [
            f"{b.get(name, float('nan')):.4f}" if isinstance(b.get(name), (int, float)) else "–"
            for b in baselines.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class UpstreamModels(Mapping):
    """The upstream models a family may build on, loaded only when ``fit`` asks for one.

    ``dirs`` maps family name -> saved model dir (the ``model_<family>`` asset values). A
    family declares every candidate (``Family.upstream``) but its config picks which it uses
    (emb_knn: ``source``); loading lazily keeps the others off disk and tells the asset which
    ones went into the model (``used``), so lineage names exactly those."""

    def __init__(self, dirs: Mapping[str, str]):
        self.dirs = dict(dirs)
        self._loaded: dict = {}

    def __getitem__(self, family: str):
        if family not in self._loaded:
            from models.catalogue import load_model

            self._loaded[family] = load_model(self.dirs[family])
        return self._loaded[family]

    def __iter__(self) -> Iterator[str]:
        return iter(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)

    def used(self) -> dict[str, str]:
        """``{asset key: "run_id=... model_dir=..."}`` of the models fit loaded; the run id is the
        folder the model asset wrote under (``artifacts/<family>/<run_id>/model``)."""
        return {
            f"model_{family}": f"run_id={Path(self.dirs[family]).parent.name} model_dir={self.dirs[family]}"
            for family in self._loaded
        }


def upstream_input_name(family: str) -> str:
    """The model asset's input (and Dagster ``ins`` key) for an upstream family's checkpoint."""
    return f"model_{family}"


def build_family_assets(name: str) -> list[dg.AssetsDefinition]:
    from models.catalogue import FAMILIES

    family = FAMILIES[name]
    task = family.task.value if hasattr(family.task, "value") else str(family.task)
    version = _source_version(family.fit)
    model_key, onnx_key, eval_key, registry_key = (
        dg.AssetKey(f"{stage}_{name}") for stage in ("model", "onnx", "eval", "registry")
    )

    # a family built on other families' models (emb_knn) depends on their model assets, so
    # Dagster orders the runs and the lineage graph draws the edges
    upstream_ins = {upstream_input_name(u): dg.AssetIn(dg.AssetKey(f"model_{u}")) for u in family.upstream}

    @dg.asset(
        key=model_key,
        group_name="train",
        ins={"snapshot": dg.AssetIn(training_snapshot.key), **upstream_ins},
        kinds={"pytorch"},
        code_version=version,
        pool=TRAINING_POOL,
        retry_policy=RETRY,
        owners=["team:recsys-ml"],
        description=(
            f"`{name}` ({task}) trained on the mart snapshot; checkpoint (`model.pt`, "
            f"`config.json`) under `$RECSYS_HOME/artifacts/{name}/<run_id>/model/`. Metadata: "
            "training curve, config, fit time. On unchanged snapshot, config and code the earlier "
            "checkpoint is reused instead of retrained (`reused: true`, `reuse` says from which run)."
            + (
                f" Built on the embeddings of one of {', '.join(family.upstream)} (config `source`);"
                " `upstream_models` names the one used."
                if family.upstream
                else ""
            )
        ),
    )
    def train(context: dg.AssetExecutionContext, snapshot: str, **upstream_dirs: str):
        from models.base import CONFIG_FILE, WEIGHTS_FILE
        from models.config import parse_config
        from models.data import Snapshot

        settings = load_settings()
        try:
            config = parse_config(family.config_cls, family_configs(settings).get(name, {}))
        except (TypeError, ValueError) as exc:  # FamilyConfigError is a ValueError
            raise dg.Failure(f"model config for {name}: {exc}") from exc
        key = reuse_key(
            "model",
            model_key_parts(name, version, _jsonable(config), snapshot_key(snapshot), upstream_dirs),
        )
        cache = StepCache(settings.artifacts_dir, name, "model", (WEIGHTS_FILE, CONFIG_FILE))
        hit = cache.lookup(key, context.log)
        if hit is not None:
            out = Path(hit["path"])
            saved = json.loads((out / CONFIG_FILE).read_text())
            history, meta = saved.get("history") or [], saved.get("meta") or {}
            context.log.info(_reuse_note("checkpoint", hit, key))
            seconds, saved_config = hit.get("fit_seconds", 0.0), saved.get("config") or {}
        else:
            start = time.perf_counter()
            if family.upstream:
                upstream = UpstreamModels({u: upstream_dirs[upstream_input_name(u)] for u in family.upstream})
                model = family.fit(Snapshot(snapshot), config, context.log.info, upstream)
                # saved in config.json's meta, read back by the export step into lineage.json
                model.meta["upstream_models"] = upstream.used()
            else:
                model = family.fit(Snapshot(snapshot), config, context.log.info)
            seconds = round(time.perf_counter() - start, 2)
            out = settings.artifacts_dir / name / context.run_id / "model"
            model.save(out)
            cache.record(key, out, context.run_id, {"fit_seconds": seconds})
            history, meta, saved_config = model.history, model.meta, _jsonable(model.config)
        return dg.Output(
            str(out),
            data_version=dg.DataVersion(key),
            metadata={
                "checkpoint_dir": dg.MetadataValue.path(str(out)),
                "reused": hit is not None,
                "reuse": _reuse_note("checkpoint", hit, key),
                "reuse_key": key,
                "fit_seconds": seconds,
                "epochs": len(history),
                "training_curve": dg.MetadataValue.md(_curve_markdown(history)),
                "history": dg.MetadataValue.json(history),
                "config": dg.MetadataValue.json(saved_config),
                "snapshot": snapshot,
                **(
                    {"upstream_models": dg.MetadataValue.json(meta.get("upstream_models") or {})}
                    if family.upstream
                    else {}
                ),
            },
        )

    @dg.asset(
        key=onnx_key,
        group_name="export",
        ins={"model_dir": dg.AssetIn(model_key), "snapshot": dg.AssetIn(training_snapshot.key)},
        kinds={"onnx"},
        code_version=version,
        retry_policy=RETRY,
        owners=["team:recsys-ml"],
        check_specs=[
            dg.AssetCheckSpec(
                "parity",
                asset=onnx_key,
                blocking=True,
                description="onnxruntime vs PyTorch on batch 1, batch N, unknown ids (and empty/"
                "full histories): evaluation and handoff never use a file that fails it.",
            )
        ],
        description=(
            f"`{name}` as `model.onnx` (dynamic batch, opset pinned, checker clean) with "
            "`signature.json`, `lineage.json` (also stamped in the file's metadata_props) and "
            f"`golden.json`, under `$RECSYS_HOME/artifacts/{name}/<run_id>/onnx/`."
        ),
    )
    def export(context: dg.AssetExecutionContext, model_dir: str, snapshot: str):
        from export.family_export import export_family

        settings = load_settings()
        key = reuse_key(
            "onnx",
            {"model_dir": model_dir, "code_version": version, "export_code": code_digest("export"),
             "model_code": code_digest("models"), "packages": package_versions(),
             "snapshot": snapshot_key(snapshot)},
        )  # fmt: skip
        required = ("model.onnx", "signature.json", "lineage.json")
        cache = StepCache(settings.artifacts_dir, name, "onnx", required)
        hit = cache.lookup(key, context.log)
        if hit is not None and not isinstance(hit.get("parity"), dict):
            hit = None  # a pointer without its parity report cannot re-emit the check
        if hit is not None:
            context.log.info(_reuse_note("ONNX export", hit, key))
            out = Path(hit["path"])
            parity = hit["parity"]
            lineage = json.loads((out / "lineage.json").read_text())
            signature = json.loads((out / "signature.json").read_text())
        else:
            out = settings.artifacts_dir / name / context.run_id / "onnx"
            result = export_family(
                family=family,
                model_dir=Path(model_dir),
                snapshot_dir=Path(snapshot),
                out_dir=out,
                asset_code_version=version,
                run_id=context.run_id,
            )
            parity = {
                "passed": bool(result.parity_passed),
                "tolerance": result.parity_tolerance,
                "max_abs_diff": float(result.parity_max_abs_diff),
                "markdown": result.parity_markdown,
            }
            lineage, signature = result.lineage, result.signature
            if parity["passed"]:  # a failed export is never reused: the next run tries again
                cache.record(key, out, context.run_id, {"parity": parity})
        yield dg.Output(
            str(out),
            data_version=dg.DataVersion(key),
            metadata={
                "onnx_file": dg.MetadataValue.path(str(out / "model.onnx")),
                "reused": hit is not None,
                "reuse": _reuse_note("ONNX export", hit, key),
                "reuse_key": key,
                "onnx_bytes": (out / "model.onnx").stat().st_size,
                "lineage": dg.MetadataValue.json(lineage),
                "signature": dg.MetadataValue.json(signature),
                "parity": dg.MetadataValue.md(parity["markdown"]),
            },
        )
        yield dg.AssetCheckResult(
            check_name="parity",
            passed=parity["passed"],
            metadata={
                "tolerance": parity["tolerance"],
                "cases": dg.MetadataValue.md(parity["markdown"]),
                "max_abs_diff": parity["max_abs_diff"],
                "reused": hit is not None,
            },
        )

    @dg.asset(
        key=eval_key,
        group_name="evaluate",
        ins={
            "onnx_dir": dg.AssetIn(onnx_key),
            "snapshot": dg.AssetIn(training_snapshot.key),
            "baselines": dg.AssetIn(dg.AssetKey("baseline_metrics")),
        },
        kinds={"onnx"},
        code_version=version,
        owners=["team:recsys-ml"],
        check_specs=[
            dg.AssetCheckSpec(
                "blessing",
                asset=eval_key,
                description="Beats the popularity baseline on the task's main metric and does "
                "not regress past RECSYS_BLESS_TOLERANCE against the last blessed version. Only a "
                "blessed model is promoted to the registry.",
            )
        ],
        description=(
            f"`{name}` evaluated with onnxruntime only on the test split "
            f"(`metrics.json` under `$RECSYS_HOME/artifacts/{name}/<run_id>/eval/`), beside "
            "the random and popularity baselines on the same rows."
        ),
    )
    def evaluate(context: dg.AssetExecutionContext, onnx_dir: str, snapshot: str, baselines: dict):
        from common.io import atomic_write_json
        from evaluation.evaluate import evaluate_onnx
        from export.registry import bless

        settings = load_settings()
        key = reuse_key(
            "eval",
            {"onnx_dir": onnx_dir, "task": task, "export_code": code_digest("export"),
             "packages": package_versions(), "snapshot": snapshot_key(snapshot)},
        )  # fmt: skip
        cache = StepCache(settings.artifacts_dir, name, "eval", ("metrics.json",))
        hit = cache.lookup(key, context.log)
        if hit is not None:
            context.log.info(_reuse_note("evaluation", hit, key))
            out = Path(hit["path"])
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = evaluate_onnx(Path(onnx_dir), Path(snapshot), task)
            out = settings.artifacts_dir / name / context.run_id / "eval"
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "metrics.json", metrics)
            cache.record(key, out, context.run_id)
        task_baselines = baselines[task]
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
        blessing = bless(
            name,
            task,
            metrics,
            task_baselines["popularity"],
            settings.registry_dir,
            settings.bless_tolerance,
            # compared with the blessed version's lineage.json data_fingerprint
            data_version=(meta.get("upstream") or {}).get("raw_interactions"),
        )
        value = {
            "family": name,
            "task": task,
            "metrics": metrics,
            "onnx_dir": onnx_dir,
            "metrics_path": str(out / "metrics.json"),
            "blessed": blessing.blessed,
            "blessing_reasons": list(blessing.reasons),
        }
        yield dg.Output(
            value,
            data_version=dg.DataVersion(key),
            metadata={
                "reused": hit is not None,
                "reuse": _reuse_note("evaluation (metrics; the blessing is decided again)", hit, key),
                "reuse_key": key,
                "metrics": dg.MetadataValue.md(_metrics_markdown(metrics, task_baselines)),
                "main_metric": blessing.main_metric,
                "value": float(blessing.value),
                "popularity": float(blessing.baseline_value),
                "blessed": blessing.blessed,
                "metrics_file": dg.MetadataValue.path(str(out / "metrics.json")),
            },
        )
        yield dg.AssetCheckResult(
            check_name="blessing",
            passed=blessing.blessed,
            metadata={
                "reasons": dg.MetadataValue.json(list(blessing.reasons)),
                "main_metric": blessing.main_metric,
                "value": float(blessing.value),
                "popularity": float(blessing.baseline_value),
                "previous_version": str(blessing.previous_version),
                "same_data_as_previous": str(blessing.data_version_match),
            },
        )

    @dg.asset(
        key=registry_key,
        group_name="registry",
        ins={"evaluation": dg.AssetIn(eval_key)},
        output_required=False,
        kinds={"onnx"},
        owners=["team:recsys-ml"],
        description=(
            f"The blessed `{name}` in `$RECSYS_HOME/registry/{name}/<version>/` (`model.onnx`, "
            "`signature.json`, `metrics.json`, `lineage.json`, `golden.json`) with `CURRENT` "
            "pointing at it. Not materialised when the blessing check fails: the previous "
            "blessed version stays current."
        ),
    )
    def promote(context: dg.AssetExecutionContext, evaluation: dict):
        from export.registry import current_version, write_index
        from export.registry import promote as promote_files

        if not evaluation["blessed"]:
            context.log.warning(
                f"{name} not blessed ({'; '.join(evaluation['blessing_reasons'])}); registry unchanged"
            )
            return
        settings = load_settings()
        onnx_dir = Path(evaluation["onnx_dir"])
        digest = _file_sha256(onnx_dir / "model.onnx")
        with registry_lock(settings.home, context.log):
            sweep_dead_promotions(settings.registry_dir / name, context.log)
            current = current_version(name, settings.registry_dir)
            current_dir = settings.registry_dir / name / current if current else None
            if current_dir is not None and _file_sha256(current_dir / "model.onnx") == digest:
                # Idempotent: the same model file is already current (a re-run on unchanged
                # inputs). A second version holding identical bytes would only add noise.
                note = f"model.onnx is identical to current version {current}: nothing promoted"
                context.log.info(f"{name}: {note}")
                yield dg.Output(
                    str(current_dir),
                    data_version=dg.DataVersion(current),
                    metadata={"registry_dir": dg.MetadataValue.path(str(current_dir)), "version": current,
                              "promoted": False, "reason": note, "model_sha256": digest},
                )  # fmt: skip
                return
            staging = settings.artifacts_dir / name / context.run_id / "release"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(onnx_dir, staging)
            shutil.copy2(evaluation["metrics_path"], staging / "metrics.json")
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            version_dir = promote_files(name, staging, settings.registry_dir, f"{stamp}-{digest[:8]}")
            write_index(settings.registry_dir)
        yield dg.Output(
            str(version_dir),
            data_version=dg.DataVersion(version_dir.name),
            metadata={"registry_dir": dg.MetadataValue.path(str(version_dir)), "version": version_dir.name,
                      "promoted": True, "previous_version": str(current), "model_sha256": digest},
        )  # fmt: skip

    return [train, export, evaluate, promote]


def _jsonable(config) -> dict:
    from dataclasses import asdict, is_dataclass

    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else dict(config), default=str))
