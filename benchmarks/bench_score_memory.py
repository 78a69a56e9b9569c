"""Evaluation memory and time against the scoring budget, per family, on a home the pipeline built.

    python benchmarks/bench_score_memory.py --home ~/recsys-home --families emb_knn,item_knn
    python benchmarks/bench_score_memory.py --home ~/recsys-25m --families emb_knn --budgets 256 \\
        --estimates live

Each (family, budget, estimate) runs ``evaluation.evaluate.evaluate_onnx`` on the family's latest
exported model and the latest training snapshot of the home's Dagster instance, in a fresh child
process, with the budget as its ``score_memory_mb`` (what ``RECSYS_SCORE_MEMORY_MB`` sets), and
prints the wall time, the peak resident memory above what the process held when the evaluation
started (sampled every 10 ms), the graph's bytes per scored row under the estimate, and the main
metrics, which must not depend on the estimate. Estimates:

- ``live``: the peak of the tensors alive at once when the graph's nodes run in order (what the
  pipeline uses, ``export.runtime.graph_bytes_per_row``);
- ``sum``: every per-row tensor of the graph added up, as if all were alive at once (the
  pipeline's estimate before 2026-12-02).

The estimates take turns within each budget, so machine noise lands on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sum_of_row_tensors(model, row_axis: str = "batch", per_axes: tuple[str, ...] = ()) -> int:
    import onnx

    from export.runtime import _row_bytes

    if len(model.graph.value_info) == 0:
        model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    return sum(_row_bytes(v, row_axis, per_axes) for v in [*graph.input, *graph.value_info, *graph.output])


def _latest(home: Path, family: str) -> tuple[Path, Path, str]:
    """(onnx dir, snapshot dir, task) of the home's latest export of ``family`` and snapshot."""
    import dagster as dg

    from models.catalogue import FAMILIES

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:

        def meta(key: str) -> dict:
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            if event is None:
                raise SystemExit(f"{key} was never materialised in {home}; run the pipeline there first")
            return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}

        onnx_dir = Path(meta(f"onnx_{family}")["onnx_file"]).parent
        snapshot = Path(meta("training_snapshot")["snapshot_dir"])
    return onnx_dir, snapshot, FAMILIES[family].task.value


def child(onnx_dir: Path, snapshot: Path, task: str, budget_mb: float, estimate: str) -> dict:
    import onnx
    import psutil

    from evaluation.evaluate import evaluate_onnx
    from export import runtime

    if estimate == "sum":
        runtime.graph_bytes_per_row = _sum_of_row_tensors
    per_axes = ("history",) if task == "rating" else ()
    row_bytes = runtime.graph_bytes_per_row(onnx.load(str(onnx_dir / "model.onnx")), "batch", per_axes)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    metrics = evaluate_onnx(onnx_dir, snapshot, task, budget_mb)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"seconds": round(seconds, 2), "peak_above_start_mib": round((peak[0] - base) / 2**20, 1),
            "row_bytes": row_bytes, "metrics": metrics}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, required=True, help="a RECSYS_HOME the pipeline ran in")
    parser.add_argument("--families", default="emb_knn,item_knn,user_knn_topk,ncf_mlp")
    parser.add_argument("--budgets", default="16,256", help="RECSYS_SCORE_MEMORY_MB values, comma-separated")
    parser.add_argument("--estimates", default="live,sum")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        onnx_dir, snapshot, task, budget, estimate = args.child
        print(json.dumps(child(Path(onnx_dir), Path(snapshot), task, float(budget), estimate)))
        return 0
    home = args.home.expanduser().resolve()
    estimates = [e for e in args.estimates.split(",") if e]
    if set(estimates) - {"live", "sum"}:
        parser.error(f"--estimates: live and/or sum, got {estimates}")
    print("family | budget MiB | estimate | bytes/row | seconds | peak above start MiB | metrics")
    for family in [f for f in args.families.split(",") if f]:
        onnx_dir, snapshot, task = _latest(home, family)
        for budget in [float(b) for b in args.budgets.split(",") if b]:
            for estimate in estimates:
                run = subprocess.run(
                    [sys.executable, __file__, "--home", str(home), "--child", str(onnx_dir), str(snapshot),
                     task, str(budget), estimate],
                    capture_output=True, text=True, env={**os.environ, "RECSYS_HOME": str(home)},
                )  # fmt: skip
                if run.returncode != 0:
                    print(f"{family} | {budget:g} | {estimate} | failed:\n{run.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                shown = ("ndcg@10", "rmse", "auc")
                main_metrics = {k: round(v, 6) for k, v in r["metrics"].items() if k in shown}
                print(f"{family} | {budget:g} | {estimate} | {r['row_bytes']:,} | {r['seconds']} | "
                      f"{r['peak_above_start_mib']} | {main_metrics}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
