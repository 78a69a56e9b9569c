"""Scoring at scale: memory-sized chunks give exactly the unchunked results, and the exported
attention graphs keep the shape onnxruntime runs fast.

- top-K evaluation of every user against every item, with a budget so small that users and
  items are both chunked, equals ``common.metrics.evaluate_topk`` on one block, bit for bit;
- item-kNN with one very long history, scored in torch and in onnxruntime under a tiny budget,
  equals the unbounded scoring, and every call stays within the budget;
- DIN's graph has no PRelu (LeakyRelu fused into Gemm instead), BST's no Split, and both still
  score like torch.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
import torch
from test_models import write_tiny_snapshot

from common.budget import budget_bytes, row_chunks
from common.metrics import evaluate_topk, interaction_matrix
from evaluation.evaluate import evaluate_baselines, evaluate_rating_onnx, evaluate_topk_onnx
from evaluation.topk_chunks import evaluate_topk_chunked
from export.onnx_export import export_onnx
from export.parity import parity_gate, standard_cases
from export.runtime import OrtScorer, graph_bytes_per_row
from models import bst, din, item_knn
from models.config import parse_config
from models.data import Snapshot
from models.layers import UserTopKScorer

TINY = 4096  # bytes: forces chunks of a few users and a few dozen items below


def _topk_data(seed: int = 0, n_users: int = 40, n_items: int = 120):
    rng = np.random.default_rng(seed)
    train = sp.random(n_users, n_items, density=0.15, random_state=seed, format="csr")
    train.data[:] = 1.0
    test_u = rng.integers(1, n_users, 300)
    test_i = rng.integers(1, n_items, 300)
    relevant = interaction_matrix(test_u, test_i, n_users, n_items)
    users = np.unique(test_u)
    # integer scores: many ties, so the index tie-break of rank_topk is exercised
    scores = rng.integers(0, 6, (n_users, n_items)).astype(np.float32)
    return train, relevant, users, scores


@pytest.mark.parametrize("memory", [TINY, 64 * 1024, 2**30])
def test_chunked_topk_equals_one_block(memory):
    train, relevant, users, scores = _topk_data()
    want = evaluate_topk(lambda u: scores[u], train, relevant, users=users, batch_size=256)
    got = evaluate_topk_chunked(lambda u: scores[u], train, relevant, users, bytes_per_user=4 * 120,
                                memory_bytes=memory, metric_batch=256)  # fmt: skip
    assert got == want


def test_chunked_topk_fewer_rankable_items_than_k():
    # every user has seen all but 5 items: the tail of each top-20 is excluded, padded slots
    train, relevant, users, scores = _topk_data(seed=1, n_items=12)
    dense = train.toarray()
    dense[:, 6:] = 1.0
    train = sp.csr_matrix(dense)
    relevant = sp.csr_matrix(np.where(dense > 0, 0.0, 1.0))
    users = np.arange(1, 40)
    want = evaluate_topk(lambda u: scores[u][:, :12], train, relevant, users=users, batch_size=8)
    got = evaluate_topk_chunked(lambda u: scores[u][:, :12], train, relevant, users, bytes_per_user=48,
                                memory_bytes=1000, metric_batch=8)  # fmt: skip
    assert got == want


class _DotScorer(UserTopKScorer):
    """A matrix-factorisation scorer with fixed random factors: a real graph for onnxruntime."""

    def __init__(self, n_users: int, n_items: int):
        super().__init__(n_users, n_items)
        g = torch.Generator().manual_seed(0)
        self.users = torch.nn.Parameter(torch.randn(n_users, 8, generator=g))
        self.items = torch.nn.Parameter(torch.randn(n_items, 8, generator=g))

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.users[u] @ self.items.T


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


def test_topk_onnx_tiny_budget_same_metrics(snapshot, tmp_path):
    module = _DotScorer(snapshot.n_users, snapshot.n_items).eval()
    spec = _topk_spec(module)
    path = export_onnx(module, spec, tmp_path / "model.onnx")
    signature = {"inputs": [{"name": "user_idx"}], "outputs": [{"name": "scores"}]}
    scorer = OrtScorer(path)
    assert scorer.bytes_per_row() >= 4 * snapshot.n_items  # at least the score row itself
    one_block = evaluate_topk_onnx(scorer, signature, snapshot, memory_bytes=2**30)
    many = evaluate_topk_onnx(scorer, signature, snapshot, memory_bytes=TINY)
    train = snapshot.train_matrix("ones")
    test = snapshot.ratings("test")
    keep = (test.user_idx > 0) & (test.item_idx > 0)
    n_users, n_items = snapshot.n_users, snapshot.n_items
    relevant = interaction_matrix(test.user_idx[keep], test.item_idx[keep], n_users, n_items)
    with torch.no_grad():
        reference = evaluate_topk(lambda u: module(torch.from_numpy(u)).numpy(), train, relevant,
                                  users=np.unique(test.user_idx[keep]), batch_size=256)  # fmt: skip
    assert many == one_block
    assert {k: v for k, v in many.items() if k in reference} == pytest.approx(reference)
    assert evaluate_baselines(snapshot.path, "topk", memory_bytes=TINY) == evaluate_baselines(
        snapshot.path, "topk", memory_bytes=2**30
    )


def _topk_spec(module):
    from models.base import ExportSpec, TensorSpec

    return ExportSpec(
        inputs=(TensorSpec("user_idx", "int64", ("batch",)),),
        outputs=(TensorSpec("scores", "float32", ("batch", module.n_items)),),
        example_inputs=(torch.tensor([0, 1, 2, 3]),),
    )


# --- item-kNN with a very long history ----------------------------------------------------------
def _long_history_model(n_users: int = 30, n_items: int = 400, long_user: int = 7):
    """Train ratings where one user rated almost every item; the rest rated a few."""
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((n_users, n_items)) < 0.06, rng.integers(1, 6, (n_users, n_items)), 0)
    dense[long_user, 1:] = rng.integers(1, 6, n_items - 1)
    dense[0, :] = 0
    dense[:, 0] = 0
    train = sp.csr_matrix(dense.astype(np.float32))
    config = item_knn.Config(k=10)
    nbr_idx, nbr_sim = item_knn.item_similarity_topk(train, config.k, config.shrink)
    means = (np.asarray(train.sum(0)).ravel() + 30.0) / (np.diff(train.tocsc().indptr) + 10.0)
    module = item_knn.ItemKNNScorer(n_items, nbr_idx.shape[1], 1.0, 5.0)
    module.nbr_idx.copy_(torch.from_numpy(nbr_idx))
    module.nbr_sim.copy_(torch.from_numpy(nbr_sim))
    module.item_mean.copy_(torch.from_numpy(means.astype(np.float32)))
    meta = {"n_items": n_items, "k": int(nbr_idx.shape[1]), "rating_range": [1.0, 5.0], "global_mean": 3.0}
    return item_knn.ItemKNN(config, module, meta), train


def test_item_knn_long_history_tiny_budget_same_predictions():
    model, train = _long_history_model()
    users = np.repeat(np.arange(1, 30), 12)
    items = np.random.default_rng(0).integers(0, 400, users.size)
    unbounded = item_knn.predict(model, train, users, items, batch=4096, memory_bytes=2**40)
    tiny = item_knn.predict(model, train, users, items, batch=4096, memory_bytes=200_000)
    assert np.array_equal(tiny, unbounded)
    # and what the formula says, row by row
    m = model.module
    reference = item_knn.predict_numpy(m.nbr_idx.numpy(), m.nbr_sim.numpy(), m.item_mean.numpy(), 3.0,
                                       (1.0, 5.0), train, users, items)  # fmt: skip
    np.testing.assert_allclose(tiny, reference, atol=1e-5)


def test_row_chunks_stay_within_budget():
    widths = np.sort(np.random.default_rng(1).integers(0, 5000, 500))
    widths[-1] = 50_000  # the long history
    chunks = list(row_chunks(widths, bytes_per_slot=40 * 16, memory_bytes=budget_bytes(64), max_rows=1024))
    assert chunks[0][0] == 0 and chunks[-1][1] == widths.size
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for lo, hi in chunks:
        assert hi - lo == 1 or (hi - lo) * max(int(widths[hi - 1]), 1) * 40 * 16 <= 64 * 2**20
    with pytest.raises(ValueError, match="sorted"):
        list(row_chunks(widths[::-1], 1, 10, 10))
    with pytest.raises(ValueError, match="RECSYS_SCORE_MEMORY_MB"):
        budget_bytes(0)


class _RecordingScorer(OrtScorer):
    """onnxruntime scoring that also keeps the shape of every call it was given."""

    def __init__(self, path):
        super().__init__(path)
        self.calls: list[tuple[int, ...]] = []

    def run(self, **inputs):
        self.calls.append(inputs["hist_item_idx"].shape)
        return super().run(**inputs)


def test_item_knn_onnx_calls_bounded_and_identical(snapshot, tmp_path):
    from models.catalogue import FAMILIES

    family = FAMILIES["item_knn"]
    model = family.fit(snapshot, parse_config(family.config_cls, {"k": 10}), lambda msg: None)
    path = export_onnx(model.scorer(), model.export_spec(), tmp_path / "model.onnx")
    scorer = _RecordingScorer(path)
    per_slot = scorer.bytes_per_row("history")
    assert per_slot >= model.meta["k"] * 4  # the [batch, k, history] float32 weights at least
    signature = {"inputs": [{"name": n} for n in ("item_idx", "hist_item_idx", "hist_rating")],
                 "outputs": [{"name": "rating"}]}  # fmt: skip
    widest = int(np.diff(snapshot.train_matrix("rating").indptr).max())
    budget = 3 * per_slot * widest  # about three of the longest histories per call
    small = evaluate_rating_onnx(scorer, signature, snapshot, memory_bytes=budget)
    for rows, width in scorer.calls:
        assert rows == 1 or rows * width * per_slot <= budget
    assert max(rows for rows, _ in scorer.calls) > 1 and len(scorer.calls) > 3
    assert small == evaluate_rating_onnx(OrtScorer(path), signature, snapshot, memory_bytes=2**40)


# --- attention graphs ---------------------------------------------------------------------------
def _sequence_model(family, snapshot):
    module = {"din": din, "bst": bst}[family]
    config = parse_config(module.Config, {})
    meta = din.sequence_meta(snapshot, config)
    cls = module.DIN if family == "din" else module.BST
    torch.manual_seed(0)
    net = cls.build_module(config, meta).eval()
    for m in net.modules():  # trained slopes differ from PReLU's 0.25 init
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.05, 0.5)
    return cls(config, net, meta)


@pytest.mark.parametrize("family", ["din", "bst"])
def test_attention_graph_ops_and_parity(family, snapshot, tmp_path):
    model = _sequence_model(family, snapshot)
    spec = model.export_spec()
    path = export_onnx(model.scorer(), spec, tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    if family == "din":
        assert "PRelu" not in ops and "LeakyRelu" in ops
        assert "Gemm" in ops  # the activation unit runs on 2-D rows
    else:
        assert "Split" not in ops  # keys and values: one Gemm per head, no copy of both
    meta = json.loads((snapshot.path / "meta.json").read_text())
    card = {"sparse": [meta["sparse_cardinality"][f] for f in meta["sparse_fields"]]}
    cases = standard_cases(spec, meta["n_items"], meta["n_users"], np.random.default_rng(0), card)
    assert parity_gate(model.scorer(), path, cases).passed


def test_graph_bytes_per_row_counts_symbolic_products():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "history", 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch*history", 3])
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.INT64, ["batch", 5])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["x", "s"], ["y"]), onnx.helper.make_node("Shape", ["x"], ["z"])],
        "g",
        [x],
        [y, z],
        [onnx.numpy_helper.from_array(np.array([-1, 3]), "s")],
    )
    model = onnx.helper.make_model(graph)
    assert graph_bytes_per_row(model, "batch", ("history",)) == 12 + 12 + 40
    assert graph_bytes_per_row(model, "batch") == 40  # history-sized tensors are not per row


def test_graph_bytes_per_row_is_the_live_peak_not_the_sum():
    """A chain x -> a -> b -> c -> out: only a node's inputs and outputs are alive at once, so
    the peak is the largest neighbouring pair, not the sum of all five; a value read twice
    lives until its last reader; the output is never freed."""
    f = onnx.TensorProto.FLOAT
    shapes = {"x": 2, "a": 10, "b": 3, "c": 7, "out": 1}
    values = {n: onnx.helper.make_tensor_value_info(n, f, ["batch", w]) for n, w in shapes.items()}
    nodes = [onnx.helper.make_node("Relu", [i], [o]) for i, o in [("x", "a"), ("a", "b"), ("b", "c")]]
    nodes.append(onnx.helper.make_node("ReduceSum", ["c"], ["out"], keepdims=1))
    graph = onnx.helper.make_graph(nodes, "chain", [values["x"]], [values["out"]],
                                   value_info=[values[n] for n in "abc"])  # fmt: skip
    model = onnx.helper.make_model(graph)
    assert graph_bytes_per_row(model) == 4 * (10 + 3)  # a and b alive while b is made (x freed)

    # x read again by the last node: alive all along, beside each pair and the output
    nodes[-1] = onnx.helper.make_node("Concat", ["c", "x"], ["out"], axis=1)
    out = onnx.helper.make_tensor_value_info("out", f, ["batch", 9])
    graph = onnx.helper.make_graph(nodes, "chain", [values["x"]], [out],
                                   value_info=[values[n] for n in "abc"])  # fmt: skip
    assert graph_bytes_per_row(onnx.helper.make_model(graph)) == 4 * (2 + 7 + 9)


def test_score_memory_setting_parsed():
    from pipeline.settings import SettingsError, load_settings

    assert load_settings({"RECSYS_HOME": "/nonexistent-home"}).score_memory_mb == 256
    assert load_settings({"RECSYS_HOME": "/x", "RECSYS_SCORE_MEMORY_MB": "64"}).score_memory_mb == 64
    with pytest.raises(SettingsError, match="RECSYS_SCORE_MEMORY_MB"):
        load_settings({"RECSYS_HOME": "/x", "RECSYS_SCORE_MEMORY_MB": "0"})


def test_evaluate_onnx_takes_budget(snapshot, tmp_path):
    """The pipeline passes RECSYS_SCORE_MEMORY_MB through evaluate_onnx's ``score_memory_mb``."""
    from evaluation.evaluate import evaluate_onnx

    module = _DotScorer(snapshot.n_users, snapshot.n_items).eval()
    export_onnx(module, _topk_spec(module), tmp_path / "model.onnx")
    (tmp_path / "signature.json").write_text(json.dumps(
        {"inputs": [{"name": "user_idx"}], "outputs": [{"name": "scores"}]}))  # fmt: skip
    small = evaluate_onnx(tmp_path, snapshot.path, "topk", score_memory_mb=0.004)
    assert small == evaluate_onnx(tmp_path, snapshot.path, "topk")
    with pytest.raises(ValueError, match="RECSYS_SCORE_MEMORY_MB"):
        evaluate_onnx(tmp_path, snapshot.path, "topk", score_memory_mb=-1)


def test_ctr_baselines_read_only_their_columns_and_score_as_from_the_whole_table(tmp_path):
    """The CTR baselines read item, user and labels of one split (``Snapshot.split_columns``),
    not the whole table with its history lists; their metrics are what the full arrays give."""
    from evaluation import baselines as B
    from evaluation.evaluate import evaluate_ctr

    snap = Snapshot(write_tiny_snapshot(tmp_path / "snap"))
    test, train = snap.ctr("test"), snap.ctr("train")  # everything, histories included
    cols = snap.split_columns("fct_ctr_samples", "test", ["item_idx", "label_like"])
    assert set(cols) == {"item_idx", "label_like"} and len(cols["item_idx"]) == len(test)
    np.testing.assert_array_equal(cols["item_idx"], test.sparse[:, 1])
    popularity = B.ctr_popularity(train.sparse[:, 1], train.label_like, test.sparse[:, 1], snap.n_items)
    expected = evaluate_ctr(test.label_like, popularity, test.user_idx)
    got = evaluate_baselines(snap.path, "ctr")["popularity"]
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=0, rel=0)
