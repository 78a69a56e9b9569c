"""Every evaluation metric of the pipeline, with its exact definition and conventions.

Three tasks, three entry points returning flat ``{name: value}`` dicts:

- ``evaluate_rating``: RMSE, MAE.
- ``evaluate_topk``: full-ranking Precision/Recall/NDCG/HR/MAP@K and catalogue coverage@K;
  sampled-candidate variants only on request, named ``sampled_*``.
- ``evaluate_ctr``: AUC, logloss, gAUC.

Conventions shared by all of them: inputs are numpy arrays; metrics are computed in
float64 whatever the input dtype; an empty or degenerate input (no rows, a single class for
AUC, no evaluable user) raises ``ValueError`` naming the input. A metric is never caught and
returned as zero: a zero would rank a broken model on the leaderboard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

# The metric that ranks a task and decides blessing: (name, "min" | "max").
MAIN_METRIC: dict[str, tuple[str, str]] = {
    "rating": ("rmse", "min"),
    "topk": ("ndcg@10", "max"),
    "ctr": ("auc", "max"),
    "multitask": ("auc_like", "max"),
}
TASK_ORDER = ("rating", "topk", "ctr", "multitask")

DEFAULT_KS: tuple[int, ...] = (10, 20)
# Probabilities are clipped to [eps, 1 - eps] in logloss. 1e-7 rather than float64's 2e-16:
# float32 sigmoid outputs saturate near 1 - 6e-8, so a tighter clip would make a model's
# logloss depend on whether the evaluator saw float32 probabilities or float64 logits.
LOGLOSS_EPS = 1e-7

ScoreSource = np.ndarray | Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _as_1d(name: str, x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty: a metric over zero rows is undefined; check the eval split.")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite value at row {bad} ({a[bad]}); its producer is broken.")
    return a


def _pair(names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_1d(names[0], a), _as_1d(names[1], b)
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} has {x.size} rows but {names[1]} has {y.size}; they must align.")
    return x, y


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    y = _as_1d("labels", labels)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1; got values " + str(np.unique(y)[:5]))
    return y.astype(bool)


# --------------------------------------------------------------------------------------
# Rating
# --------------------------------------------------------------------------------------
def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error: ``sqrt(mean((y_pred - y_true)^2))`` over all rows."""
    t, p = _pair(("y_true", "y_pred"), y_true, y_pred)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error: ``mean(|y_pred - y_true|)`` over all rows."""
    t, p = _pair(("y_true", "y_pred"), y_true, y_pred)
    return float(np.mean(np.abs(p - t)))


def evaluate_rating(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``{"rmse", "mae", "n_rows"}`` over the given rows.

    Predictions are *not* clipped to the rating range here: clipping is a model decision
    and belongs in the exported graph, so that serving returns exactly what was scored.
    Selecting warm rows (user and item seen in train) is the caller's job.
    """
    return {"rmse": rmse(y_true, y_pred), "mae": mae(y_true, y_pred), "n_rows": int(np.size(y_true))}


