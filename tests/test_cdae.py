"""cdae on the tiny planted snapshot of test_models: training, the scorer's rules, export + evaluation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_models import write_tiny_snapshot

from common.metrics import evaluate_topk, interaction_matrix
from evaluation.evaluate import evaluate_onnx
from export.family_export import export_family
from export.onnx_export import MASKED_SCORE, TopKScorer, topk_spec
from export.parity import parity_gate, require_parity, standard_cases
from export.runtime import OrtScorer
from models import cdae
from models.base import TOPK
from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import Snapshot

FAST = {"epochs": 20, "eval_users": 40}


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("cdae_snap"))


@pytest.fixture(scope="module")
def snapshot(snapshot_dir) -> Snapshot:
    return Snapshot(snapshot_dir)


@pytest.fixture(scope="module")
def model(snapshot):
    return cdae.fit(snapshot, parse_config(cdae.Config, FAST), lambda _: None)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory, snapshot_dir):
    root = tmp_path_factory.mktemp("cdae_export")
    model.save(root / "model")
    return export_family(FAMILIES["cdae"], root / "model", snapshot_dir, root / "onnx", run_id="test")


def manual_logits(module: cdae.CDAEModule, users: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's formula with the uncorrupted input, no fallback, no padding mask."""
    h = torch.sigmoid(y @ module.item_in.weight + module.user_node.weight[users] + module.hidden_bias)
    return h @ module.item_out.weight.T + module.item_bias


def test_training_loss_decreases_and_history_has_the_required_keys(model):
    losses = [r["train_loss"] for r in model.history]
    assert len(losses) >= 3 and losses[-1] < 0.95 * losses[0]  # full BCE: most of it is the 0s
    assert all(r["valid_metric_name"] == "ndcg@10" for r in model.history)
    assert {"epoch", "train_loss", "valid_metric", "valid_metric_name", "rows_per_s", "seconds"} <= set(
        model.history[-1]
    )


def test_one_adam_step_lowers_the_loss_on_a_fixed_batch(snapshot):
    cfg = cdae.Config(unknown_rate=0.0)
    torch.manual_seed(0)
    module = cdae.CDAE.build_module(cfg, {"n_users": snapshot.n_users, "n_items": snapshot.n_items})
    batch = cdae.CDAE.training_batch(snapshot, cfg, rows=16)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    before = cdae.CDAE.loss(module, batch, cfg)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert cdae.CDAE.loss(module, batch, cfg).item() < before.item()


def test_batch_corrupts_observed_items_and_samples_unseen_negatives(snapshot):
    train = cdae.binary_train_matrix(snapshot)
    users = np.arange(1, snapshot.n_users)
    cfg = cdae.Config(loss="sampled", corruption=0.4, negatives=3, unknown_rate=0.0)
    node, items, offsets, weights, row, item, label = cdae.BatchBuilder(train, cfg, seed=3)(users)
    n_obs = int(train[users].nnz)
    assert torch.equal(node, torch.from_numpy(users))
    # dropout noise: about q of the observed items removed, survivors scaled by 1 / (1 - q)
    assert 0.5 * n_obs < len(items) < 0.75 * n_obs
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 0.6))
    assert len(offsets) == len(users) and (offsets[1:] >= offsets[:-1]).all()
    for b in (0, 7):  # each bag holds only that user's own items
        hi = offsets[b + 1] if b + 1 < len(offsets) else len(items)
        assert set(items[offsets[b] : hi].tolist()) <= set(train[users[b]].indices.tolist())
    # positives are every observed item; negatives (3 per positive) are never seen in train
    assert int(label.sum()) == n_obs and len(label) == 4 * n_obs
    neg = label == 0
    dense = train.toarray()
    assert not dense[users[row[neg].numpy()], item[neg].numpy()].any()
    assert dense[users[row[~neg].numpy()], item[~neg].numpy()].all()
    # no corruption -> the bag is the full item vector with weight 1; unknown_rate -> node 0
    cfg0 = cdae.Config(corruption=0.0, unknown_rate=0.5)
    node0, items0, _, weights0, *_ = cdae.BatchBuilder(train, cfg0, seed=3)(users)
    assert len(items0) == n_obs and (weights0 == 1).all()
    assert 0 < int((node0 == 0).sum()) < len(users)


