"""The per-family chain of assets, the same four for every family of the catalogue:

    model_<family>     train on the mart snapshot (checkpoint under $RECSYS_HOME/artifacts)
    onnx_<family>      model.onnx + signature + lineage; blocking `parity` check
    eval_<family>      onnxruntime-only evaluation on test; `blessing` check
    registry_<family>  atomic promotion into $RECSYS_HOME/registry/<family>/<version>/

Each body calls one function of ``pipeline/steps.py`` (where the reuse cache, blessing and
promotion under the registry lock live) and turns its result into outputs and metadata.
"""

from pathlib import Path

import dagster as dg

from models.catalogue import FAMILIES, Family
from models.config import parse_config
from orchestration.assets.metadata import curve_markdown, metrics_markdown
from orchestration.assets.snapshot import training_snapshot
from pipeline import steps
from pipeline.family_config import family_configs
from pipeline.fitting import upstream_read
from pipeline.reuse import snapshot_key, source_version
from pipeline.settings import load_settings

TRAINING_POOL = "model_training"
# Transient failures (a killed worker, a full temp dir that was cleaned) get one more try;
# a deterministic bug fails the same way twice, which is cheap at this size.
RETRY = dg.RetryPolicy(max_retries=1, delay=5)
OWNERS = ["team:recsys-ml"]


def _key(stage: str, name: str) -> dg.AssetKey:
    return dg.AssetKey(f"{stage}_{name}")


# The resource key of the loader of upstream checkpoints (``orchestration/definitions.py``).
UPSTREAM_LOADER = "upstream_checkpoint"


@dg.input_manager
def upstream_checkpoint(context: dg.InputContext) -> str | None:
    """An upstream model's checkpoint folder (its latest materialisation's ``checkpoint_dir``),
    or None when it was never materialised in this instance. A family declares every model it
    may build on (emb_knn: four embedding sources) but its config reads one or two; a home that
    never trained the others (``RECSYS_FAMILIES``, ``--select``) must not fail on loading them.
    A model ``fit`` does read and that is missing or stale is refused with its name
    (``_refuse_stale_upstream``)."""
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None:
        return None
    value = event.asset_materialization.metadata.get("checkpoint_dir")
    return None if value is None else str(getattr(value, "value", value))


def _reuse_metadata(reuse: steps.Reuse, stage: str) -> dict:
    return {"reused": reuse.reused, "reuse": reuse.note(stage), "reuse_key": reuse.key}


def read_upstream(family: Family) -> tuple[str, ...]:
    """The upstream families ``fit`` will read under the configured config
    (``pipeline.fitting.upstream_read``). A config that does not parse names them all (the step
    then reports the error)."""
    try:
        config = parse_config(family.config_cls, family_configs(load_settings()).get(family.name, {}))
    except (TypeError, ValueError):
        return family.upstream
    return upstream_read(family, config)


def upstream_not_fitted_on(instance: dg.DagsterInstance, family: Family, snapshot: str) -> dict[str, str]:
    """``{model_<upstream>: why}`` for each upstream model ``fit`` will read whose latest
    materialisation was not fitted on ``snapshot`` (or that was never materialised). Two
    snapshot folders built from the same inputs count as one (``snapshot_key``): the upstream
    model would be reused on either."""
    stale = {}
    for name in read_upstream(family):
        key = _key("model", name)
        event = instance.get_latest_materialization_event(key)
        value = event.asset_materialization.metadata.get("snapshot") if event is not None else None
        fitted = getattr(value, "value", value)
        if fitted is None:
            stale[key.to_user_string()] = "it was never materialised"
        elif fitted != snapshot and snapshot_key(fitted) != snapshot_key(snapshot):
            stale[key.to_user_string()] = (
                f"its latest model (run {event.run_id}) was fitted on snapshot {Path(fitted).name}, "
                f"not on {Path(snapshot).name}"
            )
    return stale


def _refuse_stale_upstream(context: dg.AssetExecutionContext, family: Family, snapshot: str) -> None:
    """A selection without the upstream model (the UI's "Materialize selected") would hand
    ``fit`` one fitted on another snapshot: stop, naming the asset to add."""
    stale = upstream_not_fitted_on(context.instance, family, snapshot)
    if stale:
        names = " and ".join(stale)
        why = "; ".join(f"{key}: {reason}" for key, reason in stale.items())
        raise dg.Failure(
            f"model_{family.name} builds on {names}, which does not match the snapshot this run "
            f"trains on ({why}). Add {names} to the selection and materialise again (in the UI, "
            f"select it together with model_{family.name}; `recsys run --select` adds it itself).",
            allow_retries=False,
        )


