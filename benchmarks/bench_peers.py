"""The project's families beside peer libraries, fitted on the same snapshot rows and scored by
the same evaluator: fit seconds and the task's main metric, ours and the peer alternated.

    python benchmarks/bench_peers.py                                 # default data (100k events)
    python benchmarks/bench_peers.py --snapshot $RECSYS_HOME/snapshots/<hash> --repeats 3
    python benchmarks/bench_peers.py --home $RECSYS_HOME             # its newest snapshot
    python benchmarks/bench_peers.py --events 1000000 --keep /tmp/peers-1m --pairs wals,mf_sgd

Needs the `peers` extra for the peer side (`pip install -e '.[peers]'`: implicit,
scikit-surprise, deepctr-torch); a pair whose library is missing runs ours only and says so.

Data: a training snapshot the pipeline wrote (`pipeline/snapshot.py`; any source, any split),
chosen with --snapshot, or the newest under --home's `snapshots/`, or built from the synthetic
generator (--events, default 100,000 = the pipeline's default data) by ingest, `dbt run` and
a snapshot in a temp dir (--keep DIR keeps and reuses it), as `bench_models.py` does. Every
fit reads the snapshot's train rows (`fct_ratings` / `fct_ctr_samples` where split = 'train');
nothing is re-split here.

Ours: the family's `fit` as `pipeline.steps.train` calls it: its Config from
models/families.toml and RECSYS_MODEL_CONFIG (`pipeline.family_config`), inside a
`models.runtime.Runtime` on CPU with --threads threads (RECSYS_TORCH_THREADS otherwise). Its
metric (--eval):
- `onnx` (default): the pipeline's export and evaluation, `export.family_export.export_family`
  (ONNX + parity gate) then `evaluation.evaluate.evaluate_onnx` on the test split, as
  `pipeline/steps.py` does (without the reuse cache);
- `torch`: the same evaluator functions (`evaluation.evaluate.EVALUATORS`: the same rows,
  masks and `common/metrics.py` code) on the fitted torch scorer instead of onnxruntime; the
  parity gate bounds the difference (tests/test_bench_peers.py checks both agree).
Peers: fitted on the same train rows; their predictions go through the same
`evaluation.evaluate.EVALUATORS` function as ours (`peer_fits.py`), so the rows and metric code
are identical: RMSE on warm test rows (user and item seen in train), NDCG@10 with full
ranking over items not seen in train for every test user, AUC over every test CTR row.

Pairs and the hyper-parameter mapping (ours -> peer; anything not listed is the peer's default):
- `mf_sgd` vs Surprise `SVD`: dim -> n_factors, reg -> reg_all (both regularise per rating:
  ours adds reg * (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2) to each rating's squared error, as Surprise
  does), init_std -> init_std_dev, seed -> random_state, biased. The optimisers differ (ours:
  mini-batch SGD with momentum, lr 0.3 over a batch mean of 256, early stopping on valid RMSE
  with a 40-epoch cap; Surprise: per-rating SGD without validation), so lr and epochs do not
  map: Surprise keeps its defaults lr_all 0.005 and n_epochs 20 (--svd-lr, --svd-epochs).
- `item_knn` / `user_knn` vs Surprise `KNNWithMeans(user_based=False / True)`: k -> k,
  min_k 1 (ours falls back to the mean when no neighbour qualifies, Surprise's min_k=1),
  shrink -> shrinkage of `pearson_baseline` (Surprise's only shrunk similarity; --surprise-sim
  pearson or cosine takes none). Both average positive-similarity neighbours' mean-centred
  ratings around the target's mean.
- `wals` vs implicit `AlternatingLeastSquares`: the same objective (confidence w / omega0 with
  WALS' w = 1 + alpha log(1 + c / eps), regularization lam / omega0), dim -> factors,
  iterations, cg_steps, threads -> num_threads, seed -> random_state. Ours keeps the best of
  its sweeps by valid NDCG@10; implicit runs all sweeps.
- `user_knn_topk` vs implicit `CosineRecommender` (item-item cosine, binary train matrix): k
  -> K, threads. Not the same algorithm (implicit has no user-user kNN, and the project has no
  item-item top-K family): the closest neighbour recommender on the same rows.
- `deepfm` vs DeepCTR-Torch `DeepFM` on the snapshot's sparse and dense fields: embed_dim ->
  embedding_dim, hidden -> dnn_hidden_units, dropout -> dnn_dropout, embedding_reg ->
  l2_reg_embedding, lr (Adam), batch_size, epochs, patience (EarlyStopping on val_auc, best
  weights kept), seed. DeepCTR applies its L2 to whole tables each batch and sums the batch
  loss; ours penalises the rows a batch touches and averages.
Threads: --threads (default 1) for ours (torch intra-op threads, WALS' block threads) and the
peers (implicit's num_threads, torch threads for DeepCTR; Surprise is single-threaded); BLAS is
held to one thread while implicit runs (threadpoolctl).

Timing: each repeat fits ours, then the peer (--repeats N: ours, peer, ours, peer, ...), in one
process, so the machine's load moves both alike; the table gives medians and their ratio. "fit
s" is the fit alone (ours includes its in-fit validation, as in the pipeline); scoring is timed
apart. The load average is printed beside every round.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_fits  # noqa: E402
import torch  # noqa: E402

from common.metrics import MAIN_METRIC  # noqa: E402
from models.catalogue import FAMILIES  # noqa: E402
from models.config import parse_config  # noqa: E402
from models.data import Snapshot, SnapshotError  # noqa: E402
from models.runtime import use_runtime  # noqa: E402


@dataclass(frozen=True)
class Pair:
    family: str
    library: str  # import name of the peer library
    fit: Callable[..., peer_fits.PeerModel]  # fit(snapshot, our config, threads, args)


PAIRS: dict[str, Pair] = {
    "mf_sgd": Pair("mf_sgd", "surprise", lambda s, c, t, a: peer_fits.fit_surprise_svd(
        s, c, t, epochs=a.svd_epochs, lr=a.svd_lr)),
    "item_knn": Pair("item_knn", "surprise", lambda s, c, t, a: peer_fits.fit_surprise_knn(
        s, c, t, user_based=False, sim=a.surprise_sim)),
    "user_knn": Pair("user_knn", "surprise", lambda s, c, t, a: peer_fits.fit_surprise_knn(
        s, c, t, user_based=True, sim=a.surprise_sim)),
    "wals": Pair("wals", "implicit", lambda s, c, t, a: peer_fits.fit_implicit_als(s, c, t)),
    "user_knn_topk": Pair("user_knn_topk", "implicit", lambda s, c, t, a: peer_fits.fit_implicit_cosine(
        s, c, t)),
    "deepfm": Pair("deepfm", "deepctr_torch", lambda s, c, t, a: peer_fits.fit_deepctr_deepfm(s, c, t)),
}  # fmt: skip


# --- data ---------------------------------------------------------------------------------
def newest_snapshot(home: Path) -> Path:
    """The most recently written snapshot under ``home/snapshots`` (by its meta.json)."""
    metas = sorted((home / "snapshots").glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not metas:
        raise SystemExit(
            f"no snapshot under {home / 'snapshots'}: materialise `training_snapshot` with "
            f"RECSYS_HOME={home} (e.g. `recsys run`), or pass --snapshot DIR"
        )
    return metas[-1].parent


def resolve_snapshot(args, tmp: Path) -> Path:
    if args.snapshot:
        path = Path(args.snapshot).resolve()
    elif args.home:
        path = newest_snapshot(Path(args.home).resolve())
    else:
        from bench_models import prepare

        path = prepare(args.events, Path(args.keep).resolve() if args.keep else tmp / "data")
    try:
        Snapshot(path)
    except SnapshotError as e:
        raise SystemExit(str(e)) from e
    return path


# --- ours ---------------------------------------------------------------------------------
def family_config(name: str):
    """The family's Config as the pipeline parses it (families.toml, then RECSYS_MODEL_CONFIG)."""
    from pipeline.family_config import family_configs
    from pipeline.settings import load_settings

    family = FAMILIES[name]
    return parse_config(family.config_cls, family_configs(load_settings()).get(name, {}))