def test_corruption_is_training_only_and_both_paths_agree(model, snapshot):
    """The scorer has no noise (repeatable, equals the formula on the clean vector) and the
    sparse training path with no corruption computes the same hidden layer."""
    module = model.scorer()
    assert not module.training
    train = cdae.binary_train_matrix(snapshot)
    users = np.array([1, 4, 9, 20])
    y = torch.from_numpy(cdae.user_item_rows(train, users))
    u = torch.from_numpy(users)
    with torch.no_grad():
        first, second = module(u, y), module(u, y)
        assert torch.equal(first, second)
        torch.testing.assert_close(first[:, 1:], manual_logits(module, u, y)[:, 1:])
        clean = cdae.Config(corruption=0.0, unknown_rate=0.0)
        node, items, offsets, weights, *_ = cdae.BatchBuilder(train, clean, seed=0)(users)
        h_sparse = module.hidden_sparse(node, items, offsets, weights)
        h_dense = torch.sigmoid(y @ module.item_in.weight + module.user_node(u) + module.hidden_bias)
        torch.testing.assert_close(h_sparse, h_dense)


def test_output_shape_padding_and_input_rules(model, snapshot):
    module = model.scorer()
    n_items = snapshot.n_items
    users = torch.arange(0, snapshot.n_users + 2)
    y = torch.from_numpy(cdae.user_item_rows(cdae.binary_train_matrix(snapshot), users.numpy()))
    with torch.no_grad():
        out = module(users, y)
        assert out.dtype == torch.float32 and tuple(out.shape) == (len(users), n_items)
        assert torch.isfinite(out).all() and (out[:, 0] == -1e9).all()
        # any positive value counts as seen, and column 0 (padding) is ignored
        noisy = y * 3.0
        noisy[:, 0] = 1.0
        assert torch.equal(module(users, noisy), out)


def test_unknown_user_fallback(model, snapshot):
    module = model.scorer()
    n_items = snapshot.n_items
    pop = snapshot.item_popularity().astype(np.float64)
    expected = torch.from_numpy((pop / pop.max()).astype(np.float32))
    empty = torch.zeros((3, n_items))
    unknown = torch.tensor([0, snapshot.n_users, -1])
    items = torch.zeros((3, n_items))
    items[:, [2, 5, 11]] = 1.0
    with torch.no_grad():
        # unknown user, empty item vector -> train popularity (count / max count)
        out = module(unknown, empty)
        torch.testing.assert_close(out[:, 1:], expected[1:].expand(3, -1), rtol=0, atol=1e-7)
        # unknown user WITH items -> scored from the items with the unknown node V[0] (a new user)
        new = module(unknown, items)
        ref = manual_logits(module, torch.zeros(3, dtype=torch.int64), items)
        torch.testing.assert_close(new[:, 1:], ref[:, 1:])
        assert not torch.allclose(new[:, 1:], expected[1:].expand(3, -1))
        # a known user with an empty vector keeps their node: no fallback
        known = module(torch.tensor([3]), empty[:1])
        torch.testing.assert_close(known[:, 1:], manual_logits(module, torch.tensor([3]), empty[:1])[:, 1:])


def test_export_parity_signature_and_golden(exported, model):
    assert exported.parity_passed, exported.parity_markdown
    names = {c.name for c in exported.parity.cases}
    assert {"batch_1", "batch_257", "unknown_ids", "topk:batch_257", "topk:unknown_ids"} <= names
    assert exported.parity_max_abs_diff < 1e-4
    sig = exported.signature
    assert [i["name"] for i in sig["inputs"]] == ["user_idx", "user_items"]
    n_items = model.meta["n_items"]
    assert sig["inputs"][1]["dtype"] == "float32" and sig["inputs"][1]["shape"] == ["batch", n_items]
    assert sig["topk"]["k"] == min(TOPK, n_items) and sig["topk"]["user_items_from"] == "seen_mask"
    assert [i["name"] for i in sig["topk"]["inputs"]] == ["user_idx", "seen_mask"]
    assert "popularity" in sig["fallback_rules"] and "EMPTY" in sig["fallback_rules"]
    golden = json.loads((exported.out_dir / "golden.json").read_text())
    items = np.array(golden["inputs"]["user_items"]["data"])
    assert set(np.unique(items)) <= {0.0, 1.0}
    graph = onnx.load(str(exported.out_dir / "model_topk.onnx"))
    assert [i.name for i in graph.graph.input] == ["user_idx", "seen_mask"]


