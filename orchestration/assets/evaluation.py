"""The baselines every model is measured against, and the leaderboard of all of them."""

import time
from pathlib import Path

import dagster as dg

from common.budget import budget_bytes
from evaluation.evaluate import evaluate_baselines
from evaluation.leaderboard import best_markdown, publish_leaderboard
from models.catalogue import FAMILIES, select_families
from orchestration.assets.metadata import chart_markdown
from orchestration.assets.snapshot import training_snapshot
from pipeline.settings import load_settings


@dg.asset(
    group_name="evaluate",
    ins={"snapshot": dg.AssetIn(training_snapshot.key)},
    code_version="baselines-v1",
    kinds={"python"},
    owners=["team:recsys-ml"],
    description=(
        "Random and popularity baselines for every task, scored on exactly the test rows the "
        "models are scored on. The popularity baseline is the bar a model must beat to be blessed."
    ),
)
def baseline_metrics(context: dg.AssetExecutionContext, snapshot: str):
    settings = load_settings()
    tasks = sorted({FAMILIES[n].task.value for n in select_families(settings.families)})
    memory = budget_bytes(settings.score_memory_mb)
    result = {task: evaluate_baselines(Path(snapshot), task, memory_bytes=memory) for task in tasks}
    return dg.Output(result, metadata={"baselines": dg.MetadataValue.json(result)})


# The resource key of the loader of evaluations for the leaderboard (``orchestration/definitions.py``).
EVAL_LOADER = "latest_evaluation"


@dg.input_manager(required_resource_keys={"io_manager"})
def latest_evaluation(context: dg.InputContext) -> dict | None:
    """A family's evaluation record as the IO manager stored it, or None when the family was
    never evaluated in this instance. The leaderboard spans every family of the definitions,
    but a home may have trained only some (``RECSYS_FAMILIES=wals recsys run``, then
    ``recsys run --select leaderboard``, or the large benchmark's groups): those are left off
    the board instead of failing it on a missing file."""
    if context.instance.get_latest_materialization_event(context.asset_key) is None:
        return None
    return context.resources.io_manager.load_input(context)


def build_leaderboard_asset(family_names: list[str]) -> dg.AssetsDefinition:
    @dg.asset(
        name="leaderboard",
        group_name="evaluate",
        ins={
            **{
                f"eval_{n}": dg.AssetIn(dg.AssetKey(f"eval_{n}"), input_manager_key=EVAL_LOADER)
                for n in family_names
            },
            "baselines": dg.AssetIn(baseline_metrics.key),
            "snapshot": dg.AssetIn(training_snapshot.key),
        },
        kinds={"python"},
        code_version="leaderboard-v1",
        owners=["team:recsys-ml"],
        description=(
            "Every family and baseline on the same split and data version. Metadata: `best` (each "
            "task's best model beside the popularity baseline), `chart` (bar chart of each task's "
            "main metric, also `$RECSYS_HOME/reports/leaderboard.png`), `leaderboard` (every metric "
            "of every model, best in bold) and `json` (`$RECSYS_HOME/reports/leaderboard.json`, one "
            "record per model and metric, with split and data version)."
        ),
    )
    def leaderboard(context: dg.AssetExecutionContext, baselines: dict, snapshot: str,
                    **evals: dict | None):  # fmt: skip
        evaluated = [record for record in evals.values() if record is not None]
        never = sorted(name.removeprefix("eval_") for name, record in evals.items() if record is None)
        if never:
            context.log.info(f"never evaluated in this instance, left off the board: {', '.join(never)}")
        if not evaluated:
            raise dg.Failure(
                "no family was ever evaluated in this instance: materialise at least one eval_<family> "
                "(recsys run) before the leaderboard"
            )
        board = publish_leaderboard(evaluated, baselines, snapshot, load_settings().reports_dir)
        context.log.info("\n" + board.markdown)
        return dg.Output(
            str(board.json_path),
            metadata={
                "best": dg.MetadataValue.md(best_markdown(board.records)),
                "chart": dg.MetadataValue.md(chart_markdown(board.png_path)),
                "leaderboard": dg.MetadataValue.md(board.markdown),
                "json": dg.MetadataValue.path(str(board.json_path)),
                "chart_png": dg.MetadataValue.path(str(board.png_path)),
                "split": board.split,
                "data_version": board.data_version,
                "records": len(board.records),
                "never_evaluated": ", ".join(never) or "none",
                "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    return leaderboard