def runtime(threads: int | None):
    """The pipeline's training runtime on CPU (the peers run on CPU), with ``threads`` if given."""
    from pipeline.settings import load_settings
    from pipeline.steps import training_runtime

    rt = training_runtime(load_settings(), "cpu")
    return dataclasses.replace(rt, threads=threads) if threads else rt


def fit_ours(name: str, snapshot: Path, threads: int | None, log=lambda _msg: None):
    """(model, fit seconds): ``family.fit`` inside the runtime, as ``pipeline.steps.train``."""
    family = FAMILIES[name]
    config = family_config(name)
    with use_runtime(runtime(threads)):
        start = time.perf_counter()
        model = family.fit(Snapshot(snapshot), config, log)
        return model, time.perf_counter() - start


class TorchScorer:
    """A fitted model's torch scorer behind ``OrtScorer``'s interface (``--eval torch``)."""

    batch_size = 4096  # rows per call at most, as OrtScorer's default

    def __init__(self, model):
        spec = model.export_spec()
        self.inputs = [t.name for t in spec.inputs]
        self.output = spec.outputs[0].name
        self.model = model

    def bytes_per_row(self, *per_axes: str) -> int:
        """A bound of what one row of a call holds, for the evaluator's chunking: the scores
        and their temporaries for a top-K scorer, the k x history match for item_knn's."""
        if self.model.task.value == "topk":
            return 16 * int(self.model.meta["n_items"])
        return 16 * int(self.model.meta.get("k", 1)) if "history" in per_axes else 64

    def run(self, **feeds) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model.score(*(torch.from_numpy(np.asarray(feeds[n])) for n in self.inputs))
        return {self.output: out.numpy()}

    def signature(self) -> dict:
        spec = self.model.export_spec()
        return {"inputs": [{"name": t.name, "shape": list(t.shape)} for t in spec.inputs],
                "outputs": [{"name": self.output}]}  # fmt: skip


