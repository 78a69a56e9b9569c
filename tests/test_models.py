"""Zoo-wide tests over models.catalogue.FAMILIES plus family-specific numerics.

Every test builds its own tiny snapshot (same parquet layout as pipeline/snapshot.py)
with planted low-rank structure, so families have something real to learn.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from common.metrics import auc, rmse
from models import cdae, item_knn, wals
from models.base import Task
from models.catalogue import FAMILIES, load_model
from models.config import parse_config
from models.data import Snapshot
from models.layers import FactorizationMachine

SPARSE = (
    "user_idx",
    "item_idx",
    "gender_idx",
    "age_idx",
    "occupation_idx",
    "genre_idx",
    "year_idx",
    "hour_idx",
    "weekday_idx",
)
DENSE = ("dense_user_activity", "dense_item_popularity", "dense_item_age")
N_USERS, N_ITEMS, PER_USER = 60, 50, 30


def write_tiny_snapshot(root: Path, seed: int = 0) -> Path:
    """Ratings from mu + biases + a rank-2 interaction; temporal-ish random split; some
    valid/test rows by unknown users (user_idx 0), as the real marts have."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(N_USERS + 1, 2))
    q = rng.normal(size=(N_ITEMS + 1, 2))
    bu, bi = rng.normal(0, 0.4, N_USERS + 1), rng.normal(0, 0.6, N_ITEMS + 1)
    rows = []
    for u in range(1, N_USERS + 1):
        for i in rng.choice(np.arange(1, N_ITEMS + 1), PER_USER, replace=False):
            r = 3.3 + bu[u] + bi[i] + 0.8 * p[u] @ q[i] + rng.normal(0, 0.3)
            rows.append((u, int(i), float(np.clip(np.round(r), 1, 5))))
    n = len(rows)
    split = rng.choice(["train", "valid", "test"], size=n, p=[0.8, 0.1, 0.1])
    users = np.array([r[0] for r in rows])
    items = np.array([r[1] for r in rows])
    ratings = np.array([r[2] for r in rows])
    held = split != "train"
    users = np.where(held & (users > N_USERS - 3), 0, users)  # 3 users only after the cut
    ts = np.arange(n, dtype=np.int64)
    tables = {
        "fct_ratings": {
            "event_id": np.arange(n),
            "user_idx": users.astype(np.int32),
            "item_idx": items.astype(np.int32),
            "rating": ratings,
            "ts": ts,
            "split": split,
        },
    }
    card = {
        "user_idx": N_USERS + 1,
        "item_idx": N_ITEMS + 1,
        "gender_idx": 3,
        "age_idx": 8,
        "occupation_idx": 22,
        "genre_idx": 19,
        "year_idx": 8,
        "hour_idx": 25,
        "weekday_idx": 8,
    }
    ctr = {
        "event_id": np.arange(n),
        "split": split,
        "ts": ts,
        "label_like": (ratings >= 4).astype(np.int32),
        "label_love": (ratings >= 5).astype(np.int32),
        "user_idx": users.astype(np.int32),
        "item_idx": items.astype(np.int32),
    }
    for f in SPARSE[2:]:
        ctr[f] = rng.integers(1, card[f], n).astype(np.int32)
    for f in DENSE:
        ctr[f] = rng.normal(size=n)
    hist = [[int(x) for x in items[max(0, k - 5) : k]] for k in range(n)]
    tables["fct_ctr_samples"] = {
        **ctr,
        "history_item_idx": pa.array(hist, pa.list_(pa.int32())),
        "history_len": np.array([len(h) for h in hist], np.int32),
    }
    tables["dim_users"] = {"user_idx": np.arange(1, N_USERS + 1, dtype=np.int32)}
    tables["dim_items"] = {"item_idx": np.arange(1, N_ITEMS + 1, dtype=np.int32)}
    tables["user_stats"] = {"user_idx": np.arange(1, N_USERS + 1, dtype=np.int32)}
    tables["item_stats"] = {"item_idx": np.arange(1, N_ITEMS + 1, dtype=np.int32)}
    root.mkdir(parents=True, exist_ok=True)
    for name, cols in tables.items():
        pq.write_table(pa.table(cols), root / f"{name}.parquet")
    meta = {
        "fingerprint": "tiny",
        "n_users": N_USERS + 1,
        "n_items": N_ITEMS + 1,
        "sparse_fields": list(SPARSE),
        "sparse_cardinality": card,
        "dense_fields": list(DENSE),
        "split_rows": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
        "rating_range": [1.0, 5.0],
        "max_history_len": 5,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


_FITTED: dict[str, object] = {}


def upstream_args(fam, get) -> list:
    """A family built on other models (emb_knn) also gets them, fitted on the same snapshot."""
    return [{u: get(u) for u in fam.upstream}] if fam.upstream else []


@pytest.fixture
def fitted(snapshot):
    def get(name: str):
        if name not in _FITTED:
            fam = FAMILIES[name]
            config = parse_config(fam.config_cls, {})
            _FITTED[name] = fam.fit(snapshot, config, lambda _: None, *upstream_args(fam, get))
        return _FITTED[name]

    yield get


def _ctr_inputs(snapshot: Snapshot, model, history: bool) -> tuple[torch.Tensor, ...]:
    c = snapshot.ctr("test", max_history=model.meta["max_history"] if history else 1)
    arrays = (c.sparse, c.dense, c.history) if history else (c.sparse, c.dense)
    return tuple(torch.from_numpy(a) for a in arrays)


def _history_inputs(snapshot: Snapshot, model) -> tuple[torch.Tensor, ...]:
    te = snapshot.ratings("test")
    hist, hr = item_knn.history_arrays(snapshot.train_matrix(), te.user_idx)
    return torch.from_numpy(te.item_idx), torch.from_numpy(hist), torch.from_numpy(hr)


def _user_items_inputs(snapshot: Snapshot, model) -> tuple[torch.Tensor, ...]:
    users = np.unique(snapshot.ratings("test").user_idx)
    items = cdae.user_item_rows(cdae.binary_train_matrix(snapshot), users)
    return torch.from_numpy(users), torch.from_numpy(items)


# Scorer inputs built from the snapshot's test rows, by the scorer's input names (the contracts
# of docs/MODEL_API.md), so a new family with a known signature needs nothing here.
SNAPSHOT_INPUTS = {
    ("user_idx", "item_idx"): lambda s, m: tuple(
        torch.from_numpy(a) for a in (s.ratings("test").user_idx, s.ratings("test").item_idx)
    ),
    ("item_idx", "hist_item_idx", "hist_rating"): _history_inputs,
    ("user_idx",): lambda s, m: (torch.from_numpy(np.unique(s.ratings("test").user_idx)),),
    ("user_idx", "user_items"): _user_items_inputs,
    ("sparse", "dense"): lambda s, m: _ctr_inputs(s, m, history=False),
    ("sparse", "dense", "history"): lambda s, m: _ctr_inputs(s, m, history=True),
}


def snapshot_inputs(model, snapshot: Snapshot) -> tuple[torch.Tensor, ...]:
    names = tuple(t.name for t in model.export_spec().inputs)
    assert names in SNAPSHOT_INPUTS, f"{model.family}: no test inputs for scorer inputs {names}"
    return SNAPSHOT_INPUTS[names](snapshot, model)


def check_outputs(model, inputs, out: torch.Tensor):
    spec = model.export_spec()
    assert len(spec.outputs) == 1
    o = spec.outputs[0]
    assert out.dtype == torch.float32
    batch = inputs[0].shape[0]
    expected = tuple(batch if d == "batch" else d for d in o.shape)
    assert tuple(out.shape) == expected, (o, out.shape)
    assert torch.isfinite(out).all()
    if model.task is Task.TOPK:
        assert (out[:, 0] == -1e9).all()
    if model.task is Task.RATING:
        lo, hi = model.meta["rating_range"]
        assert (out >= lo).all() and (out <= hi).all()


# --- zoo-wide ---------------------------------------------------------------------------
def test_registry_lines_are_consistent():
    for name, fam in FAMILIES.items():
        assert fam.name == name and isinstance(fam.task, Task)
        # one family per module models/<name>.py: its Config, its fit, its model class
        assert fam.fit.__module__ == fam.config_cls.__module__ == fam.model.__module__ == f"models.{name}"
        assert fam.model.family == name and fam.model.config_cls is fam.config_cls
        assert fam.load == fam.model.load and fam.upstream == fam.model.upstream
        # the loss hooks come in pairs: both (gradient-trained) or neither (memory-based)
        assert (fam.model.loss is None) == (fam.model.training_batch is None), name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scorer_shapes_on_example_and_snapshot(name, fitted, snapshot):
    model = fitted(name)
    spec = model.export_spec()
    assert [t.name for t in spec.inputs] and len(spec.inputs) == len(spec.example_inputs)
    for t, x in zip(spec.inputs, spec.example_inputs):
        assert str(x.dtype) == f"torch.{t.dtype}", t
        assert x.dim() == len(t.shape) and x.shape[0] > 1  # batch > 1: not specialised by export
        assert all(isinstance(d, str) or x.shape[a] == d for a, d in enumerate(t.shape))
    assert not model.scorer().training
    with torch.no_grad():
        check_outputs(model, spec.example_inputs, model.scorer()(*spec.example_inputs))
        inputs = snapshot_inputs(model, snapshot)
        check_outputs(model, inputs, model.scorer()(*inputs))
    assert model.history and {
        "epoch",
        "train_loss",
        "valid_metric",
        "valid_metric_name",
        "rows_per_s",
        "seconds",
    } <= set(model.history[0])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_unknown_index_zero_follows_documented_fallback(name, fitted, snapshot):
    model = fitted(name)
    spec = model.export_spec()
    zeros = tuple(torch.zeros_like(x) for x in spec.example_inputs)
    with torch.no_grad():
        out = model.scorer()(*zeros)
    check_outputs(model, zeros, out)
    m = model.scorer()
    if model.task is Task.TOPK:  # unknown user (with an empty item vector) -> train popularity
        assert torch.equal(out[:, 1:], m.popularity[1:].expand(len(out), -1))
    if model.task is Task.RATING:  # nothing known -> the train mean, clipped to the rating range
        lo, hi = model.meta["rating_range"]
        mean = float(np.clip(snapshot.ratings("train").rating.mean(), lo, hi))
        assert torch.allclose(out, torch.tensor(mean, dtype=out.dtype).expand_as(out))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_optimisation_step_lowers_the_loss(name, fitted, snapshot):
    hooks = FAMILIES[name].model
    model = fitted(name)
    # gradient-trained families, and only they, expose the loss they are fitted with
    assert (hooks.loss is None) == (not list(model.scorer().parameters()))
    if hooks.loss is None:
        pytest.skip(f"{name} is not trained by gradient descent")
    torch.manual_seed(0)
    module = copy.deepcopy(model.module).eval()  # eval: dropout off, so the loss is a fixed function
    config = model.config
    if hasattr(config, "unknown_rate"):
        config = parse_config(type(config), {"unknown_rate": 0.0})
    batch = hooks.training_batch(snapshot, config, 128)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    before = hooks.loss(module, batch, config)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = hooks.loss(module, batch, config)
    assert after.item() < before.item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_save_load_round_trip_gives_identical_scores(name, fitted, tmp_path):
    model = fitted(name)
    model.save(tmp_path / name)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.pt"]
    loaded = FAMILIES[name].load(tmp_path / name)
    again = load_model(tmp_path / name)
    assert loaded.config == model.config and loaded.history == model.history
    inputs = model.export_spec().example_inputs
    with torch.no_grad():
        ref = model.scorer()(*inputs)
        assert torch.equal(loaded.scorer()(*inputs), ref)
        assert torch.equal(again.scorer()(*inputs), ref)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_errors_name_field_family_and_allowed(name):
    cls = FAMILIES[name].config_cls
    with pytest.raises(ValueError) as e:
        parse_config(cls, {"not_a_field": 1})
    msg = str(e.value)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert "not_a_field" in msg and name in msg and all(f in msg for f in fields)
    numeric = next(f.name for f in dataclasses.fields(cls) if isinstance(f.default, int | float))
    with pytest.raises(ValueError, match=numeric):
        parse_config(cls, {numeric: "zero"})
    assert parse_config(cls, {}) == cls()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fit_is_deterministic(name, fitted, snapshot):
    fam = FAMILIES[name]
    again = fam.fit(snapshot, parse_config(fam.config_cls, {}), lambda _: None, *upstream_args(fam, fitted))
    inputs = again.export_spec().example_inputs
    with torch.no_grad():
        assert torch.equal(fitted(name).scorer()(*inputs), again.scorer()(*inputs))


# --- item_knn ---------------------------------------------------------------------------
def brute_force_similarity(dense: np.ndarray, shrink: float) -> np.ndarray:
    """Adjusted cosine with shrinkage from a dense users x items matrix (0 = missing)."""
    mask = dense != 0
    means = np.array([row[m].mean() if m.any() else 0.0 for row, m in zip(dense, mask)])
    c = np.where(mask, dense - means[:, None], 0.0)
    n_items = dense.shape[1]
    sim = np.zeros((n_items, n_items))
    for i in range(n_items):
        for j in range(n_items):
            ni, nj = np.linalg.norm(c[:, i]), np.linalg.norm(c[:, j])
            if i == j or ni == 0 or nj == 0:
                continue
            common = np.sum(mask[:, i] & mask[:, j])
            sim[i, j] = c[:, i] @ c[:, j] / (ni * nj) * common / (common + shrink)
    return np.maximum(sim, 0.0)


def test_item_knn_similarity_matches_brute_force():
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((12, 9)) < 0.6, rng.integers(1, 6, (12, 9)), 0).astype(np.float64)
    dense[:, 0] = 0  # padding column
    dense[0] = 0  # padding row
    truth = brute_force_similarity(dense, shrink=3.0)
    # keep every neighbour: compare the full (positive) matrix
    idx, sim = item_knn.item_similarity_topk(sp.csr_matrix(dense), k=8, shrink=3.0, block_size=4)
    got = np.zeros_like(truth)
    for i in range(9):
        for j, s in zip(idx[i], sim[i]):
            if j:
                got[i, j] = s
    np.testing.assert_allclose(got, truth, atol=1e-6)
    # top-k keeps the k largest per row
    idx, sim = item_knn.item_similarity_topk(sp.csr_matrix(dense), k=3, shrink=3.0, block_size=5)
    for i in range(9):
        np.testing.assert_allclose(sim[i], np.sort(truth[i])[::-1][:3], atol=1e-6)


