"""The per-family chain of assets, built by one factory for every registered family."""

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from orchestration.assets.training import TRAINING_POOL, family_configs, training_snapshot
from orchestration.settings import load_settings

# Transient failures (a killed worker, a full temp dir that was cleaned) get one more try;
# a deterministic bug fails the same way twice, which is cheap at this size.
RETRY = dg.RetryPolicy(max_retries=1, delay=5)


def _source_version(obj) -> str:
    """Code version of a family = hash of its source file, so the UI marks it stale on edits."""
    source = Path(inspect.getsourcefile(obj)).read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


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
            from models.base import load_model

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
    from models.registry import FAMILIES

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
            "training curve, config, fit time."
            + (
                f" Built on the embeddings of one of {', '.join(family.upstream)} (config `source`);"
                " `upstream_models` names the one used."
                if family.upstream
                else ""
            )
        ),
    )
    def train(context: dg.AssetExecutionContext, snapshot: str, **upstream_dirs: str):
        from models.config import parse_config
        from models.data import Snapshot

        settings = load_settings()
        try:
            config = parse_config(family.config_cls, family_configs(settings).get(name, {}))
        except (TypeError, ValueError) as exc:
            raise dg.Failure(f"model config for {name}: {exc}") from exc
        start = time.perf_counter()
        if family.upstream:
            upstream = UpstreamModels({u: upstream_dirs[upstream_input_name(u)] for u in family.upstream})
            model = family.fit(Snapshot(snapshot), config, context.log.info, upstream)
            # saved in config.json's meta, read back by the export step into lineage.json
            model.meta["upstream_models"] = upstream.used()
        else:
            model = family.fit(Snapshot(snapshot), config, context.log.info)
        seconds = time.perf_counter() - start
        out = settings.artifacts_dir / name / context.run_id / "model"
        model.save(out)
        return dg.Output(
            str(out),
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "fit_seconds": round(seconds, 2),
                "epochs": len(model.history),
                "training_curve": dg.MetadataValue.md(_curve_markdown(model.history)),
                "history": dg.MetadataValue.json(model.history),
                "config": dg.MetadataValue.json(_jsonable(model.config)),
                "snapshot": snapshot,
                **(
                    {"upstream_models": dg.MetadataValue.json(model.meta["upstream_models"])}
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
        from export.pipeline import export_family

        settings = load_settings()
        out = settings.artifacts_dir / name / context.run_id / "onnx"
        result = export_family(
            family=family,
            model_dir=Path(model_dir),
            snapshot_dir=Path(snapshot),
            out_dir=out,
            asset_code_version=version,
            run_id=context.run_id,
        )
        yield dg.Output(
            str(out),
            metadata={
                "path": dg.MetadataValue.path(str(out / "model.onnx")),
                "onnx_bytes": (out / "model.onnx").stat().st_size,
                "lineage": dg.MetadataValue.json(result.lineage),
                "signature": dg.MetadataValue.json(result.signature),
                "parity": dg.MetadataValue.md(result.parity_markdown),
            },
        )
        yield dg.AssetCheckResult(
            check_name="parity",
            passed=result.parity_passed,
            metadata={
                "tolerance": result.parity_tolerance,
                "cases": dg.MetadataValue.md(result.parity_markdown),
                "max_abs_diff": result.parity_max_abs_diff,
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
        from export.evaluate import evaluate_onnx
        from export.io import atomic_write_json
        from export.registry import bless

        settings = load_settings()
        metrics = evaluate_onnx(Path(onnx_dir), Path(snapshot), task)
        out = settings.artifacts_dir / name / context.run_id / "eval"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
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
            metadata={
                "metrics": dg.MetadataValue.md(_metrics_markdown(metrics, task_baselines)),
                "main_metric": blessing.main_metric,
                "value": float(blessing.value),
                "popularity": float(blessing.baseline_value),
                "blessed": blessing.blessed,
                "path": dg.MetadataValue.path(str(out / "metrics.json")),
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
        from export.registry import promote as promote_files
        from export.registry import write_index

        if not evaluation["blessed"]:
            context.log.warning(
                f"{name} not blessed ({'; '.join(evaluation['blessing_reasons'])}); registry unchanged"
            )
            return
        settings = load_settings()
        onnx_dir = Path(evaluation["onnx_dir"])
        staging = settings.artifacts_dir / name / context.run_id / "release"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(onnx_dir, staging)
        shutil.copy2(evaluation["metrics_path"], staging / "metrics.json")
        digest = hashlib.sha256((onnx_dir / "model.onnx").read_bytes()).hexdigest()[:8]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        version_dir = promote_files(name, staging, settings.registry_dir, f"{stamp}-{digest}")
        write_index(settings.registry_dir)
        yield dg.Output(
            str(version_dir),
            metadata={"path": dg.MetadataValue.path(str(version_dir)), "version": version_dir.name},
        )

    return [train, export, evaluate, promote]


def _jsonable(config) -> dict:
    from dataclasses import asdict, is_dataclass

    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else dict(config), default=str))