class TrainingRunConfig(dg.Config):
    """Per-run override of where the torch families train (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``; empty means RECSYS_DEVICE), on how many torchrun processes (0 means
    RECSYS_TRAIN_PROCS; N > 1 trains a gradient-trained family with DDP) and in what precision
    (``auto``, ``fp32``, ``bf16``; empty means RECSYS_PRECISION)."""

    device: str = ""
    procs: int = 0
    precision: str = ""


def model_asset(family: Family, version: str) -> dg.AssetsDefinition:
    name = family.name
    upstream_ins = {
        steps.upstream_input_name(u): dg.AssetIn(_key("model", u), input_manager_key=UPSTREAM_LOADER)
        for u in family.upstream
    }
    upstream_note = " " + family.model.upstream_note if family.model is not None else ""

    @dg.asset(
        key=_key("model", name),
        group_name="train",
        ins={"snapshot": dg.AssetIn(training_snapshot.key), **upstream_ins},
        kinds={"pytorch"},
        code_version=version,
        pool=TRAINING_POOL,
        retry_policy=RETRY,
        owners=OWNERS,
        description=(
            f"`{name}` ({family.task.value}) trained on the mart snapshot; checkpoint (`model.pt`, "
            f"`config.json`) under `$RECSYS_HOME/artifacts/{name}/<run_id>/model/`. Metadata: "
            "training curve, config, fit time. On unchanged snapshot, config and code the earlier "
            "checkpoint is reused instead of retrained (`reused: true`, `reuse` says from which run). "
            "`training`: device, threads, rows streamed or in memory, `budget_hit` (the config's "
            "`max_minutes` ran out); run config `device` overrides RECSYS_DEVICE, `procs` (DDP processes "
            "under torchrun, whose output streams into this step's log) RECSYS_TRAIN_PROCS, `precision` "
            "(autocast: auto, fp32, bf16) RECSYS_PRECISION."
            + (upstream_note if family.upstream else "")
        ),
    )
    def train(
        context: dg.AssetExecutionContext,
        config: TrainingRunConfig,
        snapshot: str,
        **upstream_dirs: str | None,  # None: never materialised (``upstream_checkpoint``)
    ):
        settings = load_settings()
        if family.upstream:
            _refuse_stale_upstream(context, family, snapshot)
        upstream_dirs = {key: path for key, path in upstream_dirs.items() if path is not None}
        try:
            result = steps.train(family, snapshot, settings, context.run_id, context.log, version,
                                 upstream_dirs, config.device or None, config.procs or None,
                                 config.precision or None)  # fmt: skip
        except (TypeError, ValueError) as exc:  # config errors name the field and the allowed ones
            raise dg.Failure(f"model config for {name}: {exc}") from exc
        upstream = (
            {"upstream_models": dg.MetadataValue.json(result.upstream_models)} if family.upstream else {}
        )
        return dg.Output(
            str(result.out),
            data_version=dg.DataVersion(result.reuse.key),
            metadata={
                "checkpoint_dir": dg.MetadataValue.path(str(result.out)),
                **_reuse_metadata(result.reuse, "checkpoint"),
                "fit_seconds": result.fit_seconds,
                "epochs": len(result.history),
                "budget_hit": bool(result.training.get("budget_hit", False)),
                "training": dg.MetadataValue.json(result.training),
                "training_curve": dg.MetadataValue.md(curve_markdown(result.history)),
                "history": dg.MetadataValue.json(result.history),
                "config": dg.MetadataValue.json(result.config),
                "snapshot": snapshot,
                **upstream,
            },
        )

    return train