def test_item_knn_neighbours_do_not_depend_on_blocks_or_threads():
    """The compiled top-k against the dense brute force, and bit-identical lists for any task
    size and thread count (ties, from the integer ratings, go to the lower index)."""
    rng = np.random.default_rng(5)
    dense = np.where(rng.random((90, 41)) < 0.3, rng.integers(1, 11, (90, 41)) / 2, 0.0)
    dense[:, 0] = 0  # padding column
    dense[0] = 0  # padding row
    train = sp.csr_matrix(dense)
    truth = brute_force_similarity(dense, shrink=2.0)
    idx, sim = item_knn.item_similarity_topk(train, 6, 2.0, block_size=1, threads=1)
    assert (sim > 0).sum() > 100  # most items have a full list of positive neighbours
    np.testing.assert_allclose(np.sort(truth, 1)[:, ::-1][:, :6], sim, atol=1e-6)
    for block, threads in ((3, 2), (7, 1), (64, 2)):
        b_idx, b_sim = item_knn.item_similarity_topk(train, 6, 2.0, block_size=block, threads=threads)
        np.testing.assert_array_equal(b_idx, idx)
        np.testing.assert_array_equal(b_sim, sim)


def test_item_knn_predict_equals_the_scorer_on_shuffled_histories(snapshot):
    """``predict`` reads known items' neighbour ratings from the train CSR; the scorer searches
    the history it is given, in any order: the same predictions, bit for bit."""
    model = item_knn.fit(snapshot, item_knn.Config(k=5), lambda _: None)
    train = snapshot.train_matrix()
    rows = snapshot.ratings("valid")
    users = np.concatenate([rows.user_idx, [0, 0, 5]])
    items = np.concatenate([rows.item_idx, [0, 7, 0]])
    hist, ratings = item_knn.history_arrays(train, users)
    shuffle = np.argsort(np.random.default_rng(0).random(hist.shape), axis=1)
    hist, ratings = np.take_along_axis(hist, shuffle, 1), np.take_along_axis(ratings, shuffle, 1)
    with torch.no_grad():
        ref = model.scorer()(torch.from_numpy(items), torch.from_numpy(hist), torch.from_numpy(ratings))
    got = item_knn.predict(model, train, users, items)
    assert np.array_equal(got, ref.numpy())
    assert len(np.unique(got)) > 100