def evaluate_ours(model, name: str, snapshot: Path, mode: str, workdir: Path) -> dict:
    """Test metrics of a fitted family: the pipeline's export + onnxruntime evaluation, or the
    same evaluator on the torch scorer (module docstring)."""
    from evaluation.evaluate import EVALUATORS, evaluate_onnx

    family = FAMILIES[name]
    if mode == "torch":
        scorer = TorchScorer(model)
        return EVALUATORS[family.task.value](scorer, scorer.signature(), Snapshot(snapshot))
    from export.family_export import export_family

    model_dir = model.save(workdir / name / "model")
    out = workdir / name / "onnx"
    result = export_family(family=family, model_dir=model_dir, snapshot_dir=snapshot, out_dir=out,
                           run_id="bench_peers")  # fmt: skip
    if not result.parity_passed:
        raise SystemExit(f"{name}: the ONNX parity gate failed:\n{result.parity_markdown}")
    return evaluate_onnx(out, snapshot, family.task.value)


def evaluate_peer(peer: peer_fits.PeerModel, task: str, snapshot: Path) -> dict:
    from evaluation.evaluate import EVALUATORS

    return EVALUATORS[task](peer.scorer, peer.scorer.signature(), Snapshot(snapshot))


# --- the run ------------------------------------------------------------------------------
def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"


def dense_knn_bytes(snapshot: Path, user_based: bool) -> int:
    """Surprise's KNN holds a dense n x n float64 similarity (n users or items)."""
    snap = Snapshot(snapshot)
    n = snap.n_users if user_based else snap.n_items
    return 8 * n * n


def peer_skip_reason(name: str, snapshot: Path) -> str | None:
    pair = PAIRS[name]
    if importlib.util.find_spec(pair.library) is None:
        return f"{peer_fits.LIBRARIES[pair.library]} is not installed (pip install -e '.[peers]')"
    if name in ("user_knn", "item_knn"):
        import psutil

        need, free = dense_knn_bytes(snapshot, name == "user_knn"), psutil.virtual_memory().available
        if need > free / 2:
            return (f"Surprise KNNWithMeans holds a dense float64 similarity of {need / 2**30:.1f} GiB, "
                    f"more than half the {free / 2**30:.1f} GiB available")  # fmt: skip
    return None


def run_pair(name: str, snapshot: Path, args, workdir: Path, print_=print) -> dict:
    """Ours and the peer alternated ``args.repeats`` times; per side the fit seconds, scoring
    seconds and the metrics of every repeat."""
    pair = PAIRS[name]
    task = FAMILIES[name].task.value
    metric = MAIN_METRIC[task][0]
    skip = "--ours-only" if args.ours_only else peer_skip_reason(name, snapshot)
    sides = {"ours": [], "peer": []}
    peer_name, peer_params, ours_epochs = None, None, None
    for rnd in range(1, args.repeats + 1):
        model, fit_s = fit_ours(name, snapshot, args.threads)
        start = time.perf_counter()
        metrics = evaluate_ours(model, name, snapshot, args.eval, workdir / f"round{rnd}")
        sides["ours"].append({"fit_s": fit_s, "eval_s": time.perf_counter() - start, "metrics": metrics})
        ours_epochs = len(model.history)
        print_(f"  {name} round {rnd} ours: fit {fit_s:.2f} s, {metric} {metrics[metric]:.4f}, "
               f"{ours_epochs} epoch(s) [{load()}]")  # fmt: skip
        del model
        if skip:
            continue
        start = time.perf_counter()
        peer = pair.fit(Snapshot(snapshot), family_config(name), args.threads or 1, args)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate_peer(peer, task, snapshot)
        sides["peer"].append({"fit_s": fit_s, "eval_s": time.perf_counter() - start, "metrics": metrics,
                              "info": peer.info})  # fmt: skip
        peer_name, peer_params = peer.name, peer.params
        extra = "".join(f", {k} {v}" for k, v in peer.info.items() if v is not None)
        print_(f"  {name} round {rnd} peer ({peer.name}): fit {fit_s:.2f} s, {metric} "
               f"{metrics[metric]:.4f}{extra} [{load()}]")  # fmt: skip
    return {"pair": name, "task": task, "metric": metric, "ours": sides["ours"], "peer": sides["peer"],
            "peer_name": peer_name or f"peer not run: {skip}", "peer_params": peer_params,
            "ours_epochs": ours_epochs, "config": dataclasses.asdict(family_config(name))}  # fmt: skip