def onnx_asset(family: Family, version: str) -> dg.AssetsDefinition:
    name, key = family.name, _key("onnx", family.name)

    @dg.asset(
        key=key,
        group_name="export",
        ins={"model_dir": dg.AssetIn(_key("model", name)), "snapshot": dg.AssetIn(training_snapshot.key)},
        kinds={"onnx"},
        code_version=version,
        retry_policy=RETRY,
        owners=OWNERS,
        check_specs=[
            dg.AssetCheckSpec(
                "parity",
                asset=key,
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
        result = steps.export(
            family, model_dir, snapshot, load_settings(), context.run_id, context.log, version
        )
        parity = result.parity
        yield dg.Output(
            str(result.out),
            data_version=dg.DataVersion(result.reuse.key),
            metadata={
                "onnx_file": dg.MetadataValue.path(str(result.out / "model.onnx")),
                **_reuse_metadata(result.reuse, "ONNX export"),
                "onnx_bytes": (result.out / "model.onnx").stat().st_size,
                "lineage": dg.MetadataValue.json(result.lineage),
                "signature": dg.MetadataValue.json(result.signature),
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
                "reused": result.reuse.reused,
            },
        )

    return export


def eval_asset(family: Family, version: str) -> dg.AssetsDefinition:
    name, key = family.name, _key("eval", family.name)

    @dg.asset(
        key=key,
        group_name="evaluate",
        ins={
            "onnx_dir": dg.AssetIn(_key("onnx", name)),
            "snapshot": dg.AssetIn(training_snapshot.key),
            "baselines": dg.AssetIn(dg.AssetKey("baseline_metrics")),
        },
        kinds={"onnx"},
        code_version=version,
        owners=OWNERS,
        check_specs=[
            dg.AssetCheckSpec(
                "blessing",
                asset=key,
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
        task_baselines = baselines[family.task.value]
        result = steps.evaluate(family, onnx_dir, snapshot, task_baselines["popularity"], load_settings(),
                                context.run_id, context.log)  # fmt: skip
        b = result.blessing
        verdict = {
            "main_metric": b.main_metric,
            "value": float(b.value),
            "popularity": float(b.baseline_value),
        }
        yield dg.Output(
            result.record(family, onnx_dir),
            data_version=dg.DataVersion(result.reuse.key),
            metadata={
                **_reuse_metadata(result.reuse, "evaluation (metrics; the blessing is decided again)"),
                "metrics": dg.MetadataValue.md(metrics_markdown(result.metrics, task_baselines)),
                **verdict,
                "blessed": b.blessed,
                "metrics_file": dg.MetadataValue.path(str(result.metrics_path)),
            },
        )
        yield dg.AssetCheckResult(
            check_name="blessing",
            passed=b.blessed,
            metadata={"reasons": dg.MetadataValue.json(list(b.reasons)), **verdict,
                      "previous_version": str(b.previous_version),
                      "same_data_as_previous": str(b.data_version_match)},
        )  # fmt: skip

    return evaluate


def registry_asset(family: Family) -> dg.AssetsDefinition:
    name = family.name

    @dg.asset(
        key=_key("registry", name),
        group_name="registry",
        ins={"evaluation": dg.AssetIn(_key("eval", name))},
        output_required=False,
        kinds={"onnx"},
        owners=OWNERS,
        description=(
            f"The blessed `{name}` in `$RECSYS_HOME/registry/{name}/<version>/` (`model.onnx`, "
            "`signature.json`, `metrics.json`, `lineage.json`, `golden.json`) with `CURRENT` "
            "pointing at it. Not materialised when the blessing check fails: the previous "
            "blessed version stays current."
        ),
    )
    def promote(context: dg.AssetExecutionContext, evaluation: dict):
        if not evaluation["blessed"]:
            reasons = "; ".join(evaluation["blessing_reasons"])
            context.log.warning(f"{name} not blessed ({reasons}); registry unchanged")
            return
        p = steps.promote(family, evaluation, load_settings(), context.run_id, context.log)
        if p.blessing is not None and not p.blessing.blessed:  # decided again under the lock
            context.log.warning(f"{name}: {p.note}; registry unchanged")
            return
        promoted = {"promoted": True, "previous_version": str(p.previous_version)}
        yield dg.Output(
            str(p.version_dir),
            data_version=dg.DataVersion(p.version),
            metadata={"registry_dir": dg.MetadataValue.path(str(p.version_dir)), "version": p.version,
                      **(promoted if p.promoted else {"promoted": False, "reason": p.note}),
                      "model_sha256": p.model_sha256},
        )  # fmt: skip

    return promote


def build_family_assets(name: str) -> list[dg.AssetsDefinition]:
    """The four assets of one family; their code version is the hash of the family's file, so
    the UI marks them stale when it changes."""
    family = FAMILIES[name]
    version = source_version(family.fit)
    return [model_asset(family, version), onnx_asset(family, version), eval_asset(family, version),
            registry_asset(family)]  # fmt: skip