def test_item_knn_scorer_counts_the_first_of_duplicated_items(snapshot):
    """For known items (item-centred), a history that repeats a neighbour with another rating
    or holds unknown ids predicts as the history without them: the search finds the first
    slot, whatever the width."""
    model = item_knn.fit(snapshot, item_knn.Config(k=5), lambda _: None)
    scorer = model.scorer()
    items = torch.arange(1, 41)
    nbr = scorer.nbr_idx[items]
    hist, ratings = nbr[:, :3].clone(), torch.tensor([[5.0, 1.0, 3.0]]).repeat(40, 1)
    with torch.no_grad():
        clean = scorer(items, hist, ratings)
        extra = [nbr[:, :1], torch.full((40, 1), 10**9), torch.zeros(40, 4, dtype=torch.int64)]
        dup_hist = torch.cat([hist, *extra], 1)
        dup_ratings = torch.cat([ratings, torch.ones(40, 2), torch.zeros(40, 4)], 1)
        assert torch.equal(scorer(items, dup_hist, dup_ratings), clean)
    assert len(torch.unique(clean)) > 5


@pytest.mark.parametrize("prediction", ["item_centred", "seed"])
def test_item_knn_scorer_equals_numpy_reference(snapshot, prediction):
    model = item_knn.fit(snapshot, item_knn.Config(k=5, prediction=prediction), lambda _: None)
    train = snapshot.train_matrix()
    rows = [snapshot.ratings(s) for s in ("valid", "test")]
    users = np.concatenate([r.user_idx for r in rows] + [np.array([0, 0, 5])])
    items = np.concatenate([r.item_idx for r in rows] + [np.array([0, 7, 0])])
    m = model.scorer()
    ref = item_knn.predict_numpy(
        m.nbr_idx.numpy(),
        m.nbr_sim.numpy(),
        m.item_mean.numpy(),
        model.meta["global_mean"],
        model.meta["rating_range"],
        train,
        users,
        items,
        centred=prediction == "item_centred",
    )
    got = item_knn.predict(model, train, users, items, batch=7)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the history's order and padding length do not matter
    hist, hr = item_knn.history_arrays(train, users)
    perm = np.random.default_rng(0).permutation(hist.shape[1])
    pad = np.zeros((len(users), 3))
    with torch.no_grad():
        out = m(
            torch.from_numpy(items),
            torch.from_numpy(np.hstack([hist[:, perm], pad]).astype(np.int64)),
            torch.from_numpy(np.hstack([hr[:, perm], pad]).astype(np.float32)),
        )
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


