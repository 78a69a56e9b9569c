"""benchmarks/bench_peers.py on a tiny snapshot: the project side always (each family's fit, the
pipeline's ONNX export + onnxruntime evaluation, and the same evaluator on the torch scorer); the
peer side only where the peer library is installed (the `peers` extra; CI installs `.[dev]`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from test_models import write_tiny_snapshot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_peers  # noqa: E402

from common.metrics import MAIN_METRIC, auc, evaluate_topk, interaction_matrix, rmse  # noqa: E402
from evaluation.evaluate import evaluate_baselines  # noqa: E402
from models import mf_sgd  # noqa: E402
from models.data import Snapshot  # noqa: E402


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return write_tiny_snapshot(tmp_path_factory.mktemp("peers") / "snapshots" / "tiny")


@pytest.fixture(autouse=True)
def pipeline_env(recsys_home, monkeypatch):
    """The pipeline's settings at their defaults: families.toml only, CPU."""
    for var in ("RECSYS_MODEL_CONFIG", "RECSYS_TORCH_THREADS", "RECSYS_DEVICE", "RECSYS_STREAM_BUFFER_ROWS"):
        monkeypatch.delenv(var, raising=False)


def _baselines(snapshot: Path) -> dict:
    return {task: evaluate_baselines(snapshot, task) for task in ("rating", "topk", "ctr")}


def _beats(task: str, value: float, baseline: float) -> bool:
    return value < baseline if MAIN_METRIC[task][1] == "min" else value > baseline


def test_project_side_of_every_pair(snapshot, capsys):
    results = bench_peers.main(
        ["--snapshot", str(snapshot), "--ours-only", "--eval", "torch", "--repeats", "2"]
    )
    baselines = _baselines(snapshot)
    assert [r["pair"] for r in results] == list(bench_peers.PAIRS)
    for r in results:
        task, metric = r["task"], r["metric"]
        assert metric == MAIN_METRIC[task][0]
        assert len(r["ours"]) == 2 and r["peer"] == [] and "--ours-only" in r["peer_name"]
        values = [round(rnd["metrics"][metric], 9) for rnd in r["ours"]]
        # seeded fits on one thread: the two repeats are the same model
        assert values[0] == values[1] and math.isfinite(values[0]), (r["pair"], values)
        assert all(rnd["fit_s"] > 0 for rnd in r["ours"])
        # the rating families beat the random baseline on the same rows (the tiny snapshot's
        # items are drawn uniformly and its CTR fields are noise: nothing to rank there beyond
        # chance, so the top-K and CTR metrics are recomputed from the scores below instead)
        if task == "rating":
            assert _beats(task, values[0], baselines[task]["random"][metric]), (r["pair"], values[0])
    out = capsys.readouterr().out
    assert "| mf_sgd |" in out and "| deepfm |" in out and "peer not run: --ours-only" in out


def test_rating_metric_is_the_evaluators_on_warm_rows(snapshot):
    """The torch path scores the same rows as the pipeline: RMSE of mf_sgd's own predictions
    over the test rows whose user and item are known."""
    model, _ = bench_peers.fit_ours("mf_sgd", snapshot, 1)
    metrics = bench_peers.evaluate_ours(model, "mf_sgd", snapshot, "torch", snapshot.parent)
    test = Snapshot(snapshot).ratings("test")
    warm = (test.user_idx > 0) & (test.item_idx > 0)
    assert 0 < (~warm).sum() < len(test)  # the tiny snapshot has cold rows: the mask matters
    pred = model.score(test.user_idx[warm], test.item_idx[warm]).numpy()
    assert metrics["rmse"] == pytest.approx(rmse(test.rating[warm], pred), abs=1e-9)
    assert metrics["n_rows_cold"] == int((~warm).sum())
    assert isinstance(model.config, mf_sgd.Config) and model.config == mf_sgd.Config()


def test_ctr_metric_is_the_evaluators_on_every_test_row(snapshot):
    model, _ = bench_peers.fit_ours("deepfm", snapshot, 1)
    metrics = bench_peers.evaluate_ours(model, "deepfm", snapshot, "torch", snapshot.parent)
    test = Snapshot(snapshot).ctr("test")
    logits = model.score(test.sparse, test.dense).numpy()
    assert metrics["auc"] == pytest.approx(auc(test.label_like, logits), abs=1e-9)
    assert len(logits) == Snapshot(snapshot).meta["split_rows"]["test"]


