"""mf_implicit: scorer contract, the sampled unobserved estimator, training step, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_models import write_tiny_snapshot

from models import mf_implicit as M
from models.base import TOPK
from models.config import ConfigError, parse_config
from models.data import Snapshot


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


@pytest.fixture(scope="module")
def model(snapshot) -> M.MFImplicit:
    return M.fit(snapshot, M.Config(), lambda _: None)


def tiny_problem(seed: int = 0):
    """A dense 5 x 9 observed pattern (item 0 = padding, never observed), random factors."""
    rng = np.random.default_rng(seed)
    n_users, n_items, d = 5, 9, 3
    dense = (rng.random((n_users, n_items)) < 0.35).astype(np.float64) * rng.integers(
        1, 6, (n_users, n_items)
    )
    dense[:, 0] = 0
    dense[0] = 0  # padding user
    dense[1, 1:] = 0
    dense[1, [2, 5]] = 3  # at least one observation per real user
    dense[4, 1:] = 1  # a user who has seen everything: no unobserved cell
    module = M.MFImplicitScorer(n_users, n_items, d, init_std=0.5)
    return dense, module


def exact_unobserved(dense, module, omega0):
    """omega0 * sum over unobserved cells (items >= 1) of (u.v)^2, per user, by brute force."""
    with torch.no_grad():
        pred = (module.user_factors @ module.item_factors.T).numpy().astype(np.float64)
    mask = dense == 0
    mask[:, 0] = False
    return omega0 * (pred**2 * mask).sum(1)


def summed_term_per_user(dense, module, config, rng):
    """Sum of each observed cell's unobserved term (what an epoch adds up), per user."""
    cells = M._Cells(M.confidence_weights(sp.csr_matrix(dense), 1.0, 1.0))
    neg, _ = M.sample_unobserved(cells.observed, cells.user, config.n_negatives, rng)
    u, i, w, inv_u, inv_i, n_unobs, neg = cells.batch(np.arange(len(cells)), neg)
    with torch.no_grad():
        u_vec = module.user_factors[u]
        p = (u_vec * module.item_factors[i]).sum(-1)
        term = M._unobserved_term(module, u_vec, p, neg, inv_u, n_unobs, config).double().numpy()
    return np.bincount(cells.user, weights=term, minlength=dense.shape[0])


def test_sampled_unobserved_term_is_unbiased_and_gramian_is_exact():
    dense, module = tiny_problem()
    omega0 = 0.1
    exact = exact_unobserved(dense, module, omega0)
    gram = summed_term_per_user(
        dense, module, M.Config(omega0=omega0, unobserved="gramian"), np.random.default_rng(0)
    )
    np.testing.assert_allclose(gram, exact, rtol=1e-4, atol=1e-6)

    config = M.Config(omega0=omega0, n_negatives=3, unobserved="sampled")
    rng = np.random.default_rng(1)
    draws = np.stack([summed_term_per_user(dense, module, config, rng) for _ in range(3000)])
    assert exact[4] == 0 and np.all(draws[:, 4] == 0)  # no unobserved cell: weight 0
    one = draws[0]
    assert not np.allclose(one, exact)  # a single draw is noisy...
    # ...its mean is the exact sum: tolerance ~ 5 standard errors of the mean
    sem = draws.std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - exact) <= 5 * sem + 1e-9), (draws.mean(0), exact, sem)
    np.testing.assert_allclose(draws.mean(0), exact, rtol=0.03)