# --- wals -------------------------------------------------------------------------------
def dense_objective(u, v, w_dense, omega0, lam):
    obs = w_dense > 0
    pred = u @ v.T
    weight = np.where(obs, w_dense, omega0)
    return float(np.sum(weight * (obs.astype(float) - pred) ** 2) + lam * (np.sum(u**2) + np.sum(v**2)))


def test_wals_sweep_lowers_the_weighted_objective():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(
        np.where(rng.random((15, 11)) < 0.3, rng.integers(1, 6, (15, 11)), 0).astype(float)
    )
    w = wals.confidence_weights(counts, alpha=1.0, eps=1.0)
    w_dense = w.toarray()
    omega0, lam = 0.1, 0.5
    u, v = rng.normal(0, 0.3, (15, 4)), rng.normal(0, 0.3, (11, 4))
    start = dense_objective(u, v, w_dense, omega0, lam)
    assert wals.objective(u, v, w, omega0, lam) == pytest.approx(start)
    u2 = wals.solve_rows(v, w, omega0, lam, chunk_nnz=5)
    # the half-step is the exact minimiser: the dense gradient w.r.t. U vanishes
    obs = w_dense > 0
    weight = np.where(obs, w_dense, omega0)
    grad = -2 * (weight * (obs - u2 @ v.T)) @ v + 2 * lam * u2
    assert np.abs(grad).max() < 1e-8
    u3, v3 = wals.sweep(u, v, w, omega0, lam, chunk_nnz=5)
    np.testing.assert_allclose(u3, u2)
    end = dense_objective(u3, v3, w_dense, omega0, lam)
    assert end < start
    assert wals.objective(u3, v3, w, omega0, lam) == pytest.approx(end)


