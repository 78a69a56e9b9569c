"""``prune_storage``: storage retention as a job (daily by ``automation.nightly_prune``, or
launched from the UI), reported on the ``storage_retention`` asset.

A job rather than an asset of the graph: ``refresh_all`` and ``recsys run`` select every asset,
and a prune must never run inside a training run. The plan, the locks and the deletion live in
``pipeline/retention.py``; the op adds what only Dagster knows: whether another run is in flight
(the gap between two of its steps holds no lock, so the prune waits for a quiet moment) and the
folders each asset's latest materialisation names (a partial run loads them as its inputs).
"""

import dagster as dg

from pipeline import retention
from pipeline.settings import load_settings

RETENTION_KEY = dg.AssetKey("storage_retention")
IN_FLIGHT = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# The metadata in which each asset's materialisation names the folder (or a file in it) it wrote
# or reused: a snapshot, a run folder under artifacts/, a registry version.
PATH_METADATA = ("snapshot_dir", "checkpoint_dir", "onnx_file", "metrics_file", "registry_dir")

storage_retention = dg.AssetSpec(
    RETENTION_KEY,
    group_name="maintenance",
    kinds={"filesystem"},
    owners=["team:recsys-ml"],
    description=(
        "What the `prune_storage` job kept and deleted under `$RECSYS_HOME`: the last "
        "RECSYS_KEEP_VERSIONS registry versions per family plus CURRENT, the snapshots and run "
        "folders their lineage names, the newest snapshot and reuse-cache entries; the rest is "
        "deleted. Metadata: counts, bytes freed and the reason for every folder."
    ),
)


class PruneConfig(dg.Config):
    dry_run: bool = False  # plan and report only; nothing is deleted


def run_in_flight(instance: dg.DagsterInstance, own_run_id: str) -> dg.DagsterRun | None:
    """Another run that is starting, running or cancelling, if any."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=20)
    return next((run for run in runs if run.run_id != own_run_id), None)


def latest_outputs(instance: dg.DagsterInstance) -> dict[str, str]:
    """``{path: reason}`` for the folders named by each asset's latest materialisation."""
    keys = [key for key in instance.get_asset_keys() if key != RETENTION_KEY]
    protect: dict[str, str] = {}
    for key, event in instance.get_latest_materialization_events(keys).items():
        metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
        for value in (metadata[name] for name in PATH_METADATA if name in metadata):
            protect[str(getattr(value, "value", value))] = f"latest materialisation of {key.to_user_string()}"
    return protect


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def outcome_markdown(outcome: retention.Outcome, limit: int = 200) -> str:
    """Every folder with its action and reason, deletions first (at most ``limit`` rows)."""
    busy = {entry.path: why for entry, why in outcome.skipped}
    gone = "would delete" if outcome.dry_run else "deleted"
    rows = [(f"skipped: {busy[e.path]}" if e.path in busy else gone, e) for e in outcome.plan.delete]
    rows += [("kept", e) for e in outcome.plan.keep]
    lines = ["| action | kind | path | size | reason |", "|---|---|---|---|---|"]
    for action, e in rows[:limit]:
        path = e.path.relative_to(outcome.plan.home) if e.path.is_relative_to(outcome.plan.home) else e.path
        lines.append(f"| {action} | {e.kind} | `{path}` | {human_bytes(e.bytes)} | {e.reason} |")
    if len(rows) > limit:
        lines.append(f"| … | | {len(rows) - limit} more | | |")
    return "\n".join(lines + [f"\n{note}" for note in outcome.plan.notes])


def outcome_metadata(outcome: retention.Outcome) -> dict[str, dg.MetadataValue]:
    counts = outcome.counts()
    return {
        "dry_run": dg.MetadataValue.bool(outcome.dry_run),
        "keep_versions": dg.MetadataValue.int(outcome.plan.keep_versions),
        "kept": dg.MetadataValue.int(counts["kept"]),
        "deleted": dg.MetadataValue.int(counts["deleted"]),
        "skipped_in_use": dg.MetadataValue.int(counts["skipped"]),
        "bytes_freed": dg.MetadataValue.int(outcome.bytes_freed),
        "freed": dg.MetadataValue.text(human_bytes(outcome.bytes_freed)),
        "summary": dg.MetadataValue.text(outcome.summary()),
        "reasons": dg.MetadataValue.md(outcome_markdown(outcome)),
        "trash_swept": dg.MetadataValue.json(list(outcome.swept)),
    }


@dg.op(
    name="prune",
    tags={"recsys/maintenance": "retention"},
    description="Deletes registry versions, snapshots and run folders nothing needs (pipeline/retention.py).",
)
def prune(context: dg.OpExecutionContext, config: PruneConfig) -> dg.Output[str]:
    busy = run_in_flight(context.instance, context.run_id)
    if busy is not None:
        message = (f"skipped: run {busy.run_id} ({busy.job_name}) is {busy.status.value}; a run uses "
                   "its snapshot and artifacts between steps too. The next prune tries again.")  # fmt: skip
        context.log.warning(message)
        context.log_event(dg.AssetObservation(RETENTION_KEY, metadata={"skipped": message}))
        return dg.Output(message, metadata={"skipped": message})
    outcome = retention.prune(
        load_settings(), dry_run=config.dry_run, protect=latest_outputs(context.instance), log=context.log
    )
    metadata = outcome_metadata(outcome)
    report = dg.AssetObservation if outcome.dry_run else dg.AssetMaterialization
    context.log_event(report(RETENTION_KEY, metadata=metadata))
    return dg.Output(outcome.summary(), metadata=metadata)


@dg.job(
    name="prune_storage",
    description=(
        "Storage retention: keeps the last RECSYS_KEEP_VERSIONS registry versions per family, "
        "CURRENT, what their lineage needs, the newest snapshot and what running steps hold; "
        "deletes the rest. Skips while another run is in flight. Run config "
        "`ops: {prune: {config: {dry_run: true}}}` only reports."
    ),
)
def prune_storage():
    prune()