# --------------------------------------------------------------------------------------
# CTR
# --------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` ascending; tied values all get the mean of their ranks.

    Same as ``scipy.stats.rankdata(x, method="average")``.
    """
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_run = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], xs.size]
    # a run of ties at sorted positions [s, e) holds ranks s+1..e, whose mean is (s+1+e)/2
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic.

    ``AUC = (sum of positives' average ranks - P(P+1)/2) / (P * N)`` with P positives and
    N negatives; equivalently the probability that a random positive scores above a random
    negative, a tie counting 1/2. Equals sklearn's ``roc_auc_score``. Raises if only one
    class is present (AUC is undefined, not 0.5).
    """
    y = _binary_labels(labels)
    s = _as_1d("scores", scores)
    if s.shape != y.shape:
        raise ValueError(f"labels has {y.size} rows but scores has {s.size}; they must align.")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; labels has {n_pos} positives and {n_neg} negatives.")
    rank_sum = float(average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels: np.ndarray, logits: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy from logits, with probabilities clipped to ``[eps, 1-eps]``.

    ``logloss = mean(-y log p - (1-y) log(1-p))``, ``p = clip(sigmoid(z), eps, 1-eps)``.
    Computed without forming ``p``: clipping ``p`` is clipping ``z`` to ``±log((1-eps)/eps)``
    and then ``-log p = softplus(-z)``, ``-log(1-p) = softplus(z)`` with the stable
    ``softplus(z) = max(z, 0) + log1p(exp(-|z|))``. The clip bounds one confident mistake's
    loss at ``-log(eps)`` (≈16.1 for 1e-7), as sklearn's ``log_loss`` does with its own eps.
    """
    y = _binary_labels(labels).astype(np.float64)
    z = _as_1d("logits", logits)
    if z.shape != y.shape:
        raise ValueError(f"labels has {y.size} rows but logits has {z.size}; they must align.")
    bound = np.log((1.0 - eps) / eps)
    z = np.clip(z, -bound, bound)
    softplus = np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))  # = -log(1 - sigmoid(z))
    return float(np.mean(softplus - y * z))  # softplus(z) - y z = y softplus(-z) + (1-y) softplus(z)


def per_user_auc(
    labels: np.ndarray, scores: np.ndarray, user_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user AUC, vectorised: returns ``(users, auc, n_rows)`` for every user with both classes.

    Ranks are average ranks within each user's rows, so ties count 1/2 as in ``auc``.
    """
    y = _binary_labels(labels)
    s = _as_1d("scores", scores)
    u = _as_1d("user_idx", user_idx, dtype=np.int64)
    if not (y.size == s.size == u.size):
        raise ValueError(f"labels/scores/user_idx have {y.size}/{s.size}/{u.size} rows; they must align.")
    order = np.lexsort((s, u))
    us, ss, ys = u[order], s[order], y[order]
    new_user = np.r_[True, us[1:] != us[:-1]]
    new_run = new_user | np.r_[True, ss[1:] != ss[:-1]]
    user_gid = np.cumsum(new_user) - 1
    run_gid = np.cumsum(new_run) - 1
    user_start = np.flatnonzero(new_user)
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], us.size]
    # global sorted positions [a, b) of a tie run -> ranks within the user's block, averaged
    rank = (run_start[run_gid] + run_end[run_gid] + 1) / 2.0 - user_start[user_gid]
    n = np.bincount(user_gid).astype(np.float64)
    n_pos = np.bincount(user_gid, weights=ys.astype(np.float64))
    pos_rank_sum = np.bincount(user_gid, weights=np.where(ys, rank, 0.0))
    both = (n_pos > 0) & (n_pos < n)
    n_pos, n, pos_rank_sum = n_pos[both], n[both], pos_rank_sum[both]
    aucs = (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * (n - n_pos))
    return us[user_start][both], aucs, n.astype(np.int64)


