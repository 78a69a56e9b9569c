"""Evaluation with onnxruntime only: each exported file is scored on the test split of its
snapshot, beside the random and popularity baselines scored on exactly the same rows.

Inputs are built by name from the snapshot, so any family whose signature follows
docs/MODEL_API.md is evaluated without special cases:

    user_idx, item_idx        the test rows' indices (0 = not in the train vocabulary)
    hist_item_idx/hist_rating the user's train ratings, 0-padded (memory-based CF)
    sparse, dense, history    the CTR features of fct_ctr_samples

Warm rows (user and item seen in train) give the main rating metrics; cold rows are
reported separately (the graphs serve them by their documented fallback), with counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from common.budget import DEFAULT_SCORE_MEMORY_BYTES, budget_bytes, row_chunks
from common.metrics import evaluate_ctr, evaluate_rating, interaction_matrix
from evaluation import baselines as B
from evaluation.topk_chunks import evaluate_topk_chunked
from models.data import Snapshot

BATCH = 1024
TOPK_USER_BATCH = 256


def _signature(onnx_dir: Path) -> dict:
    path = onnx_dir / "signature.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-materialise the onnx asset that wrote {onnx_dir}.")
    return json.loads(path.read_text())


def _input_names(signature: dict) -> list[str]:
    return [i["name"] for i in signature["inputs"]]


def _histories(train: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's train items and ratings, 0-padded to the longest in the batch."""
    rows = train[users]
    lengths = np.diff(rows.indptr)
    width = max(int(lengths.max(initial=0)), 1)
    items = np.zeros((len(users), width), dtype=np.int64)
    ratings = np.zeros((len(users), width), dtype=np.float32)
    for r in range(len(users)):
        lo, hi = rows.indptr[r], rows.indptr[r + 1]
        items[r, : hi - lo] = rows.indices[lo:hi]
        ratings[r, : hi - lo] = rows.data[lo:hi]
    return items, ratings


def _run_batched(
    scorer, names: list[str], build, n_rows: int, output: str, order=None, chunks=None
) -> np.ndarray:
    """Score rows in batches; ``order`` (a permutation) groups rows into batches, results come
    back in the original row order. ``chunks``: the ``[lo, hi)`` ranges of ``order`` to score
    per call (default: ``BATCH`` rows each)."""
    order = np.arange(n_rows) if order is None else order
    chunks = chunks if chunks is not None else [(lo, lo + BATCH) for lo in range(0, n_rows, BATCH)]
    outs = []
    for lo, hi in chunks:
        feeds = build(order[lo:hi])
        outs.append(scorer.run(**{n: feeds[n] for n in names})[output])
    result = np.empty_like(np.concatenate(outs)) if outs else np.zeros(0, np.float32)
    if outs:
        result[order] = np.concatenate(outs)
    return result


# ----------------------------------------------------------------------------- rating


def _rating_rows(snap: Snapshot):
    test = snap.ratings("test")
    warm = (test.user_idx > 0) & (test.item_idx > 0)
    return test, warm


def _rating_metrics(y: np.ndarray, pred: np.ndarray, warm: np.ndarray) -> dict[str, float]:
    metrics = evaluate_rating(y[warm], pred[warm])
    if (~warm).any():
        cold = evaluate_rating(y[~warm], pred[~warm])
        metrics |= {"rmse_cold": cold["rmse"], "mae_cold": cold["mae"]}
    metrics["n_rows_cold"] = int((~warm).sum())
    return metrics


def evaluate_rating_onnx(
    scorer, signature: dict, snap: Snapshot, memory_bytes: int = DEFAULT_SCORE_MEMORY_BYTES
) -> dict[str, float]:
    """Rating metrics on the test rows. A scorer that takes the user's history (memory-based CF)
    is called on batches of users with similar history lengths, each batch sized so that rows x
    history x the graph's bytes per history slot (read from the graph: item-kNN's sorted copy
    of the history and its order) stays within ``memory_bytes``; a single history over the
    budget is scored alone."""
    test, warm = _rating_rows(snap)
    names = _input_names(signature)
    train = snap.train_matrix("rating")

    def build(rows):
        feeds = {"user_idx": test.user_idx[rows], "item_idx": test.item_idx[rows]}
        if "hist_item_idx" in names:
            feeds["hist_item_idx"], feeds["hist_rating"] = _histories(train, test.user_idx[rows])
        return feeds

    # Batches of users with similar history lengths: each batch is padded to its longest.
    widths = np.diff(train.indptr)[test.user_idx]
    order = np.argsort(widths, kind="stable")
    chunks = None
    if "hist_item_idx" in names:
        per_slot = scorer.bytes_per_row("history")
        chunks = list(row_chunks(widths[order], per_slot, memory_bytes, BATCH))
    pred = _run_batched(scorer, names, build, len(test), signature["outputs"][0]["name"], order, chunks)
    return _rating_metrics(test.rating, pred.astype(np.float64), warm)


