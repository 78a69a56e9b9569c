"""Every metric against a reference: brute force, hand-computed cases, direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics import (
    auc,
    evaluate_ctr,
    evaluate_rating,
    evaluate_topk,
    gauc,
    interaction_matrix,
    logloss,
    mae,
    rank_topk,
    rmse,
)
from evaluation import baselines

D = 1.0 / np.log2(np.arange(2, 12))  # DCG discounts of ranks 0..9


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------
def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(equal), over all positive/negative pairs."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def reference_topk(scores, train, test, k, catalogue):
    """Per-user loop, straight from the definitions; ties by lower item index."""
    out = {m: [] for m in ("precision", "recall", "ndcg", "hr", "map")}
    recommended = set()
    for row, (seen, rel) in enumerate(zip(train, test)):
        rel = set(rel) - set(seen) - {0}
        if not rel:
            continue
        ranked = sorted((i for i in range(scores.shape[1]) if i not in seen and i != 0),
                        key=lambda i: (-scores[row, i], i))[:k]  # fmt: skip
        recommended |= set(ranked)
        hits = [i in rel for i in ranked]
        n_hit = sum(hits)
        out["precision"].append(n_hit / k)
        out["recall"].append(n_hit / len(rel))
        out["hr"].append(float(n_hit > 0))
        dcg = sum(1 / math.log2(j + 2) for j, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(rel))))
        out["ndcg"].append(dcg / idcg)
        ap = sum(sum(hits[: j + 1]) / (j + 1) for j, h in enumerate(hits) if h)
        out["map"].append(ap / min(k, len(rel)))
    res = {f"{m}@{k}": float(np.mean(v)) for m, v in out.items()}
    res[f"coverage@{k}"] = len(recommended & set(catalogue)) / len(catalogue)
    return res


def as_csr(sets: list[list[int]], n_items: int):
    users = np.array([u for u, s in enumerate(sets) for _ in s], dtype=np.int64)
    items = np.array([i for s in sets for i in s], dtype=np.int64)
    return interaction_matrix(users, items, len(sets), n_items)


# --------------------------------------------------------------------------------------
# Rating
# --------------------------------------------------------------------------------------
def test_rmse_mae_hand():
    y, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 1.0, 4.0])
    assert rmse(y, p) == pytest.approx(math.sqrt((1 + 0 + 4 + 0) / 4))
    assert mae(y, p) == pytest.approx((1 + 0 + 2 + 0) / 4)
    assert evaluate_rating(y, p) == {"rmse": rmse(y, p), "mae": mae(y, p), "n_rows": 4}


# --------------------------------------------------------------------------------------
# CTR
# --------------------------------------------------------------------------------------
def test_auc_hand_cases():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == pytest.approx(0.5)  # all tied
    assert auc(np.array([1, 0]), np.array([2.0, 1.0])) == 1.0
    assert auc(np.array([1, 0]), np.array([1.0, 2.0])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300).astype(np.float32)  # heavy ties
    assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_logloss_matches_direct_formula_and_clips():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    z = rng.normal(0, 3, 200)
    p = 1 / (1 + np.exp(-z))
    direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, z) == pytest.approx(direct, rel=1e-10)
    # A confident mistake costs -log(eps), not infinity; a confident hit costs ~0.
    assert logloss(np.array([0]), np.array([1e4])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert logloss(np.array([1]), np.array([1e4])) == pytest.approx(1e-7, rel=1e-3)


def test_gauc_hand_case():
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.5, 0.95, 0.2, 0.1, 0.3, 0.4])
    # user 1: AUC 0.5 on 3 rows; user 2: AUC 1 on 2 rows; user 3 has one class: skipped.
    assert gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_gauc_matches_per_user_loop():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 500)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 4, 500).astype(float)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * pairwise_auc(y[m], s[m])
            den += m.sum()
    assert gauc(y, s, users) == pytest.approx(num / den, abs=1e-12)


def test_evaluate_ctr_keys_and_task_suffix():
    y = np.array([1, 0, 1, 0])
    z = np.array([2.0, -1.0, 0.5, 0.7])
    u = np.array([1, 1, 2, 2])
    out = evaluate_ctr(y, z, u)
    assert set(out) == {"auc", "logloss", "gauc", "gauc_users", "n_rows", "positive_rate"}
    assert out["gauc_users"] == 2 and out["n_rows"] == 4
    assert set(evaluate_ctr(y, z, u, task_name="like")) == {f"{k}_like" for k in out}


# --------------------------------------------------------------------------------------
# Top-K
# --------------------------------------------------------------------------------------
def test_rank_topk_ties_go_to_lower_index():
    s = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert rank_topk(s, 2).tolist() == [[1, 2]]
    assert rank_topk(s, 4).tolist() == [[1, 2, 4, 3]]


def hand_case():
    """Three users over items 0..7 (0 = padding)."""
    users = np.array([1, 2, 3])
    train = as_csr([[], [1], [2, 3], [3]], 8)
    test = as_csr([[], [2, 5], [3, 6], [3]], 8)
    scores = np.array(
        [
            # padding (9) and the train item 1 (10) score highest and must be skipped
            [9, 10, 8, 1, 7, 6, 2, 0],
            # all tied: ranking by item index 1, 4, 5, 6, 7 (2, 3 are train items)
            [0, 5, 5, 5, 5, 5, 5, 5],
            # user 3's only test item is a train item: skipped
            [0, 1, 2, 3, 4, 5, 6, 7],
        ],
        dtype=np.float32,
    )
    return users, train, test, scores


def test_topk_hand_computed():
    users, train, test, scores = hand_case()
    out = evaluate_topk(scores, train, test, users=users, ks=(2, 4))
    # user 1 ranks 2, 4, 5, 6 | relevant {2, 5}: hits at ranks 0 and 2
    # user 2 ranks 1, 4, 5, 6 | relevant {6} (3 is a train item): hit at rank 3
    idcg2 = D[0] + D[1]
    expected = {
        "precision@2": (1 / 2 + 0) / 2,
        "recall@2": (1 / 2 + 0) / 2,
        "hr@2": (1 + 0) / 2,
        "ndcg@2": (D[0] / idcg2 + 0) / 2,
        "map@2": ((1 / 1) / 2 + 0) / 2,
        "precision@4": (2 / 4 + 1 / 4) / 2,
        "recall@4": (1 + 1) / 2,
        "hr@4": 1.0,
        "ndcg@4": ((D[0] + D[2]) / idcg2 + D[3] / D[0]) / 2,
        "map@4": ((1 / 1 + 2 / 3) / 2 + (1 / 4) / 1) / 2,
        # catalogue = items with a train entry = {1, 2, 3}; recommended: 1, 2 (and 4, 5, 6)
        "coverage@2": 2 / 3,
        "coverage@4": 2 / 3,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    assert out["n_users"] == 2 and out["n_users_skipped"] == 1 and out["catalogue_size"] == 3
    assert not any(k.startswith("sampled_") for k in out)

    wide = evaluate_topk(scores, train, test, users=users, ks=(2, 4), catalogue=np.arange(8))
    # catalogue 1..7 (0 is never an item): top-2 union {1, 2, 4}, top-4 union {1, 2, 4, 5, 6}
    assert wide["coverage@2"] == pytest.approx(3 / 7)
    assert wide["coverage@4"] == pytest.approx(5 / 7)


def test_topk_k_beyond_rankable_items():
    users, train, test, scores = hand_case()
    out = evaluate_topk(scores, train, test, users=users, ks=(10,))
    # user 1 can rank 6 items and hits 2 of them; precision still divides by k = 10
    assert out["precision@10"] == pytest.approx((2 / 10 + 1 / 10) / 2)
    assert out["recall@10"] == 1.0


def test_topk_callable_batches_equal_array():
    users, train, test, scores = hand_case()
    by_row = dict(zip(users.tolist(), scores))
    batched = evaluate_topk(
        lambda u: np.stack([by_row[int(x)] for x in u]), train, test, users=users, ks=(2, 4), batch_size=1
    )
    assert batched == evaluate_topk(scores, train, test, users=users, ks=(2, 4))


@pytest.mark.parametrize("seed", range(3))
def test_topk_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 30
    train = [
        rng.choice(np.arange(1, n_items), rng.integers(0, 8), replace=False).tolist() for _ in range(n_users)
    ]
    test = [
        rng.choice(np.arange(1, n_items), rng.integers(1, 6), replace=False).tolist() for _ in range(n_users)
    ]
    scores = rng.integers(0, 5, (n_users, n_items)).astype(np.float32)  # many ties
    out = evaluate_topk(
        scores, as_csr(train, n_items), as_csr(test, n_items), users=np.arange(n_users), batch_size=7
    )
    catalogue = sorted({i for s in train for i in s})
    for k in (10, 20):
        for key, value in reference_topk(scores, train, test, k, catalogue).items():
            assert out[key] == pytest.approx(value, abs=1e-12), key


def test_sampled_metrics_are_opt_in_and_prefixed():
    users, train, test, scores = hand_case()
    full = evaluate_topk(scores, train, test, users=users, ks=(2, 4))
    # more negatives than exist: the candidates are every rankable item, so sampled == full
    out = evaluate_topk(scores, train, test, users=users, ks=(2, 4), sampled_negatives=100)
    for key in ("ndcg@2", "recall@4", "map@4", "precision@2", "hr@2"):
        assert out[f"sampled_{key}"] == pytest.approx(full[key])
    assert out["sampled_negatives"] == 100
    few = evaluate_topk(scores, train, test, users=users, ks=(2, 4), sampled_negatives=1, seed=3)
    assert few["sampled_recall@4"] == 1.0  # <= 2 relevant + 1 negative: all fit in the top 4
    assert few == evaluate_topk(scores, train, test, users=users, ks=(2, 4), sampled_negatives=1, seed=3)


# --------------------------------------------------------------------------------------
# Errors: never a silent zero
# --------------------------------------------------------------------------------------
def test_empty_and_degenerate_inputs_raise():
    empty = np.array([])
    with pytest.raises(ValueError, match="empty"):
        rmse(empty, empty)
    with pytest.raises(ValueError, match="empty"):
        mae(empty, empty)
    with pytest.raises(ValueError, match="empty"):
        logloss(empty, empty)
    with pytest.raises(ValueError, match="both classes"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="both a positive"):
        gauc(np.array([1, 0]), np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="align"):
        rmse(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="non-finite"):
        auc(np.array([0, 1]), np.array([np.nan, 0.2]))


def test_topk_errors():
    users, train, test, scores = hand_case()
    with pytest.raises(ValueError, match="none of the 1 users"):
        evaluate_topk(scores[2:], train, test, users=users[2:])  # only the skipped user
    with pytest.raises(ValueError, match="no users"):
        evaluate_topk(scores[:0], train, test, users=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="expected"):
        evaluate_topk(scores[:2], train, test, users=users)
    bad = scores.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_topk(bad, train, test, users=users)


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------
def test_rating_baselines():
    items = np.array([1, 1, 2])
    ratings = np.array([5.0, 5.0, 2.0])
    mu = 4.0
    pred = baselines.rating_popularity(items, ratings, np.array([1, 2, 3, 0, 99]), n_items=4, damping=2)
    assert pred.tolist() == pytest.approx([(10 + 2 * mu) / 4, (2 + 2 * mu) / 3, mu, mu, mu])
    assert baselines.rating_global_mean(ratings, np.arange(3)).tolist() == pytest.approx([mu] * 3)
    rand = baselines.rating_random(ratings, np.arange(100), seed=1)
    assert rand.min() >= 2.0 and rand.max() <= 5.0
    assert np.array_equal(rand, baselines.rating_random(ratings, np.arange(100), seed=1))


def test_topk_and_ctr_baselines():
    pop = baselines.topk_popularity(np.array([1, 2, 2, 3, 3, 3]), 5, np.array([7, 8]))
    assert pop.shape == (2, 5) and pop[1].tolist() == [baselines.PADDING_SCORE, 1, 2, 3, 0]
    a = baselines.topk_random(6, np.array([4, 5]), seed=0)
    b = baselines.topk_random(6, np.array([5]), seed=0)
    assert np.array_equal(a[1], b[0]) and a[0, 0] == baselines.PADDING_SCORE  # batch-independent
    logits = baselines.ctr_popularity(
        np.array([1, 1, 2]), np.array([1.0, 1.0, 0.0]), np.array([1, 2, 3]), 4, 1.0
    )
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert p == pytest.approx([(2 + 2 / 3) / 3, (0 + 2 / 3) / 2, 2 / 3], rel=1e-5)
    assert baselines.ctr_random(np.arange(10), seed=2).shape == (10,)
    with pytest.raises(ValueError, match="empty"):
        baselines.topk_popularity(np.array([], dtype=np.int64), 5, np.array([1]))


def test_gauc_is_absent_not_zero_when_no_user_has_both_classes():
    """Leave-last-out gives every user one test row: gAUC is undefined there."""
    from common.metrics import evaluate_ctr

    out = evaluate_ctr(np.array([1, 0, 1, 0]), np.array([0.3, -0.2, 0.9, 0.1]), np.array([1, 2, 3, 4]))
    assert "gauc" not in out and out["gauc_users"] == 0
    assert out["auc"] == 1.0
