"""user_knn / user_knn_topk and the shared NeighbourRows, against dense numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
import torch
from test_models import write_tiny_snapshot

from export.family_export import export_family
from export.onnx_export import TopKScorer, export_onnx, export_topk_onnx, topk_spec
from export.parity import parity_gate, standard_cases
from models import neighbours, user_knn, user_knn_topk
from models.catalogue import FAMILIES
from models.config import ConfigError, parse_config
from models.data import Snapshot
from models.neighbours import NeighbourRows


def random_ratings(n_users: int, n_items: int, density: float, seed: int) -> np.ndarray:
    """Dense users x items with 0 = missing; row 0 and column 0 (padding) empty."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_users, n_items)) < density, rng.integers(1, 6, (n_users, n_items)), 0)
    dense = dense.astype(np.float64)
    dense[0], dense[:, 0] = 0, 0
    return dense


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


# --- NeighbourRows --------------------------------------------------------------------------
@pytest.mark.parametrize("slots_per_step", [None, 1, 3])
def test_neighbour_rows_equal_dense_matmul(slots_per_step):
    rng = np.random.default_rng(0)
    dense = random_ratings(25, 17, 0.35, seed=2)
    dense[0, 3] = 4.0  # row 0 holds data, yet index 0 is padding: it must never contribute
    dense[7] = 0  # an empty row
    rows = NeighbourRows.from_csr(sp.csr_matrix(dense), slots_per_step=slots_per_step)
    idx = rng.integers(0, 25, (9, 8))
    idx[0, :] = 0
    idx[1, 2] = 7
    idx[2, 1] = 99  # out of range: read as empty
    w = rng.normal(size=(9, 8)).astype(np.float32)
    padded = np.vstack([dense, np.zeros((100, 17))])
    padded[0] = 0
    ref = np.einsum("bk,bki->bi", w, padded[idx])
    with torch.no_grad():
        got = rows(torch.from_numpy(idx), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # lookup: one cell per neighbour, found = stored
    item = rng.integers(0, 17, 9)
    value, found = rows.lookup(torch.from_numpy(idx), torch.from_numpy(item))
    cell = padded[idx, item[:, None]]
    np.testing.assert_array_equal(value.numpy(), cell.astype(np.float32))
    np.testing.assert_array_equal(found.numpy(), cell != 0)


class _Rows(torch.nn.Module):
    def __init__(self, rows: NeighbourRows):
        super().__init__()
        self.rows = rows

    def forward(self, nbr_idx: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        return self.rows(nbr_idx, nbr_weight)


@pytest.mark.parametrize("slots_per_step", [None, 1, 3])
def test_neighbour_rows_graph_reads_only_stored_cells_and_equals_the_reference(slots_per_step, monkeypatch,
                                                                               tmp_path):  # fmt: skip
    """The graph path (what the export traces) on a skewed matrix, one row 40x the others:
    the ragged read of the neighbours' stored cells gives the dense reference in torch and in
    onnxruntime, empty and all-padding batches included, and no tensor of the exported graph
    is padded to the longest row (the work follows the cells read)."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    dense = random_ratings(30, 300, 0.02, seed=4)
    dense[5, 1:] = rng.integers(1, 6, 299)  # the heaviest row: 299 cells, the others ~6
    dense[0, 3] = 4.0  # index 0 is padding even though row 0 holds data
    rows = NeighbourRows.from_csr(sp.csr_matrix(dense), slots_per_step=slots_per_step)
    idx = rng.integers(0, 30, (12, 7))
    idx[0, :] = 0
    idx[1, :] = 5
    idx[2, 3] = 77  # out of range: an empty row
    w = rng.normal(size=idx.shape).astype(np.float32)
    padded = np.vstack([dense, np.zeros((50, 300))])
    padded[0] = 0
    ref = np.einsum("bk,bki->bi", w, padded[idx])

    monkeypatch.setattr(neighbours, "exporting", lambda: True)
    with torch.no_grad():
        got = rows(torch.from_numpy(idx), torch.from_numpy(w)).numpy()
        empty = rows(torch.zeros((0, 7), dtype=torch.int64), torch.zeros((0, 7)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, 300)
    if slots_per_step != 3:  # one export (several steps, each its own ragged range) is enough
        return

    path = tmp_path / "rows.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(_Rows(rows).eval(), (torch.from_numpy(idx), torch.from_numpy(w)), str(path),
                      input_names=["nbr_idx", "nbr_weight"], output_names=["scores"], dynamo=True,
                      dynamic_shapes={"nbr_idx": {0: batch}, "nbr_weight": {0: batch}}, opset_version=18,
                      external_data=False)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"nbr_idx": idx, "nbr_weight": w})
    np.testing.assert_array_equal(onnx_out, got)
    padding = {"nbr_idx": np.zeros((3, 7), np.int64), "nbr_weight": np.zeros((3, 7), np.float32)}
    (none,) = session.run(None, padding)
    assert not none.any()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dims = {d.dim_value for v in model.graph.value_info for d in v.type.tensor_type.shape.dim}
    assert rows.max_row == 299 and 299 not in dims


@pytest.mark.parametrize("graph", [False, True], ids=["eager-compiled", "graph-unrolled"])
def test_neighbour_rows_lookup_finds_every_stored_cell_of_long_rows(graph, monkeypatch):
    """The binary search must reach both ends of rows of every length up to max_row: the
    unrolled one the export traces (forced here in eager) and the compiled eager one."""
    monkeypatch.setattr(neighbours, "exporting", lambda: graph)
    dense = np.zeros((6, 40))
    for u, length in enumerate([0, 1, 2, 31, 32, 39]):
        dense[u, 1 : length + 1] = np.arange(1, length + 1)
    rows = NeighbourRows.from_csr(sp.csr_matrix(dense))
    users, items = np.meshgrid(np.arange(1, 6), np.arange(40), indexing="ij")
    value, found = rows.lookup(torch.from_numpy(users.reshape(-1, 1)), torch.from_numpy(items.reshape(-1)))
    np.testing.assert_array_equal(value.numpy().ravel(), dense[users, items].ravel())
    np.testing.assert_array_equal(found.numpy().ravel(), dense[users, items].ravel() != 0)


def test_neighbour_rows_lookup_eager_equals_the_exported_search(monkeypatch):
    """Rating prediction reads cells eagerly (compiled) and in ONNX (the unrolled search): the
    same values and found flags, padding, out-of-range neighbours and unknown items included."""
    rng = np.random.default_rng(5)
    dense = random_ratings(60, 45, 0.3, seed=6)
    dense[0, 5] = 3.0  # row 0 holds data but index 0 is padding
    dense[11, 1:] = rng.integers(1, 6, 44)  # a full row
    rows = NeighbourRows.from_csr(sp.csr_matrix(dense))
    idx = torch.from_numpy(rng.integers(-2, 64, (200, 7)))  # negative and >= n_users: empty
    item = torch.from_numpy(rng.integers(0, 47, 200))  # 45, 46: outside every row
    eager = rows.lookup(idx, item)
    monkeypatch.setattr(neighbours, "exporting", lambda: True)
    graph = rows.lookup(idx, item)
    assert eager[1].any() and not eager[1].all()
    for a, b in zip(eager, graph):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_neighbour_rows_rebuild_from_meta_and_state_dict():
    rows = NeighbourRows.from_csr(sp.csr_matrix(random_ratings(10, 8, 0.5, seed=1)))
    again = NeighbourRows(**rows.meta())
    again.load_state_dict(rows.state_dict())
    idx, w = torch.tensor([[1, 2, 0], [9, 3, 4]]), torch.rand(2, 3)
    assert torch.equal(again(idx, w), rows(idx, w))


# --- similarity -------------------------------------------------------------------------------
def brute_force_user_similarity(dense: np.ndarray, shrink: float, similarity: str) -> np.ndarray:
    mask = dense != 0
    means = np.array([row[m].mean() if m.any() else 0.0 for row, m in zip(dense, mask)])
    c = np.where(mask, dense - means[:, None], 0.0)
    n = len(dense)
    sim = np.zeros((n, n))
    for u in range(1, n):
        for v in range(1, n):
            both = mask[u] & mask[v]
            common = both.sum()
            if u == v or common == 0:
                continue
            if similarity == "cosine":
                nu, nv = np.linalg.norm(c[u]), np.linalg.norm(c[v])
                s = c[u] @ c[v] / (nu * nv) if nu > 0 and nv > 0 else 0.0
            else:  # Pearson over co-rated items, centred by the co-rated means
                a, b = dense[u, both], dense[v, both]
                a, b = a - a.mean(), b - b.mean()
                den = np.sqrt((a @ a) * (b @ b))
                s = a @ b / den if common >= 2 and den > 1e-9 else 0.0
            sim[u, v] = s * common / (common + shrink)
    return np.maximum(sim, 0.0)


def as_dense(idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
    out = np.zeros((len(idx), len(idx)))
    for u in range(len(idx)):
        for v, s in zip(idx[u], sim[u]):
            if v:
                out[u, v] = s
    return out


@pytest.mark.parametrize("similarity", ["cosine", "pearson"])
def test_similarity_matches_brute_force(similarity):
    dense = random_ratings(14, 10, 0.6, seed=1)
    truth = brute_force_user_similarity(dense, shrink=3.0, similarity=similarity)
    assert (truth > 0).sum() > 20  # the reference is not trivially empty
    idx, sim = user_knn.user_similarity_topk(sp.csr_matrix(dense), 13, 3.0, similarity, block_size=4)
    np.testing.assert_allclose(as_dense(idx, sim), truth, atol=1e-6)
    # top-k keeps each user's k largest, in descending order
    idx, sim = user_knn.user_similarity_topk(sp.csr_matrix(dense), 3, 3.0, similarity, block_size=5)
    for u in range(14):
        np.testing.assert_allclose(sim[u], np.sort(truth[u])[::-1][:3], atol=1e-6)


@pytest.mark.parametrize("similarity", ["cosine", "pearson"])
def test_blocked_equals_unblocked(similarity):
    train = sp.csr_matrix(random_ratings(40, 30, 0.3, seed=3))
    one = user_knn.user_similarity_topk(train, 6, 10.0, similarity, block_size=40)
    for block in (1, 7):
        idx, sim = user_knn.user_similarity_topk(train, 6, 10.0, similarity, block_size=block)
        np.testing.assert_array_equal(idx, one[0])
        np.testing.assert_allclose(sim, one[1], rtol=1e-6)


# --- rating -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["seed", "baseline"])
def test_rating_scorer_equals_numpy_reference(snapshot, prediction):
    config = user_knn.Config(k=8, shrink=5.0, prediction=prediction)
    model = user_knn.fit(snapshot, config, lambda _: None)
    train = snapshot.train_matrix()
    rows = [snapshot.ratings(s) for s in ("valid", "test")]
    users = np.concatenate([r.user_idx for r in rows] + [np.array([0, 0, 5, 5, 10_000, 3])])
    items = np.concatenate([r.item_idx for r in rows] + [np.array([0, 7, 0, 9, 4, -2])])
    m = model.scorer()
    base = user_knn.baseline(train, config)
    ref = user_knn.predict_numpy(
        m.nbr_idx.numpy(), m.nbr_sim.numpy(), base, train, model.meta["rating_range"], users, items
    )
    got = user_knn.predict(model, users, items, batch=13)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # neighbours really contribute on most rows (not only the fallback)
    n = len(users) - 6
    plain = np.clip(base.user_offset[users[:n]] + base.item_offset[items[:n]], 1, 5)
    assert (np.abs(got[:n] - plain) > 1e-6).mean() > 0.3
    # documented fallbacks: unknown user -> damped item mean, unknown both -> global mean
    assert got[-6] == pytest.approx(model.meta["global_mean"], abs=1e-5)
    assert got[-5] == pytest.approx(base.item_fallback[7], abs=1e-5)
    assert got[-2] == pytest.approx(base.item_fallback[4], abs=1e-5)  # out-of-range user = unknown


def test_seed_formula_by_hand():
    """Three users, the seed formula written out for one cell."""
    dense = np.zeros((4, 4))
    dense[1, 1:] = [5, 3, 4]  # u1 mean 4
    dense[2, 1:] = [4, 2, 0]  # u2 mean 3, did not rate item 3
    dense[3, 1:] = [2, 1, 3]  # u3 mean 2
    train = sp.csr_matrix(dense)
    nbr_idx = np.array([[0, 0], [3, 0], [1, 3], [1, 0]])
    nbr_sim = np.array([[0, 0], [0.5, 0], [0.8, 0.2], [0.5, 0]], dtype=np.float32)
    base = user_knn.baseline(train, user_knn.Config())
    pred = user_knn.predict_numpy(nbr_idx, nbr_sim, base, train, (1.0, 5.0), np.array([2]), np.array([3]))
    expected = 3 + (0.8 * (4 - 4) + 0.2 * (3 - 2)) / (0.8 + 0.2)
    assert pred[0] == pytest.approx(expected)


# --- top-K ------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", ["binary", "centred"])
def test_topk_scores_equal_numpy_reference(snapshot, values):
    model = user_knn_topk.fit(
        snapshot, user_knn_topk.Config(k=6, values=values, gather_budget=40), lambda _: None
    )
    assert model.meta["slots_per_step"] < model.meta["k"]  # several unrolled steps are exercised
    m = model.scorer()
    votes = user_knn_topk.topk_values(snapshot.train_matrix(), values).toarray()
    users = np.array([0, 1, 2, 5, 17, snapshot.n_users - 1, snapshot.n_users + 3])
    with torch.no_grad():
        got = m(torch.from_numpy(users)).numpy()
    for row, u in zip(got, users):
        if 0 < u < snapshot.n_users:
            ref = m.nbr_sim[u].numpy() @ votes[m.nbr_idx[u].numpy()]
        else:
            ref = m.popularity.numpy()
        np.testing.assert_allclose(row[1:], ref[1:], rtol=1e-5, atol=1e-5)
        assert row[0] == -1e9


# --- export, parity, config ----------------------------------------------------------------------
def test_rating_export_and_parity(snapshot, tmp_path):
    fam = FAMILIES["user_knn"]
    model = fam.fit(snapshot, parse_config(fam.config_cls, {}), lambda _: None)
    model.save(tmp_path / "model")
    result = export_family(fam, tmp_path / "model", snapshot.path, tmp_path / "onnx", run_id="test")
    assert result.parity_passed, result.parity_markdown
    assert {"batch_1", "batch_257", "unknown_ids"} <= {c.name for c in result.parity.cases}
    assert [i["name"] for i in result.signature["inputs"]] == ["user_idx", "item_idx"]
    # Positions into the stored cells stay integers end to end: the exporter lowers integer
    # floor division through float32, which rounds positions past 2**24 (ML-25M shape: 20M
    # cells; onnxruntime read wrong cells and parity failed there, 0.84 on a rating).
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    float_casts = [
        n.name for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT
    ]
    assert not float_casts and not [n for n in graph.node if n.op_type == "Floor"], float_casts


def test_topk_export_and_parity(snapshot, tmp_path):
    """Scores graph and top-K graph (K = 10: the tiny catalogue has fewer items than models.base.TOPK)."""
    fam = FAMILIES["user_knn_topk"]
    max_row = int(np.diff(snapshot.train_matrix().indptr).max())
    # 20 neighbours per step: the k = 50 neighbours take 3 unrolled steps, all exported
    model = fam.fit(snapshot, parse_config(fam.config_cls, {"gather_budget": 20 * max_row}), lambda _: None)
    assert model.meta["slots_per_step"] == 20 and model.meta["k"] == 50
    scorer, spec = model.scorer(), model.export_spec()
    rng = np.random.default_rng(0)
    path = export_onnx(scorer, spec, tmp_path / "model.onnx")
    report = parity_gate(scorer, path, standard_cases(spec, snapshot.n_items, snapshot.n_users, rng))
    assert report.passed, report.cases
    top = export_topk_onnx(scorer, spec, 10, tmp_path / "model_topk.onnx")
    cases = standard_cases(topk_spec(scorer, spec, 10), snapshot.n_items, snapshot.n_users, rng)
    report = parity_gate(TopKScorer(scorer, 10), top, cases)
    assert report.passed, report.cases


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="similarity"):
        user_knn.Config(similarity="jaccard")
    with pytest.raises(ValueError, match="values"):
        user_knn_topk.Config(values="ratings")
    with pytest.raises(ConfigError, match="user_knn_topk"):
        parse_config(user_knn_topk.Config, {"prediction": "seed"})


# --- fast paths ---------------------------------------------------------------------------------
def test_eager_sparse_product_equals_exported_scatter_path():
    """Eager forward (sparse @ sparse) and the fixed-shape path the graph is traced from agree."""
    rng = np.random.default_rng(4)
    dense = random_ratings(40, 23, 0.3, seed=5)
    dense[0, 2] = 3.0  # row 0 holds data but is padding
    rows = NeighbourRows.from_csr(sp.csr_matrix(dense), slots_per_step=4)
    idx = rng.integers(0, 45, (11, 9))  # includes 0 and out-of-range ids
    w = rng.random((11, 9)).astype(np.float32)
    idx_t, w_t = torch.from_numpy(idx), torch.from_numpy(w)
    with torch.no_grad():
        eager = rows(idx_t, w_t)
        traced = torch.zeros(11, 23)
        for lo in range(0, 9, 4):
            traced = rows._scatter(traced, idx_t[:, lo : lo + 4], w_t[:, lo : lo + 4])
    np.testing.assert_allclose(eager.numpy(), traced.numpy(), rtol=1e-6, atol=1e-6)


def test_float32_blocks_match_float64_brute_force_on_more_users():
    """Many blocks, two threads: the float32 cosine path still equals the float64 reference."""
    dense = random_ratings(70, 25, 0.25, seed=7)
    truth = brute_force_user_similarity(dense, shrink=5.0, similarity="cosine")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        idx, sim = user_knn.user_similarity_topk(sp.csr_matrix(dense), 69, 5.0, "cosine", block_size=9)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(as_dense(idx, sim), truth, atol=1e-6)
    idx, sim = user_knn.user_similarity_topk(sp.csr_matrix(dense), 5, 5.0, "cosine", block_size=70)
    for u in range(70):
        np.testing.assert_allclose(sim[u], np.sort(truth[u])[::-1][:5], atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_cosine_top_k_equals_brute_force_for_any_block(threads):
    """The compiled cosine top-k keeps a running k-best list per user: for any task size and
    thread count each user's list is the brute-force top k, ties by lower index."""
    dense = random_ratings(90, 30, 0.3, seed=11)
    truth = brute_force_user_similarity(dense, shrink=4.0, similarity="cosine")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train = sp.csr_matrix(dense)
        found = {
            (k, block): user_knn.user_similarity_topk(train, k, 4.0, "cosine", block_size=block)
            for k, block in ((7, 8), (7, 1), (89, 13))
        }
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(found[7, 8][0], found[7, 1][0])
    for (k, block), (idx, sim) in found.items():
        for u in range(90):
            row = truth[u]
            order = np.lexsort((np.arange(90), -row))[:k]
            want = [v for v in order if row[v] > 1e-6]  # float32 may leave ~1e-8 where truth is 0
            got = idx[u][: len(want)]
            # the k best values, each the true similarity of the neighbour it names, no repeats
            # (float32 may swap two neighbours whose float64 values differ by ~1e-8)
            np.testing.assert_allclose(sim[u][: len(want)], row[want], atol=1e-6)
            np.testing.assert_allclose(sim[u][: len(want)], row[got], atol=1e-6)
            assert len(set(got.tolist())) == len(want) and u not in got, (k, block, u)
            assert (sim[u][len(want) :] < 1e-6).all(), (k, block, u)
