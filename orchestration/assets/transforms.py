"""The dbt project in ``transforms/`` as Dagster assets; dbt tests appear as asset checks."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from common.io import exclusive_lock
from orchestration.resources import WarehouseResource
from pipeline.dbt_selection import SubsetSelection, subset_selection
from pipeline.settings import DBT_PROJECT_DIR, SPLITS, load_settings
from pipeline.warehouse_spark import export_raw, raw_dir, tables_dir

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
# The dbt installed beside this interpreter, so an unactivated virtualenv works too.
_venv_dbt = Path(sys.executable).with_name("dbt")
DBT_EXECUTABLE = str(_venv_dbt) if _venv_dbt.exists() else "dbt"


def export_dbt_env() -> None:
    """The dbt profile reads the warehouse path from the environment of its subprocess."""
    os.environ.update(load_settings().dbt_env())


def _manifest_is_stale(project: DbtProject) -> bool:
    manifest = Path(project.manifest_path)
    if not manifest.exists():
        return True
    if _manifest_adapter(manifest) != load_settings().warehouse_engine:
        return True  # parsed for the other engine (RECSYS_WAREHOUSE): its kinds and configs differ
    built = manifest.stat().st_mtime
    root = Path(project.project_dir)
    sources = [root / "dbt_project.yml", *root.glob("models/**/*"), *root.glob("macros/**/*"),
               *root.glob("tests/**/*")]  # fmt: skip
    return any(p.is_file() and p.stat().st_mtime > built for p in sources)


def _manifest_adapter(manifest: Path) -> str | None:
    """The adapter type (``duckdb`` / ``spark``) a manifest was parsed for, from its metadata."""
    try:
        with manifest.open() as f:
            return json.load(f).get("metadata", {}).get("adapter_type")
    except (OSError, ValueError):
        return None


def ensure_manifest(project: DbtProject = dbt_project) -> Path:
    """Parse the dbt project when its manifest is missing or older than its sources.

    dagster-dbt needs ``manifest.json`` when the definitions load; ``prepare_if_dev`` only
    acts under ``dagster dev``, so a fresh clone running tests or ``dagster asset
    materialize`` would otherwise fail to load.
    """
    export_dbt_env()
    manifest = Path(project.manifest_path)
    # Processes that load the definitions together (a webserver and a daemon, parallel test
    # workers) would otherwise parse at once and one could read the other's half-written file.
    with exclusive_lock(manifest.parent / ".parse.lock"):
        if _manifest_is_stale(project):
            cmd = [DBT_EXECUTABLE, "parse", "--quiet", "--project-dir", str(project.project_dir),
                   "--profiles-dir", str(project.profiles_dir)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"`dbt parse` of {project.project_dir} failed; fix the dbt project first:\n"
                    f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
                )
    return manifest


class RecsysDbtTranslator(DagsterDbtTranslator):
    """Groups dbt models by layer (staging / intermediate / marts) as the UI's stages."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        fqn = dbt_resource_props.get("fqn", [])
        if dbt_resource_props.get("resource_type") == "model" and len(fqn) > 2:
            return fqn[1]
        return super().get_group_name(dbt_resource_props)

    def get_owners(self, dbt_resource_props: Mapping[str, Any]):
        return ["team:recsys-data"]


class DbtBuildConfig(dg.Config):
    """Per-run override of the split; empty means RECSYS_SPLIT."""

    split: str | None = None


@dbt_assets(
    manifest=ensure_manifest(),
    project=dbt_project,
    name="transforms",
    dagster_dbt_translator=RecsysDbtTranslator(
        settings=DagsterDbtTranslatorSettings(enable_code_references=True)
    ),
    pool="duckdb_warehouse",
    op_tags={"recsys/warehouse": "duckdb"},
)
def transforms(
    context: dg.AssetExecutionContext,
    dbt: DbtCliResource,
    warehouse: WarehouseResource,
    config: DbtBuildConfig,
):
    settings = load_settings()
    split = config.split or settings.split
    if split not in SPLITS:
        raise dg.Failure(f"run config split={split!r} is not one of {', '.join(SPLITS)}.")
    export_dbt_env()
    if settings.warehouse_engine == "spark":
        _export_raw_for_spark(context, warehouse, settings)
    dbt_vars = settings.dbt_vars(split)
    subset = _subset_selection(context, settings)
    context.log.info(f"dbt build on {settings.warehouse_engine} with vars {dbt_vars}")
    with _indirect_selection(subset.indirect_selection):
        invocation = dbt.cli(["build", "--vars", json.dumps(dbt_vars), *subset.args()], context=context,
                             raise_on_error=False)  # fmt: skip
        # Held back until dbt has exited: the row counts below need the warehouse file, which
        # the dbt process holds open while it runs (DuckDB: one process at a time).
        events = list(invocation.stream())
    counts = _row_counts(warehouse, events) if invocation.is_successful() else {}
    selected = set(context.selected_output_names)
    yield from _with_metadata(events, selected, counts, split, settings.warehouse_engine)
    if not invocation.is_successful():
        _raise_dbt_failure(context, invocation, settings)


