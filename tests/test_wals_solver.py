"""WALS' conjugate-gradient row solve (models/wals.py) against an exact dense solve.

The reference builds every row's normal equations from the dense weight matrix (observed cells
w_ij, every other cell w0), with no Gramian trick and no CG, and solves them in float64.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
from test_models import write_tiny_snapshot

from models import wals
from models.data import Snapshot
from models.runtime import Runtime, use_runtime

OMEGA0, LAM = 0.1, 0.5


def tiny(seed: int = 0, shape=(40, 25)):
    """Weights with rows of very different lengths, an empty row and an empty column."""
    rng = np.random.default_rng(seed)
    density = np.linspace(0.05, 0.9, shape[0])[:, None]
    dense = np.where(rng.random(shape) < density, rng.integers(1, 6, shape), 0).astype(float)
    dense[5] = 0
    dense[:, 7] = 0
    return wals.confidence_weights(sp.csr_matrix(dense), 1.0, 1.0), rng


def dense_solve(fixed: np.ndarray, w_dense: np.ndarray) -> np.ndarray:
    """argmin_x sum_j c_ij (p_ij - x.y_j)^2 + lam |x|^2 per row, from the dense matrix."""
    obs = w_dense > 0
    c = np.where(obs, w_dense, OMEGA0)
    d = fixed.shape[1]
    return np.stack(
        [
            np.linalg.solve(fixed.T @ (c[i][:, None] * fixed) + LAM * np.eye(d), fixed.T @ (c[i] * obs[i]))
            for i in range(len(w_dense))
        ]
    )


def dense_objective(u, v, w_dense) -> float:
    obs = w_dense > 0
    pred = np.asarray(u, np.float64) @ np.asarray(v, np.float64).T
    weight = np.where(obs, w_dense, OMEGA0)
    return float(np.sum(weight * (obs - pred) ** 2) + LAM * (np.sum(np.square(u)) + np.sum(np.square(v))))


def test_cg_solve_matches_the_exact_dense_solve():
    """With d + 3 steps CG has converged (in exact arithmetic it needs d): float32 agrees with the
    float64 dense solve to 1e-4 absolute (the solutions are O(1)), whatever the block size or
    start; the empty row solves to exactly 0."""
    weights, rng = tiny()
    d = 6
    fixed = rng.normal(0, 0.3, (weights.shape[1], d))
    exact = dense_solve(fixed, weights.toarray())
    assert np.abs(exact).max() > 0.3  # not a trivially small solution
    for cells in (1, 16, 10**6):  # one row per block, a few rows per block, one block
        blocks = wals.RowBlocks(weights, OMEGA0, cells)
        for x0 in (np.zeros((weights.shape[0], d)), rng.normal(0, 1.0, (weights.shape[0], d))):
            got = wals.solve_rows_cg(fixed, blocks, x0, OMEGA0, LAM, steps=d + 3)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, exact, atol=1e-4, rtol=0)
            assert not got[5].any()
    # the float64 Gramian-trick solve is the same minimiser
    np.testing.assert_allclose(wals.solve_rows(fixed, weights, OMEGA0, LAM), exact, rtol=1e-9, atol=1e-12)


def test_cg_solve_is_the_same_on_any_number_of_threads():
    weights, rng = tiny(1)
    blocks = wals.RowBlocks(weights, OMEGA0, 32)
    assert len(blocks.blocks) > 3
    fixed, x0 = rng.normal(0, 0.3, (25, 4)), rng.normal(0, 0.3, (40, 4))
    alone = wals.solve_rows_cg(fixed, blocks, x0, OMEGA0, LAM, steps=2)
    with ThreadPoolExecutor(3) as pool:
        pooled = wals.solve_rows_cg(fixed, blocks, x0, OMEGA0, LAM, steps=2, pool=pool)
    np.testing.assert_array_equal(pooled, alone)


def test_one_cg_sweep_lowers_the_weighted_objective():
    """A warm-started CG half-step never raises the objective (CG minimises the row's quadratic
    over a space that contains the start), so one sweep of 3 steps lowers it; wals.objective
    (the Gramian-trick form) and wals.block_objective agree with the dense sum."""
    weights, rng = tiny(2)
    w_dense = weights.toarray()
    d = 5
    u, v = rng.normal(0, 0.3, (40, d)), rng.normal(0, 0.3, (25, d))
    v[7] = 0.0  # the empty column, as wals.fit starts it
    blocks = (wals.RowBlocks(weights, OMEGA0, 64), wals.RowBlocks(weights.T.tocsr(), OMEGA0, 64))
    start = dense_objective(u, v, w_dense)
    u1 = wals.solve_rows_cg(v, blocks[0], u, OMEGA0, LAM, steps=3)
    half = dense_objective(u1, v, w_dense)
    u2, v2 = wals.cg_sweep(u, v, blocks, OMEGA0, LAM, 3)
    np.testing.assert_array_equal(u2, u1)
    end = dense_objective(u2, v2, w_dense)
    assert end < half < start
    assert wals.objective(u2, v2, weights, OMEGA0, LAM) == pytest.approx(end, rel=1e-6)
    # the blockwise form fit reports (float32 products, float64 sums)
    assert wals.block_objective(u2, v2, blocks[0], OMEGA0, LAM) == pytest.approx(end, rel=1e-5)


def test_cg_sweeps_track_the_exact_sweeps():
    """From the same start, sweeps of 3 warm-started CG steps follow the exact sweeps: both lower
    the objective every sweep, and from the third sweep on they are within 1 % of each other
    (CG trails in the first sweeps; later it may be slightly ahead, ALS paths being local)."""
    weights, rng = tiny(3, shape=(60, 40))
    w_dense = weights.toarray()
    d = 8
    u = np.zeros((60, d))
    v = rng.normal(0, 0.1, (40, d))
    v[7] = 0.0
    blocks = (wals.RowBlocks(weights, OMEGA0, 128), wals.RowBlocks(weights.T.tocsr(), OMEGA0, 128))
    ue, ve, uc, vc = u, v, u, v
    last = (np.inf, np.inf)
    for sweep in range(1, 9):
        ue, ve = wals.sweep(ue, ve, weights, OMEGA0, LAM)
        uc, vc = wals.cg_sweep(uc, vc, blocks, OMEGA0, LAM, 3)
        exact, cg = dense_objective(ue, ve, w_dense), dense_objective(uc, vc, w_dense)
        assert exact < last[0] and cg < last[1]
        if sweep >= 3:
            assert cg == pytest.approx(exact, rel=1e-2), sweep
        last = (exact, cg)


def test_fit_is_the_same_on_1_and_2_threads_and_tracks_the_exact_fit(tmp_path):
    """The runtime's threads take whole row blocks, so the factors are bit-identical on any
    thread count; the CG fit's losses follow the exact fit's (same objective, same start)."""
    snap = Snapshot(write_tiny_snapshot(tmp_path / "snap"))
    config = wals.Config(dim=8, iterations=4, patience=10, block_floats=256)  # many blocks
    fits = {}
    for threads in (1, 2):
        with use_runtime(Runtime(threads=threads)):
            fits[threads] = wals.fit(snap, config, lambda _: None)
    for a, b in zip(fits[1].embeddings(), fits[2].embeddings()):
        np.testing.assert_array_equal(a, b)
    exact = wals.fit(snap, wals.Config(dim=8, iterations=4, patience=10, cg_steps=0), lambda _: None)
    cg_loss = [h["train_loss"] for h in fits[1].history]
    exact_loss = [h["train_loss"] for h in exact.history]
    np.testing.assert_allclose(cg_loss, exact_loss, rtol=1e-2)
    assert cg_loss == sorted(cg_loss, reverse=True)


def test_config_rejects_negative_cg_steps():
    with pytest.raises(ValueError, match="cg_steps"):
        wals.Config(cg_steps=-1)
    assert wals.Config(cg_steps=0).cg_steps == 0  # the exact solve
