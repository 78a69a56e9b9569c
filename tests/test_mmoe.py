"""MMoE (models/mmoe.py) on the tiny planted snapshot of test_models: gates, the two-task
output, ONNX export + parity, per-task onnxruntime metrics, baselines with the same keys,
leaderboard and blessing on the multitask main metric."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_models import write_tiny_snapshot
from torch import nn

from common.metrics import MAIN_METRIC, evaluate_ctr
from evaluation.evaluate import evaluate_baselines, evaluate_onnx
from evaluation.leaderboard import (
    leaderboard_markdown,
    leaderboard_png,
    leaderboard_records,
    write_leaderboard_json,
)
from export.family_export import export_family
from export.registry import bless
from models import mmoe
from models.catalogue import FAMILIES
from models.config import ConfigError, parse_config
from models.data import Snapshot

FAST = {"epochs": 3}
PER_TASK = [f"{m}_{t}" for t in mmoe.TASKS for m in ("auc", "logloss", "gauc")]


@pytest.fixture(scope="module")
def snap_dir(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("mmoe_snap"))


@pytest.fixture(scope="module")
def model(snap_dir):
    return mmoe.fit(Snapshot(snap_dir), parse_config(mmoe.Config, FAST), lambda _: None)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmoe_export")
    model.save(out / "model")
    return out


@pytest.fixture(scope="module")
def export_result(exported, snap_dir):
    return export_family(FAMILIES["mmoe"], exported / "model", snap_dir, exported / "onnx", run_id="t")


@pytest.fixture(scope="module")
def onnx_metrics(export_result, exported, snap_dir):
    assert export_result.parity_passed, export_result.parity_markdown
    return evaluate_onnx(exported / "onnx", snap_dir, "multitask")


def test_gates_are_a_softmax_over_experts_per_task(model):
    sparse, dense = model.export_spec().example_inputs
    m = model.scorer()
    with torch.no_grad():
        gates = m.mmoe.gate_weights(m.features(sparse, dense))
    cfg = model.config
    assert gates.shape == (len(sparse), len(mmoe.TASKS), cfg.n_experts)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(len(sparse), len(mmoe.TASKS)))
    # one gate per task, each its own parameters, and after training they mix experts differently
    assert len(m.mmoe.gates) == len(mmoe.TASKS) and len(m.mmoe.experts) == cfg.n_experts
    assert m.mmoe.gates[0].linear.weight.data_ptr() != m.mmoe.gates[1].linear.weight.data_ptr()
    assert (gates[:, 0] - gates[:, 1]).abs().max() > 1e-3


def test_mixture_is_the_gate_weighted_sum_of_experts(model):
    sparse, dense = model.export_spec().example_inputs
    m = model.scorer()
    with torch.no_grad():
        x = m.features(sparse, dense)
        gates = m.mmoe.gate_weights(x)
        experts = [e(x) for e in m.mmoe.experts]
        mixed = m.mmoe(x)
    for t in range(len(mmoe.TASKS)):
        want = sum(gates[:, t, i : i + 1] * h for i, h in enumerate(experts))
        torch.testing.assert_close(mixed[:, t], want)


def test_output_is_one_logit_per_task(model, snap_dir):
    c = Snapshot(snap_dir).ctr("test", max_history=1)
    logits = model.score(c.sparse, c.dense)
    assert logits.shape == (len(c), 2) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # two heads, not one copied
    spec = model.export_spec()
    assert [(o.name, o.shape) for o in spec.outputs] == [("logits", ("batch", 2))]


def test_loss_is_the_weighted_sum_of_the_task_losses(model, snap_dir):
    snap = Snapshot(snap_dir)
    m = model.scorer()
    base = parse_config(mmoe.Config, {"unknown_rate": 0.0, "embedding_reg": 0.0})
    batch = mmoe.MMoE.training_batch(snap, base, 64)
    with torch.no_grad():
        logits = m(batch[0], batch[1])
        bce = [nn.functional.binary_cross_entropy_with_logits(logits[:, t], batch[2][:, t]) for t in (0, 1)]
        both = mmoe.MMoE.loss(m, batch, base)
        like_only = mmoe.MMoE.loss(m, batch, dataclasses.replace(base, task_weights=(1.0, 0.0)))
        weighted = mmoe.MMoE.loss(m, batch, dataclasses.replace(base, task_weights=(1.0, 3.0)))
    torch.testing.assert_close(both, bce[0] + bce[1])
    torch.testing.assert_close(like_only, bce[0])
    torch.testing.assert_close(weighted, bce[0] + 3 * bce[1])


def test_config_rejects_wrong_task_weights():
    with pytest.raises(ConfigError, match="task_weights"):
        parse_config(mmoe.Config, {"task_weights": [1.0]})
    with pytest.raises(ConfigError, match="task_weights"):
        parse_config(mmoe.Config, {"task_weights": [0.0, 0.0]})


def test_export_passes_parity_with_a_two_column_output(export_result):
    assert export_result.parity_passed, export_result.parity_markdown
    assert {c.name for c in export_result.parity.cases} >= {"batch_1", "batch_257", "unknown_ids"}
    out = export_result.signature["outputs"]
    assert [(o["name"], o["shape"]) for o in out] == [("logits", ["batch", 2])]


def test_onnx_evaluation_reports_each_task(onnx_metrics, model, snap_dir):
    assert set(PER_TASK) <= set(onnx_metrics)
    assert "auc" not in onnx_metrics  # only per-task keys: no ambiguous un-suffixed AUC
    # onnxruntime's metrics equal the torch model's, column by column
    c = Snapshot(snap_dir).ctr("test", max_history=1)
    logits = model.score(c.sparse, c.dense).numpy()
    for col, task in enumerate(mmoe.TASKS):
        ref = evaluate_ctr(getattr(c, f"label_{task}"), logits[:, col], c.user_idx, task_name=task)
        assert onnx_metrics[f"auc_{task}"] == pytest.approx(ref[f"auc_{task}"], abs=1e-5)
        assert onnx_metrics[f"logloss_{task}"] == pytest.approx(ref[f"logloss_{task}"], abs=1e-5)


def test_baselines_leaderboard_and_blessing_carry_both_tasks(onnx_metrics, snap_dir, tmp_path):
    baselines = evaluate_baselines(snap_dir, "multitask")
    for name in ("random", "popularity"):
        assert set(baselines[name]) == set(onnx_metrics), name  # same columns as the model
    evaluation = {"family": "mmoe", "task": "multitask", "metrics": onnx_metrics}
    records = leaderboard_records([evaluation], {"multitask": baselines}, "temporal", "tiny")
    mine = {r["metric"] for r in records if r["model"] == "mmoe"}
    assert set(PER_TASK) <= mine
    for name in ("random", "popularity"):
        assert set(PER_TASK) <= {r["metric"] for r in records if r["model"] == f"baseline:{name}"}

    table = leaderboard_markdown(records)
    assert "## multitask" in table and "ranked by auc_like" in table
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header.split(" | ")[3] == "auc_like"  # the main metric is the first metric column
    assert all(m in header for m in PER_TASK)
    board = json.loads(write_leaderboard_json(records, tmp_path / "leaderboard.json").read_text())
    assert board["main_metric"]["multitask"] == ["auc_like", "max"]
    assert leaderboard_png(records, tmp_path / "lb.png").read_bytes()[:4] == b"\x89PNG"

    verdict = bless("mmoe", "multitask", onnx_metrics, baselines["popularity"], tmp_path / "registry")
    assert verdict.main_metric == MAIN_METRIC["multitask"][0] == "auc_like"
    assert verdict.value == onnx_metrics["auc_like"]
    assert verdict.baseline_value == baselines["popularity"]["auc_like"]