# --- mf_sgd / deepfm / metrics ------------------------------------------------------------
def test_mf_sgd_unknown_user_gets_mean_plus_item_bias(fitted):
    m = fitted("mf_sgd").scorer()
    item = torch.tensor([3, 3])
    with torch.no_grad():
        got = m(torch.tensor([0, 0]), item)
        assert torch.allclose(got, (m.global_mean + m.item_bias.weight[3, 0]).clamp(1, 5).expand(2))


def test_user_knn_unknown_user_gets_damped_item_mean(fitted):
    m = fitted("user_knn").scorer()
    with torch.no_grad():
        got = m(torch.tensor([0, 0]), torch.tensor([3, 3]))
    assert torch.allclose(got, m.item_fallback[3].clamp(1, 5).expand(2))


def test_mf_sgd_beats_the_global_mean(fitted, snapshot):
    model = fitted("mf_sgd")
    te, tr = snapshot.ratings("test"), snapshot.ratings("train")
    pred = model.score(te.user_idx, te.item_idx).numpy()
    baseline = rmse(te.rating, np.full(len(te), tr.rating.mean()))
    assert rmse(te.rating, pred) < 0.9 * baseline
    assert model.module.user.weight[0].abs().sum() == 0 and model.module.item.weight[0].abs().sum() == 0


def test_fm_layer_equals_explicit_pairwise_sum():
    emb = torch.randn(3, 5, 4)
    explicit = sum((emb[:, a] * emb[:, b]).sum(-1) for a in range(5) for b in range(a + 1, 5))
    torch.testing.assert_close(FactorizationMachine()(emb), explicit)


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auc(y, s) == pytest.approx(np.mean(pairs))


def test_wals_row_solve_is_the_same_for_heavy_rows():
    """Rows with more cells than a chunk take the single-matmul path; it must agree."""
    rng = np.random.default_rng(0)
    dense = (rng.random((30, 12)) < 0.5) * rng.integers(1, 6, (30, 12))
    weights = wals.confidence_weights(sp.csr_matrix(dense.astype(np.float64)), 1.0, 1.0)
    fixed = rng.normal(size=(12, 4))
    chunked = wals.solve_rows(fixed, weights, 0.1, 2.0, chunk_nnz=10_000)
    one_by_one = wals.solve_rows(fixed, weights, 0.1, 2.0, chunk_nnz=1)
    np.testing.assert_allclose(one_by_one, chunked, rtol=1e-8, atol=1e-10)