# ----------------------------------------------------------------------------- top-K


def _topk_setup(snap: Snapshot):
    test = snap.ratings("test")
    keep = (test.user_idx > 0) & (test.item_idx > 0)
    relevant = interaction_matrix(test.user_idx[keep], test.item_idx[keep], snap.n_users, snap.n_items)
    users = np.unique(test.user_idx[keep])
    cold = {
        "n_test_users_cold_rows": int((test.user_idx == 0).sum()),
        "n_test_rows_cold_item": int(((test.user_idx > 0) & (test.item_idx == 0)).sum()),
    }
    return snap.train_matrix("ones"), relevant, users, cold


def _user_item_rows(train: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """``user_items`` of an item-vector scorer: the users' dense train rows, 1 = seen."""
    return (train[users].toarray() > 0).astype(np.float32)


def evaluate_topk_onnx(
    scorer, signature: dict, snap: Snapshot, memory_bytes: int = DEFAULT_SCORE_MEMORY_BYTES
) -> dict[str, float]:
    """Full-ranking top-K metrics of every test user against every item, scored in user chunks
    of ``memory_bytes / 2`` over the graph's bytes per user and ranked in item chunks
    (``evaluation.topk_chunks``): the same metrics as one block, for any catalogue size."""
    exclude, relevant, users, cold = _topk_setup(snap)
    output = signature["outputs"][0]["name"]
    # Item-vector scorers (cdae) also take user_items: each user batch's rows of the train
    # matrix, built per batch so the dense users x items matrix never exists at once.
    with_items = "user_items" in _input_names(signature)

    def score(u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.int64)
        feeds = {"user_idx": u, "user_items": _user_item_rows(exclude, u)} if with_items else {"user_idx": u}
        return scorer.run(**feeds)[output]

    metrics = evaluate_topk_chunked(
        score,
        exclude,
        relevant,
        users,
        bytes_per_user=scorer.bytes_per_row(),
        memory_bytes=memory_bytes,
        metric_batch=TOPK_USER_BATCH,
        max_users_per_call=scorer.batch_size,
    )
    return metrics | cold


# ----------------------------------------------------------------------------- CTR


def _ctr_history_width(signature: dict) -> int | None:
    """The history width to read: 1 (none decoded) when the graph takes no ``history``, its fixed
    width when it has one, else None (the snapshot's ``max_history_len``, every stored event)."""
    spec = next((s for s in signature["inputs"] if s["name"] == "history"), None)
    if spec is None:
        return 1
    return spec["shape"][1] if isinstance(spec["shape"][1], int) else None


def evaluate_ctr_onnx(scorer, signature: dict, snap: Snapshot) -> dict[str, float]:
    """CTR metrics of the test split, read in row groups and scored ``BATCH`` rows at a time.

    Only the labels, user indices and logits of the whole split are held (a few bytes a row); the
    features and histories of one row group at a time (at 25M events, reading the test split with
    its histories at once took the evaluation to 13 GiB). The batches are those of the whole
    split in file order, so the logits are the ones an in-memory read would give."""
    names = _input_names(signature)
    output = signature["outputs"][0]["name"]
    take = lambda a: (a.sparse, a.dense, a.history, a.label_like, a.label_love, a.user_idx)  # noqa: E731
    rows = snap.ctr_stream("test", _ctr_history_width(signature), take)
    parts: list[tuple[np.ndarray, ...]] = []
    for sparse, dense, history, like, love, user in rows.ordered(BATCH):
        feeds = {"sparse": sparse, "dense": dense, "history": history}
        # copies: a batch is a view of its row group, which it would otherwise keep alive
        logits = scorer.run(**{n: feeds[n] for n in names})[output]
        parts.append((logits, like.copy(), love.copy(), user.copy()))
    if not parts:
        raise ValueError(f"{snap.path / 'fct_ctr_samples.parquet'} has no test rows: nothing to evaluate.")
    logits, label_like, label_love, user_idx = (np.concatenate(c) for c in zip(*parts))
    del parts
    if logits.ndim == 2:  # multi-task: one column per task, like then love
        heads = (("like", label_like), ("love", label_love))
        if logits.shape[1] != len(heads):
            raise ValueError(
                f"output {output!r} has {logits.shape[1]} columns; the multitask contract "
                f"(docs/MODEL_API.md) is one per task, {[t for t, _ in heads]}: re-export the model."
            )
        out = {}
        for col, (task, labels) in enumerate(heads):
            out |= evaluate_ctr(labels, logits[:, col], user_idx, task_name=task)
        return out
    return evaluate_ctr(label_like, logits, user_idx)


EVALUATORS = {"rating": evaluate_rating_onnx, "topk": evaluate_topk_onnx, "ctr": evaluate_ctr_onnx,
              "multitask": evaluate_ctr_onnx}  # fmt: skip


def evaluate_onnx(
    onnx_dir: Path, snapshot_dir: Path, task: str, score_memory_mb: float | None = None
) -> dict[str, float]:
    """Metrics of ``onnx_dir/model.onnx`` on the snapshot's test split (onnxruntime only).

    ``score_memory_mb`` (the pipeline's ``RECSYS_SCORE_MEMORY_MB``; default 256) bounds each
    scoring call of the top-K and history scorers (``common.budget``)."""
    from export.runtime import OrtScorer

    signature = _signature(onnx_dir)
    scorer = OrtScorer(onnx_dir / "model.onnx")
    snap = Snapshot(snapshot_dir)
    memory = DEFAULT_SCORE_MEMORY_BYTES if score_memory_mb is None else budget_bytes(score_memory_mb)
    evaluator = EVALUATORS[task]
    metrics = evaluator(scorer, signature, snap, memory) if task in ("rating", "topk") else evaluator(
        scorer, signature, snap
    )
    return {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- baselines


def evaluate_baselines(
    snapshot_dir: Path, task: str, seed: int = 0, memory_bytes: int = DEFAULT_SCORE_MEMORY_BYTES
) -> dict[str, dict[str, float]]:
    """``{"random": metrics, "popularity": metrics}`` on the rows ``evaluate_onnx`` uses."""
    snap = Snapshot(snapshot_dir)
    train = snap.ratings("train")
    if task == "rating":
        test, warm = _rating_rows(snap)
        preds = {
            "random": B.rating_random(train.rating, test.item_idx, seed),
            "global_mean": B.rating_global_mean(train.rating, test.item_idx),
            "popularity": B.rating_popularity(train.item_idx, train.rating, test.item_idx, snap.n_items),
        }
        out = {name: _rating_metrics(test.rating, p.astype(np.float64), warm) for name, p in preds.items()}
    elif task == "topk":
        exclude, relevant, users, cold = _topk_setup(snap)
        sources = {
            "random": lambda u: B.topk_random(snap.n_items, np.asarray(u), seed),
            "popularity": lambda u: np.array(B.topk_popularity(train.item_idx, snap.n_items, np.asarray(u))),
        }
        # the baselines score float32 rows over the whole catalogue, like a model
        out = {
            name: evaluate_topk_chunked(fn, exclude, relevant, users, bytes_per_user=4 * snap.n_items,
                                        memory_bytes=memory_bytes, metric_batch=TOPK_USER_BATCH) | cold
            for name, fn in sources.items()
        }  # fmt: skip
    elif task in ("ctr", "multitask"):
        # only the columns the baselines read (at 25M rows the whole train table is ~10 GiB)
        user, item_field = snap.meta["sparse_fields"][:2]
        test = snap.split_columns("fct_ctr_samples", "test", [user, item_field, "label_like", "label_love"])
        train_ctr = snap.split_columns("fct_ctr_samples", "train", [item_field, "label_like", "label_love"])
        item, users = test[item_field].astype(np.int64), test[user].astype(np.int64)
        train_items = train_ctr[item_field].astype(np.int64)
        out = {}
        for name in ("random", "popularity"):
            result: dict[str, float] = {}
            for task_name in ("like", "love"):
                labels = test[f"label_{task_name}"].astype(np.float32)
                train_labels = train_ctr[f"label_{task_name}"].astype(np.float32)
                logits = (
                    B.ctr_random(item, seed)
                    if name == "random"
                    else B.ctr_popularity(train_items, train_labels, item, snap.n_items)
                )
                per_task = evaluate_ctr(labels, logits, users, task_name=task_name)
                result |= per_task
                # the single-task CTR families predict `like`; multitask models report only
                # per-task keys, so their baselines do too (same leaderboard columns)
                if task_name == "like" and task == "ctr":
                    result |= evaluate_ctr(labels, logits, users)
            out[name] = result
    else:
        raise ValueError(f"unknown task {task!r}: expected rating, topk, ctr or multitask")
    return {
        name: {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in m.items()}
        for name, m in out.items()
    }