def test_topk_graph_feeds_seen_mask_as_user_items(exported, model, snapshot):
    scorer, spec = model.scorer(), model.export_spec()
    wrapped = TopKScorer(scorer, spec.topk, spec)
    path = exported.out_dir / "model_topk.onnx"
    n_items = snapshot.n_items
    rng = np.random.default_rng(5)
    cases = standard_cases(topk_spec(scorer, spec, spec.topk), n_items, snapshot.n_users, rng)
    # explicit: unknown users with an empty mask (popularity) and with items (new users)
    mask = np.zeros((4, n_items), bool)
    mask[2:, [3, 8, 13]] = True
    cases["unknown_empty_and_new"] = (np.zeros(4, np.int64), mask)
    require_parity(parity_gate(wrapped, path, cases))
    users = np.arange(1, 9, dtype=np.int64)
    seen = cdae.user_item_rows(cdae.binary_train_matrix(snapshot), users) > 0
    out = OrtScorer(path).run(user_idx=users, seen_mask=seen)
    with torch.no_grad():
        scores = scorer(torch.from_numpy(users), torch.from_numpy(seen.astype(np.float32))).numpy()
    for r in range(len(users)):
        valid = out["top_scores"][r] > MASKED_SCORE
        top = out["top_items"][r][valid]
        assert not seen[r, top].any() and 0 not in top
        np.testing.assert_allclose(out["top_scores"][r][valid], scores[r, top], rtol=1e-5, atol=1e-5)
        assert int(valid.sum()) == n_items - 1 - int(seen[r, 1:].sum())
    # the unknown user with an empty mask is ranked by popularity
    out0 = OrtScorer(path).run(user_idx=np.zeros(1, np.int64), seen_mask=np.zeros((1, n_items), bool))
    pop = snapshot.item_popularity()
    assert pop[out0["top_items"][0][0]] == pop[1:].max()


def test_evaluator_feeds_user_items(exported, model, snapshot, snapshot_dir):
    """evaluate_onnx must give the metrics of the torch scorer fed each user's train items."""
    got = evaluate_onnx(exported.out_dir, snapshot_dir, "topk")
    test = snapshot.ratings("test")
    keep = (test.user_idx > 0) & (test.item_idx > 0)
    shape = (snapshot.n_users, snapshot.n_items)
    relevant = interaction_matrix(test.user_idx[keep], test.item_idx[keep], *shape)
    train = cdae.binary_train_matrix(snapshot)
    users = np.unique(test.user_idx[keep])

    def reference(feed_items: bool):
        def score(u):
            u = np.asarray(u, np.int64)
            y = cdae.user_item_rows(train, u) if feed_items else np.zeros((len(u), shape[1]), np.float32)
            with torch.no_grad():
                return model.scorer()(torch.from_numpy(u), torch.from_numpy(y)).numpy()

        return evaluate_topk(score, snapshot.train_matrix("ones"), relevant, users=users)

    want = reference(True)
    for key in ("ndcg@10", "recall@20", "hr@10"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    without = reference(False)
    keys = ("ndcg@10", "recall@20", "precision@10")
    assert any(got[k] != pytest.approx(without[k], abs=1e-9) for k in keys)


def test_config_rejects_bad_values():
    for bad in ({"corruption": 1.0}, {"unknown_rate": -0.1}, {"hidden": 0}, {"lr": 0.0}, {"loss": "bpr"}):
        with pytest.raises(ValueError, match="cdae"):
            parse_config(cdae.Config, bad)


def test_full_loss_is_the_logistic_loss_over_the_whole_catalogue(snapshot):
    """loss = "full": every item but padding scored, the user's items as 1s, with the clean vector."""
    cfg = cdae.Config(loss="full", corruption=0.0, unknown_rate=0.0, reg=0.0)
    torch.manual_seed(0)
    module = cdae.CDAE.build_module(cfg, {"n_users": snapshot.n_users, "n_items": snapshot.n_items})
    train = cdae.binary_train_matrix(snapshot)
    users = np.arange(1, 17)
    batch = cdae.BatchBuilder(train, cfg, seed=0)(users)
    y = torch.from_numpy(cdae.user_item_rows(train, users))
    logits = manual_logits(module, torch.from_numpy(users), y)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], y[:, 1:], reduction="sum") / 16
    torch.testing.assert_close(cdae.CDAE.loss(module, batch, cfg), want)


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_l2_reaches_only_the_rows_a_step_reads(snapshot, loss):
    """The penalty shrinks the W rows fed in and the W' rows scored (all of them under "full"),
    never an item the step did not see, so the tables can train with sparse gradients."""
    cfg = cdae.Config(loss=loss, reg=1.0, unknown_rate=0.0, negatives=1)
    module = cdae.CDAE.build_module(cfg, {"n_users": snapshot.n_users, "n_items": snapshot.n_items})
    node, items, offsets, weights, row, item, label = batch = cdae.CDAE.training_batch(snapshot, cfg, rows=1)
    cdae.CDAE.loss(module, batch, cfg).backward()
    fed = torch.zeros(snapshot.n_items, dtype=torch.bool)
    fed[items] = True
    grad_in = module.item_in.weight.grad.abs().sum(1)
    assert (grad_in[fed] > 0).all() and (grad_in[~fed] == 0).all()
    scored = torch.zeros(snapshot.n_items, dtype=torch.bool)
    scored[item] = True
    grad_out = module.item_out.weight.grad.abs().sum(1)
    if loss == "full":
        assert (grad_out[1:] > 0).all()
    else:
        assert (grad_out[scored] > 0).all() and (grad_out[~scored] == 0).all() and (~scored[1:]).any()