def gauc(labels: np.ndarray, scores: np.ndarray, user_idx: np.ndarray) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's number of impressions.

    ``gAUC = sum_u n_u AUC_u / sum_u n_u`` over users having both a positive and a negative
    row (``n_u`` counts all of the user's rows); users with a single class have no AUC and are
    skipped, their rows out of both sums. Raises if no user has both classes.
    """
    _, aucs, n = per_user_auc(labels, scores, user_idx)
    if aucs.size == 0:
        raise ValueError("gAUC needs at least one user with both a positive and a negative row; none has.")
    return float(np.sum(n * aucs) / np.sum(n))


def evaluate_ctr(
    labels: np.ndarray, logits: np.ndarray, user_idx: np.ndarray, task_name: str | None = None
) -> dict[str, float]:
    """``{"auc", "logloss", "gauc", "gauc_users", "n_rows", "positive_rate"}``.

    ``task_name`` suffixes every key (``auc_like``, ``logloss_love``...) for multi-task
    models, which are evaluated once per task head.
    """
    _, aucs, _ = per_user_auc(labels, logits, user_idx)
    out = {
        "auc": auc(labels, logits),
        "logloss": logloss(labels, logits),
        "gauc_users": int(aucs.size),
        "n_rows": int(np.size(labels)),
        "positive_rate": float(np.mean(labels)),
    }
    # gAUC is undefined, not zero, when no user has both classes: with a leave-last-out
    # split every user has one test row. The key is then absent and gauc_users says why.
    if aucs.size:
        out["gauc"] = gauc(labels, logits, user_idx)
    return out if task_name is None else {f"{k}_{task_name}": v for k, v in out.items()}


# --------------------------------------------------------------------------------------
# Top-K ranking
# --------------------------------------------------------------------------------------
def interaction_matrix(
    user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int
) -> sp.csr_matrix:
    """Binary users x items CSR from (user, item) pairs, duplicates merged: the relevant sets."""
    u = np.asarray(user_idx, dtype=np.int64)
    i = np.asarray(item_idx, dtype=np.int64)
    m = sp.csr_matrix((np.ones(u.size, dtype=np.float32), (u, i)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def rank_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first; ties go to the lower item index.

    The tie rule is ONNX ``TopK``'s, so offline metrics and the exported top-K graph agree
    (popularity-like scores tie a lot). O(n_items) per row: a partition finds the k-th value
    ``v``; all scores ``> v`` are in, and the lowest-index items equal to ``v`` fill the rest.
    ``k`` must be ``<= scores.shape[1]``.
    """
    b, n = scores.shape
    v = np.partition(scores, n - k, axis=1)[:, n - k][:, None]
    above = scores > v
    equal = scores == v
    need = k - above.sum(axis=1)
    chosen = above | equal
    # Only rows with more ties at v than free slots need the index tie-break (a cumsum).
    tied = np.flatnonzero(equal.sum(axis=1) > need)
    if tied.size:
        eq = equal[tied]
        chosen[tied] = above[tied] | (eq & (np.cumsum(eq, axis=1, dtype=np.int32) <= need[tied, None]))
    idx = np.nonzero(chosen)[1].reshape(b, k)  # row-major: ascending item index within a row
    order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def topk_hit_metrics(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user ranking metrics at ``k`` from a hit matrix; returns arrays of shape [users].

    ``hits[u, j]`` is True when the item at rank ``j`` (0-based) of user ``u`` is relevant;
    ``R_u = n_relevant[u] >= 1``; ``h_u = sum_{j<k} hits[u, j]``.

    - precision@k = h_u / k (k even when fewer than k items could be ranked)
    - recall@k    = h_u / R_u
    - hr@k        = 1 if h_u > 0 else 0
    - ndcg@k      = DCG / IDCG, binary gains, ``DCG = sum_{j<k} hits[u,j] / log2(j+2)``,
      ``IDCG = sum_{j<min(k,R_u)} 1 / log2(j+2)`` (all relevant items ranked first)
    - map@k       = AP@k = ``sum_{j<k} hits[u,j] * precision@(j+1) / min(k, R_u)``
    """
    h = hits[:, :k].astype(np.float64)
    cum = np.cumsum(h, axis=1)
    n_hit = cum[:, -1]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    idcg = np.cumsum(discount)[np.minimum(k, n_relevant) - 1]
    denom = np.minimum(k, n_relevant)
    return {
        "precision": n_hit / k,
        "recall": n_hit / n_relevant,
        "hr": (n_hit > 0).astype(np.float64),
        "ndcg": (h @ discount) / idcg,
        "map": (h * cum / np.arange(1, k + 1)).sum(axis=1) / denom,
    }


def _row_mask(m: sp.csr_matrix, rows: np.ndarray, n_items: int) -> np.ndarray:
    """Dense bool [len(rows), n_items] of the stored entries of CSR rows (any value, even 0)."""
    sub = m[rows]
    out = np.zeros((rows.size, n_items), dtype=bool)
    out[np.repeat(np.arange(rows.size), np.diff(sub.indptr)), sub.indices] = True
    return out


def _sample_candidates(
    excluded: np.ndarray, relevant: np.ndarray, users: np.ndarray, n_neg: int, seed: int
) -> np.ndarray:
    """Candidate mask = relevant items + ``n_neg`` uniform negatives per user (fewer if the user
    has fewer non-excluded, non-relevant items). One generator per (seed, user), so a user's
    sample does not depend on the batch size or on which other users are evaluated."""
    keys = np.stack([np.random.default_rng([seed, int(u)]).random(excluded.shape[1]) for u in users])
    keys[excluded | relevant] = np.inf
    n_neg = min(n_neg, keys.shape[1])
    pick = np.argpartition(keys, n_neg - 1, axis=1)[:, :n_neg]
    ok = np.isfinite(np.take_along_axis(keys, pick, axis=1))
    cand = relevant.copy()
    cand[np.nonzero(ok)[0], pick[ok]] = True
    return cand


class _Totals:
    """Running sums of per-user metrics, so batches never hold more than one score block."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, prefix: str, hits: np.ndarray, n_rel: np.ndarray, ks: Sequence[int]) -> None:
        for k in ks:
            for name, per_user in topk_hit_metrics(hits, n_rel, k).items():
                key = f"{prefix}{name}@{k}"
                self.sums[key] = self.sums.get(key, 0.0) + float(per_user.sum())


def _ranked_hits(
    scores: np.ndarray, excluded: np.ndarray, relevant: np.ndarray, k_max: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank non-excluded items; returns (top items, valid mask, hits), each [users, k_max].

    Where fewer than ``k_max`` items can be ranked, the tail slots hold excluded items:
    ``valid`` is False there, they never hit (relevant excludes them) and are not counted
    as recommended for coverage. Columns past ``n_items`` are padded as invalid slots.
    """
    s = np.where(excluded, -np.inf, scores)
    k = min(k_max, s.shape[1])
    top = rank_topk(s, k)
    valid = ~np.take_along_axis(excluded, top, axis=1)
    hits = np.take_along_axis(relevant, top, axis=1)
    if k < k_max:
        pad = ((0, 0), (0, k_max - k))
        top, valid, hits = np.pad(top, pad), np.pad(valid, pad), np.pad(hits, pad)
    return top, valid, hits


def evaluate_topk(
    scores: ScoreSource,
    exclude: sp.spmatrix | sp.sparray,
    relevant: sp.spmatrix | sp.sparray,
    users: np.ndarray | None = None,
    catalogue: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    sampled_negatives: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Full-ranking top-K metrics, averaged over evaluable users.

    Args:
        scores: ``[len(users), n_items]`` array aligned with ``users``, or a callable
            ``f(user_idx int64 [b]) -> [b, n_items]`` (e.g. an onnxruntime session on the
            ``topk`` graph), called once per batch so the whole matrix never exists at once.
        exclude: users x items sparse matrix, rows indexed by user index; every stored entry
            (whatever its value) is an item the user saw in train and is never ranked.
            Column 0 (padding / unknown item) is always excluded too.
        relevant: users x items sparse matrix of test interactions (``interaction_matrix``).
        users: user indices to evaluate; default = every row of ``relevant`` with an entry.
        catalogue: item indices that count for coverage; default = items with a train
            interaction, i.e. the columns of ``exclude`` holding an entry (column 0 never).
        ks: cut-offs; the flat keys are ``f"{metric}@{k}"``.
        batch_size: users per score block; peak memory is about ``batch_size * n_items * 20``
            bytes (scores, masks and the ranking's temporaries).
        sampled_negatives: opt-in sampled protocol (see below); ``None`` computes none.
        seed: seed of the sampled protocol.

    Conventions:
        - The relevant set of a user is their test items minus ``exclude`` minus column 0:
          an item the model is forbidden to recommend can never be hit, and counting it
          would only shrink every model's recall alike. Users whose set is then empty are
          skipped and counted in ``n_users_skipped``; all means are over ``n_users``.
        - Ranking ties go to the lower item index (``rank_topk``).
        - Metric definitions: ``topk_hit_metrics`` (precision, recall, ndcg, hr, map).
        - coverage@k = |catalogue ∩ (union over evaluated users of their top-k)| / |catalogue|.
        - Sampled (``sampled_negatives=N``): each user's candidates are their relevant items
          plus N items drawn uniformly without replacement from the non-excluded,
          non-relevant items; the same metrics are computed on that candidate list and keyed
          ``sampled_{metric}@{k}``. Sampled numbers are inflated and can reorder models
          (Krichene & Rendle, KDD 2020), hence opt-in and named apart.

    Raises:
        ValueError: shapes disagree, a score is NaN, or no user has a relevant item.
    """
    exclude, relevant = sp.csr_matrix(exclude), sp.csr_matrix(relevant)
    if exclude.shape != relevant.shape:
        raise ValueError(f"exclude is {exclude.shape} but relevant is {relevant.shape}; both users x items.")
    n_items = relevant.shape[1]
    if users is None:
        users = np.flatnonzero(np.diff(relevant.indptr))
    users = np.asarray(users, dtype=np.int64).ravel()
    if users.size == 0:
        raise ValueError("no users to evaluate: `users` is empty or `relevant` holds no interaction.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs; got {ks}.")
    if catalogue is None:
        catalogue = np.unique(exclude.indices)
    catalogue = np.setdiff1d(np.asarray(catalogue, dtype=np.int64), [0])
    if catalogue.size == 0:
        raise ValueError("the coverage catalogue is empty: no item has a train interaction in `exclude`.")
    if isinstance(scores, np.ndarray) and scores.shape != (users.size, n_items):
        raise ValueError(f"scores is {scores.shape}; expected (len(users), n_items) = {users.size, n_items}.")

    k_max = max(ks)
    totals = _Totals()
    recommended = {k: np.zeros(n_items, dtype=bool) for k in ks}
    n_users = 0
    for start in range(0, users.size, batch_size):
        rows = users[start : start + batch_size]
        block = scores[start : start + rows.size] if isinstance(scores, np.ndarray) else scores(rows)
        block = np.asarray(block)
        if block.shape != (rows.size, n_items):
            raise ValueError(
                f"scorer returned {block.shape} for {rows.size} users, not {rows.size, n_items}."
            )
        if np.isnan(block).any():
            raise ValueError(f"scores for users {rows[np.isnan(block).any(axis=1)][:5]} contain NaN.")
        excluded = _row_mask(exclude, rows, n_items)
        excluded[:, 0] = True
        rel = _row_mask(relevant, rows, n_items) & ~excluded
        n_rel = rel.sum(axis=1)
        keep = n_rel > 0
        if not keep.any():
            continue
        block, excluded, rel, n_rel, rows = block[keep], excluded[keep], rel[keep], n_rel[keep], rows[keep]
        n_users += rows.size

        top, valid, hits = _ranked_hits(block, excluded, rel, k_max)
        totals.add("", hits, n_rel, ks)
        for k in ks:
            recommended[k][top[:, :k][valid[:, :k]]] = True

        if sampled_negatives is not None:
            cand = _sample_candidates(excluded, rel, rows, sampled_negatives, seed)
            _, _, s_hits = _ranked_hits(block, ~cand, rel, k_max)
            totals.add("sampled_", s_hits, n_rel, ks)

    if n_users == 0:
        raise ValueError(
            f"none of the {users.size} users has a relevant item outside their train items; "
            "check that `relevant` holds the test split and `exclude` the train split."
        )
    out: dict[str, float] = {key: total / n_users for key, total in sorted(totals.sums.items())}
    for k in ks:
        out[f"coverage@{k}"] = float(recommended[k][catalogue].sum() / catalogue.size)
    out["n_users"] = n_users
    out["n_users_skipped"] = int(users.size - n_users)
    out["catalogue_size"] = int(catalogue.size)
    if sampled_negatives is not None:
        out["sampled_negatives"] = int(sampled_negatives)
    return out


# --------------------------------------------------------------------------------------
# Validation during training
# --------------------------------------------------------------------------------------
def ranking_metrics(
    scores: np.ndarray,
    train: sp.csr_matrix,
    users: np.ndarray,
    relevant: sp.csr_matrix,
    k_ndcg: int = 10,
    k_recall: int = 20,
) -> dict[str, float]:
    """Mean NDCG@k and Recall@k over ``users`` from full-catalogue ``scores [len(users), n_items]``.

    Train items and column 0 are excluded from the ranking; ``relevant`` is users x items
    (the split's held-out items). Recall@k divides by min(k, |relevant|) so a perfect
    ranking scores 1.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    scores[:, 0] = -np.inf
    seen = train[users]
    rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
    scores[rows, seen.indices] = -np.inf
    k = max(k_ndcg, k_recall)
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
    rel = relevant[users]
    discounts = 1.0 / np.log2(np.arange(2, k_ndcg + 2))
    ndcg, recall = [], []
    for r in range(len(users)):
        truth = set(rel.indices[rel.indptr[r] : rel.indptr[r + 1]].tolist())
        if not truth:
            continue
        hits = np.array([t in truth for t in top[r]], dtype=np.float64)
        ideal = discounts[: min(len(truth), k_ndcg)].sum()
        ndcg.append(float((hits[:k_ndcg] * discounts).sum() / ideal))
        recall.append(float(hits[:k_recall].sum() / min(len(truth), k_recall)))
    if not ndcg:
        raise ValueError("no user with relevant items to rank")
    return {f"ndcg@{k_ndcg}": float(np.mean(ndcg)), f"recall@{k_recall}": float(np.mean(recall))}