def _with_metadata(events: list, selected: set[str], counts: dict[str, int], split: str, engine: str):
    """dbt's events, each model's output with its row count, the split and the engine."""
    for event in events:
        if isinstance(event, dg.Output) and event.output_name not in selected:
            continue  # mart_build_info, rebuilt beside a mart subset so it never goes stale
        if isinstance(event, dg.Output):
            extra = {"dagster/row_count": counts[event.output_name], "split": split} if (
                event.output_name in counts) else {}  # fmt: skip
            event = event.with_metadata({**event.metadata, **extra, "warehouse": engine})
        yield event


def _export_raw_for_spark(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings) -> None:
    """raw.* as validated in DuckDB, written to the parquet files Spark's sources read."""
    with warehouse.connect(read_only=True) as con:
        rows = export_raw(con, settings)
    context.log.info(f"raw tables exported for Spark to {raw_dir(settings)}: {rows}")


def _subset_selection(context: dg.AssetExecutionContext, settings) -> SubsetSelection:
    """A subset runs each multi-parent dbt test whose parents are selected or already built.

    On Spark the built models are not in the DuckDB file, so none counts as built there: a
    subset then runs the tests inside it (cautious selection) and none that reach an older build.
    """
    manifest = json.loads(Path(dbt_project.manifest_path).read_text())
    built = settings.warehouse if settings.warehouse_engine == "duckdb" else tables_dir(settings) / "none"
    subset = subset_selection(manifest, {k.path[-1] for k in context.selected_asset_keys}, built)
    if subset.indirect_selection:
        context.log.info(
            f"dbt subset build: indirect selection {subset.indirect_selection}, plus "
            f"{', '.join(subset.extra_select) or 'nothing'} (tests whose other parents are already built)"
        )
    return subset


@contextmanager
def _indirect_selection(mode: str | None) -> Iterator[None]:
    """DBT_INDIRECT_SELECTION for the dbt process started inside; dagster-dbt's own override
    (``empty``, when checks are picked one by one) still wins."""
    if mode is None:
        yield
        return
    before = os.environ.get("DBT_INDIRECT_SELECTION")
    os.environ["DBT_INDIRECT_SELECTION"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DBT_INDIRECT_SELECTION", None)
        else:
            os.environ["DBT_INDIRECT_SELECTION"] = before


def _raise_dbt_failure(context: dg.AssetExecutionContext, invocation, settings) -> None:
    error = invocation.get_error() or dg.Failure("dbt build failed; see the dbt logs above.")
    locked = _lock_conflict(str(error))
    if locked is None:
        raise error
    failure = dg.Failure(
        f"dbt could not open the warehouse {settings.warehouse}: another process holds it "
        f"({locked}). DuckDB allows one writing process per file. If it is a DuckDB shell or "
        "notebook, close it; if it is another Dagster run, give the `duckdb_warehouse` pool a "
        "limit of 1 (`concurrency: pools: default_limit: 1` in $DAGSTER_HOME/dagster.yaml, "
        "as `recsys` writes it). The raw tables and marts are unchanged."
    )
    if context.retry_number < LOCK_RETRIES:
        context.log.warning(f"{failure.description} Retrying in {LOCK_RETRY_SECONDS} s.")
        raise dg.RetryRequested(max_retries=LOCK_RETRIES, seconds_to_wait=LOCK_RETRY_SECONDS) from failure
    raise failure from error


# A lock held by something outside Dagster (a DuckDB shell) is often released soon: wait a
# little before failing. Runs inside Dagster never collide here when the pool is configured.
LOCK_RETRIES = 2
LOCK_RETRY_SECONDS = 15
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in [^\n]*?\(PID \d+\)")


def _lock_conflict(text: str) -> str | None:
    """The holder named by DuckDB's lock error in ``text`` ("... (PID 123)"), else None."""
    if "Could not set lock on file" not in text:
        return None
    holder = _LOCK_HOLDER.search(text)
    return holder.group(0) if holder else "DuckDB did not say which process"


def _row_counts(warehouse: WarehouseResource, events: list) -> dict[str, int]:
    """Rows of every model dbt built, keyed by output name (on Spark: its tables; a view there
    has no files to count)."""
    relations = {
        e.output_name: str(e.metadata["unique_id"].value).rsplit(".", 1)[-1]
        for e in events
        if isinstance(e, dg.Output) and "unique_id" in e.metadata
    }
    with warehouse.connect_marts() as con:
        present = {
            r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }  # fmt: skip
        return {
            name: con.execute(f'SELECT count(*) FROM main."{relation}"').fetchone()[0]
            for name, relation in relations.items()
            if relation in present
        }