def test_gramian_sparse_has_the_exact_value_and_its_epoch_gradient_is_exact():
    """Summed over every observed cell with fresh Gramians, "gramian_sparse" gives the exact
    unobserved term's value and its gradient on both tables, though each cell's gradient
    touches only its own user and item rows."""
    torch.manual_seed(0)  # the factors' draw, not the test order (xdist), sets the gradients' size
    dense, module = tiny_problem()
    dense[:, 8] = 0  # an item nobody saw: its exact gradient is 0 too
    observed = dense > 0
    with torch.no_grad():  # as fit starts them: rows without a train cell (and the padding) at 0
        module.user_factors[torch.from_numpy(~observed.any(1))] = 0.0
        module.item_factors[torch.from_numpy(~observed.any(0))] = 0.0
    config = M.Config(omega0=0.1, unobserved="gramian_sparse")
    cells = M._Cells(M.confidence_weights(sp.csr_matrix(dense), 1.0, 1.0))
    no_negatives = np.zeros((len(cells), config.n_negatives), np.int64)
    u, i, _, inv_u, inv_i, n_unobs, neg = cells.batch(np.arange(len(cells)), no_negatives)
    u_vec, v_vec = module.user_factors[u], module.item_factors[i]
    p = (u_vec * v_vec).sum(-1)
    term = M._unobserved_term(module, u_vec, p, neg, inv_u, n_unobs, config, v_vec, inv_i).sum()
    tables = [module.user_factors, module.item_factors]
    got = torch.autograd.grad(term, tables)

    unobserved = torch.from_numpy(~observed)
    unobserved[:, 0] = False
    exact = config.omega0 * ((module.user_factors @ module.item_factors.T) ** 2 * unobserved).sum()
    want = torch.autograd.grad(exact, tables)
    torch.testing.assert_close(term, exact, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0.1
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_sampled_negatives_are_never_train_positives(snapshot):
    observed = snapshot.train_matrix("ones")
    users = np.repeat(np.arange(snapshot.n_users), 20)
    items, m = M.sample_unobserved(observed, users, 50, np.random.default_rng(0))
    assert items.shape == (len(users), 50) and items.dtype == np.int64
    dense = observed.toarray() > 0
    assert not dense[users[:, None], items].any()
    has = m > 0
    assert (items[has] >= 1).all() and (items[has] < snapshot.n_items).all()
    np.testing.assert_array_equal(m, snapshot.n_items - 1 - dense[users].sum(1))
    # every unobserved item of a user is reachable: the draws cover the whole set
    u = int(np.argmax(m))
    drawn = np.unique(items[users == u])
    assert set(drawn) == set(np.flatnonzero(~dense[u])) - {0}


def test_scorer_shapes_dtypes_and_padding(model, snapshot):
    spec = model.export_spec()
    assert [t.name for t in spec.inputs] == ["user_idx"] and spec.topk == TOPK
    users = torch.from_numpy(np.unique(snapshot.ratings("test").user_idx))
    with torch.no_grad():
        for x in (spec.example_inputs[0], users):
            out = model.scorer()(x)
            assert out.dtype == torch.float32 and out.shape == (len(x), snapshot.n_items)
            assert (out[:, 0] == -1e9).all() and torch.isfinite(out).all()
    row = model.history[0]
    assert {"epoch", "train_loss", "valid_metric", "valid_metric_name", "rows_per_s", "seconds"} <= set(row)
    assert row["valid_metric_name"] == "ndcg@10" and not model.scorer().training


def test_unknown_user_gets_train_popularity(model, snapshot):
    pop = snapshot.item_popularity()
    expected = torch.from_numpy(pop / pop.max())
    with torch.no_grad():
        out = model.scorer()(torch.tensor([0, -3, snapshot.n_users, 10**9]))
    assert torch.equal(out[:, 1:], expected[1:].expand(4, -1))
    assert torch.equal(model.module.popularity, expected)
    with torch.no_grad():
        known = model.scorer()(torch.tensor([1, 2]))
    assert not torch.equal(known[:, 1:], expected[1:].expand(2, -1))


@pytest.mark.parametrize("unobserved", M.UNOBSERVED)
def test_one_optimisation_step_lowers_the_loss(model, snapshot, unobserved):
    config = parse_config(M.Config, {"unobserved": unobserved})
    batch = M.MFImplicit.training_batch(snapshot, config, 128)
    assert batch[-1].shape == (128, config.n_negatives)
    torch.manual_seed(0)
    module = M.MFImplicitScorer(snapshot.n_users, snapshot.n_items, config.dim, config.init_std)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    before = M.MFImplicit.loss(module, batch, config)
    opt.zero_grad()
    before.backward()
    opt.step()
    assert M.MFImplicit.loss(module, batch, config).item() < before.item()


def test_save_load_round_trip_and_determinism(model, snapshot, tmp_path):
    model.save(tmp_path / "m")
    loaded = M.MFImplicit.load(tmp_path / "m")
    assert loaded.config == model.config and loaded.history == model.history
    users = torch.arange(-1, snapshot.n_users + 1)
    again = M.fit(snapshot, model.config, lambda _: None)
    with torch.no_grad():
        ref = model.scorer()(users)
        assert torch.equal(loaded.scorer()(users), ref)
        assert torch.equal(again.scorer()(users), ref)


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        parse_config(M.Config, {"not_a_field": 1})
    assert "not_a_field" in str(e.value) and "mf_implicit" in str(e.value) and "n_negatives" in str(e.value)
    with pytest.raises(ConfigError, match="unobserved"):
        parse_config(M.Config, {"unobserved": "bpr"})
    with pytest.raises(ConfigError, match="omega0"):
        parse_config(M.Config, {"omega0": 0.0})
    assert parse_config(M.Config, {}) == M.Config()


def test_epoch_negatives_in_chunks_are_one_whole_draw(snapshot):
    """Drawn a chunk at a time as the loop reaches the cells, an epoch's negatives are the same
    numbers as one draw for every cell, and rng ends where that draw leaves it."""
    observed = snapshot.train_matrix("ones")
    users = np.random.default_rng(1).integers(0, snapshot.n_users, 1000)
    whole_rng, chunk_rng = np.random.default_rng(7), np.random.default_rng(7)
    whole, _ = M.sample_unobserved(observed, users, 4, whole_rng)
    negatives = M.EpochNegatives(M.UnobservedSampler(observed), users, 4, chunk_rng, chunk=96)
    got = np.concatenate([negatives[slice(lo, min(lo + 32, 990))] for lo in range(0, 990, 32)])
    negatives.finish()  # the last 10 cells, as a loop that skipped its last batch
    np.testing.assert_array_equal(got, whole[:990])
    assert whole_rng.random() == chunk_rng.random()
    with pytest.raises(IndexError, match="inside the drawn chunk"):
        negatives[slice(0, 32)]  # slices only move forward


def test_fit_with_small_negative_chunks_is_the_same_model(snapshot, monkeypatch):
    config = M.Config(unobserved="sampled", epochs=3)  # the estimator that draws negatives
    model = M.fit(snapshot, config, lambda _: None)
    monkeypatch.setattr(M, "NEGATIVE_CHUNK_BATCHES", 1)  # a chunk per batch
    again = M.fit(snapshot, config, lambda _: None)
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[name]), name