def summary(result: dict) -> dict:
    """Medians over repeats, the time ratio and the metric gap (positive = ours worse)."""
    metric = result["metric"]
    higher = MAIN_METRIC[result["task"]][1] == "max"

    def side(rounds):
        if not rounds:
            return None
        values = [r["metrics"][metric] for r in rounds]
        return {"fit_s": statistics.median(r["fit_s"] for r in rounds),
                "eval_s": statistics.median(r["eval_s"] for r in rounds),
                "metric": statistics.median(values), "spread": max(values) - min(values)}  # fmt: skip

    ours, peer = side(result["ours"]), side(result["peer"])
    out = {"ours": ours, "peer": peer, "ratio": None, "gap_pct": None}
    if peer:
        out["ratio"] = ours["fit_s"] / peer["fit_s"]
        diff = (peer["metric"] - ours["metric"]) if higher else (ours["metric"] - peer["metric"])
        out["gap_pct"] = 100.0 * diff / abs(peer["metric"])
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| ours | fit s | eval s | metric | peer | fit s | eval s | metric | fit time ours / peer | "
        "ours trails by |",
        "|---|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for r in results:
        s = summary(r)
        o, p = s["ours"], s["peer"]
        m = r["metric"]
        row = f"| {r['pair']} | {o['fit_s']:.2f} | {o['eval_s']:.2f} | {m} {o['metric']:.4f} | "
        row += f"{r['peer_name']} | "
        if p:
            row += (f"{p['fit_s']:.2f} | {p['eval_s']:.2f} | {m} {p['metric']:.4f} | {s['ratio']:.2f} | "
                    f"{s['gap_pct']:+.2f} % |")  # fmt: skip
        else:
            row += "– | – | – | – | – |"
        lines.append(row)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--snapshot", help="a snapshot folder (meta.json + parquet marts)")
    where.add_argument("--home", help="a RECSYS_HOME: its newest snapshot")
    parser.add_argument("--events", type=int, default=100_000, help="synthetic size when building data")
    parser.add_argument("--keep", help="build the synthetic data here (reused when already there)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--repeats", type=int, default=1, help="ours, peer, ours, peer, ... per pair")
    parser.add_argument("--threads", type=int, default=1, help="threads for ours and the peer")
    parser.add_argument("--eval", choices=("onnx", "torch"), default="onnx", help="how ours is scored")
    parser.add_argument("--ours-only", action="store_true", help="skip the peers")
    parser.add_argument("--svd-epochs", type=int, default=20, help="Surprise SVD n_epochs (its default)")
    parser.add_argument("--svd-lr", type=float, default=0.005, help="Surprise SVD lr_all (its default)")
    parser.add_argument("--surprise-sim", default="pearson_baseline", choices=("pearson_baseline", "pearson",
                        "cosine", "msd"), help="Surprise KNNWithMeans similarity")  # fmt: skip
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in PAIRS]
    if unknown or args.repeats < 1 or args.threads < 1:
        parser.error(f"--pairs takes {', '.join(PAIRS)} (got {unknown}); --repeats and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        snapshot = resolve_snapshot(args, Path(tmp))
        meta = Snapshot(snapshot).meta
        print(f"snapshot {snapshot}: {meta['n_users'] - 1:,} users x {meta['n_items'] - 1:,} items, "
              f"split {meta.get('split')}, rows {meta.get('split_rows')}; torch {torch.__version__}, "
              f"{args.threads} thread(s) each, eval {args.eval}, {args.repeats} repeat(s) [{load()}]",
              flush=True)  # fmt: skip
        results = []
        for name in args.names:
            print(f"{name}:", flush=True)
            result = run_pair(name, snapshot, args, Path(tmp) / "work", lambda s: print(s, flush=True))
            if result["peer_params"]:
                print(f"  peer params: {result['peer_params']}", flush=True)
            results.append(result)
    print(f"\n[{load()}]\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