def test_topk_metric_is_the_evaluators_on_known_test_users(snapshot):
    model, _ = bench_peers.fit_ours("wals", snapshot, 1)
    metrics = bench_peers.evaluate_ours(model, "wals", snapshot, "torch", snapshot.parent)
    snap = Snapshot(snapshot)
    test = snap.ratings("test")
    keep = (test.user_idx > 0) & (test.item_idx > 0)
    relevant = interaction_matrix(test.user_idx[keep], test.item_idx[keep], snap.n_users, snap.n_items)
    users = np.unique(test.user_idx[keep])
    scores = model.score(users).numpy()
    expected = evaluate_topk(scores, snap.train_matrix("ones"), relevant, users=users)
    assert metrics["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9)
    assert metrics["n_users"] == expected["n_users"] > 0


@pytest.mark.parametrize("name", ["mf_sgd", "item_knn", "deepfm"])
def test_onnx_and_torch_evaluation_agree(snapshot, tmp_path, name):
    """--eval onnx is the pipeline's export (parity gate) + onnxruntime evaluation; --eval torch
    the same evaluator on the torch scorer: the same metrics up to float rounding."""
    model, _ = bench_peers.fit_ours(name, snapshot, 1)
    onnx = bench_peers.evaluate_ours(model, name, snapshot, "onnx", tmp_path)
    torch_ = bench_peers.evaluate_ours(model, name, snapshot, "torch", tmp_path)
    assert (tmp_path / name / "onnx" / "model.onnx").is_file()
    assert onnx.keys() == torch_.keys()
    for key, value in onnx.items():
        assert torch_[key] == pytest.approx(value, abs=1e-4), key


def test_snapshot_selection(snapshot, tmp_path, capsys):
    newer = write_tiny_snapshot(snapshot.parent / "newer", seed=1)
    assert bench_peers.newest_snapshot(snapshot.parent.parent) == newer
    with pytest.raises(SystemExit, match="no snapshot under"):
        bench_peers.newest_snapshot(tmp_path)
    with pytest.raises(SystemExit, match="meta.json is missing"):
        bench_peers.main(["--snapshot", str(tmp_path), "--pairs", "wals"])
    with pytest.raises(SystemExit):
        bench_peers.main(["--snapshot", str(snapshot), "--pairs", "wals,nope"])
    assert "--pairs takes" in capsys.readouterr().err


def test_summary_signs_the_gap_by_the_metric_direction():
    def result(task, ours, peer):
        metric = MAIN_METRIC[task][0]
        side = lambda v: [{"fit_s": 2.0, "eval_s": 0.1, "metrics": {metric: v}}]  # noqa: E731
        return {"pair": "x", "task": task, "metric": metric, "ours": side(ours), "peer": side(peer),
                "peer_name": "p"}  # fmt: skip

    rating = bench_peers.summary(result("rating", 0.90, 0.88))  # higher RMSE: ours trails
    assert rating["gap_pct"] == pytest.approx(100 * 0.02 / 0.88) and rating["ratio"] == 1.0
    ctr = bench_peers.summary(result("ctr", 0.80, 0.78))  # higher AUC: ours leads
    assert ctr["gap_pct"] == pytest.approx(-100 * 0.02 / 0.78)


@pytest.mark.parametrize("name", list(bench_peers.PAIRS))
def test_peer_side(snapshot, tmp_path, name):
    pytest.importorskip(bench_peers.PAIRS[name].library)
    pytest.importorskip("threadpoolctl")
    args = bench_peers.parse_args(["--snapshot", str(snapshot), "--eval", "torch"])
    result = bench_peers.run_pair(name, snapshot, args, tmp_path, print_=lambda _s: None)
    task, metric = result["task"], result["metric"]
    assert len(result["peer"]) == 1 and result["peer_params"]
    value = result["peer"][0]["metrics"][metric]
    assert math.isfinite(value) and value > 0
    if task == "rating":
        assert _beats(task, value, _baselines(snapshot)[task]["random"][metric]), (name, value)
    else:
        assert value <= 1
    # the peer is scored on exactly the rows ours is scored on
    for key in ("n_rows_cold", "n_users", "n_users_skipped"):
        if key in result["ours"][0]["metrics"]:
            assert result["peer"][0]["metrics"][key] == result["ours"][0]["metrics"][key], key
    assert np.isfinite(bench_peers.summary(result)["gap_pct"])
