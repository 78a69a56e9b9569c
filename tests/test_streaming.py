"""The streaming data path (``models.stream.ParquetRows``): it trains the same models as the in-memory
arrays, shuffles by blocks then within a buffer, cuts row groups by rank, and holds no more rows
than its buffer and one row group whatever the file's size.

Equivalence, stated:
- one row group and a buffer >= the split's rows: bit for bit (weights and history), for every
  family that streams (``STREAMING``);
- many row groups and a smaller buffer (another shuffle order): the best valid AUC within
  ``AUC_TOLERANCE`` = 0.01 of the in-memory model's, on 12k rows with a planted signal. That is
  the size of seed noise there: the in-memory DeepFM with seeds 0-3 gave 0.7145, 0.7242, 0.7086,
  0.7157 (DIN 0.7115, 0.7081, 0.7094, 0.7095); streamed with 12 row groups and a 3k-row buffer,
  0.7144 (DIN 0.7102).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_models import write_tiny_snapshot

from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import Snapshot, pad_history
from models.runtime import Runtime, use_runtime
from models.stream import ParquetRows
from models.train import ArrayRows

# The families whose training rows are streamed from the snapshot's parquet; the others build
# their training table from the train matrix (ncf pairs, cdae users, mf_implicit cells) in memory.
STREAMING = ("deepfm", "wide_deep", "dlrm", "dcn_stacked", "dcn_parallel", "din", "bst", "mmoe", "mf_sgd")
IN_MEMORY = ("gmf", "ncf_mlp", "neumf", "cdae", "mf_implicit")
AUC_TOLERANCE = 0.01


def _fit(name: str, snapshot: Snapshot, runtime: Runtime, **config):
    fam = FAMILIES[name]
    with use_runtime(runtime):
        return fam.fit(snapshot, parse_config(fam.config_cls, config), lambda _: None)


def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.module.state_dict())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("name", STREAMING)
def test_one_row_group_streams_the_in_memory_model_bit_for_bit(name, tiny):
    assert pq.ParquetFile(tiny.path / "fct_ctr_samples.parquet").metadata.num_row_groups == 1
    memory = _fit(name, tiny, Runtime(stream=False))
    stream = _fit(name, tiny, Runtime(stream=True))
    a, b = _state(memory), _state(stream)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "rows_per_s")} for r in h]  # noqa: E731
    assert strip(memory.history) == strip(stream.history)


def test_every_torch_family_is_on_one_of_the_two_paths():
    torch_families = {n for n, f in FAMILIES.items() if f.model.loss is not None}
    assert torch_families == set(STREAMING) | set(IN_MEMORY)


# --- many row groups: another order, the same model within a tolerance -------------------------
def write_signal_snapshot(root: Path, rows: int = 12_000, row_group: int = 1_000, seed: int = 0) -> Path:
    """A CTR snapshot whose clicks follow user and item biases, a dense feature and the history:
    ``P(like) = sigmoid(b_u + b_i + dense_0 + 0.5 [target shares the last item's genre])``."""
    rng = np.random.default_rng(seed)
    tiny = write_tiny_snapshot(root / "base", seed)  # the other tables and the meta layout
    meta = json.loads((tiny / "meta.json").read_text())
    card = meta["sparse_cardinality"]
    n_users, n_items = card["user_idx"], card["item_idx"]
    bu, bi = rng.normal(0, 1, n_users), rng.normal(0, 1, n_items)
    genre = rng.integers(1, card["genre_idx"], n_items)
    cols = {f: rng.integers(1, card[f], rows).astype(np.int32) for f in meta["sparse_fields"]}
    cols["genre_idx"] = genre[cols["item_idx"]].astype(np.int32)
    dense = {f: rng.normal(size=rows) for f in meta["dense_fields"]}
    hist = [rng.integers(1, n_items, rng.integers(0, 6)).astype(np.int32) for _ in range(rows)]
    same = np.array([len(h) > 0 and genre[h[-1]] == genre[i] for h, i in zip(hist, cols["item_idx"])])
    logit = bu[cols["user_idx"]] + bi[cols["item_idx"]] + dense["dense_user_activity"] + 0.5 * same
    like = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    split = rng.choice(["train", "valid", "test"], size=rows, p=[0.8, 0.1, 0.1])
    table = pa.table({"event_id": np.arange(rows), "split": split, "ts": np.arange(rows),
                      "label_like": like, "label_love": like * (rng.random(rows) < 0.4), **cols, **dense,
                      "history_item_idx": pa.array([h.tolist() for h in hist], pa.list_(pa.int32())),
                      "history_len": np.array([len(h) for h in hist], np.int32)})  # fmt: skip
    out = root / "signal"
    out.mkdir()
    for f in tiny.iterdir():
        if f.name != "fct_ctr_samples.parquet":
            (out / f.name).write_bytes(f.read_bytes())
    pq.write_table(table, out / "fct_ctr_samples.parquet", row_group_size=row_group)
    meta["split_rows"] = {s: int((split == s).sum()) for s in ("train", "valid", "test")}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def signal(tmp_path_factory) -> Snapshot:
    return Snapshot(write_signal_snapshot(tmp_path_factory.mktemp("signal")))


@pytest.mark.parametrize("name, config", [("deepfm", {}), ("din", {"max_history": 5})], ids=["deepfm", "din"])
def test_many_row_groups_train_the_same_model_within_tolerance(name, config, signal):
    assert pq.ParquetFile(signal.path / "fct_ctr_samples.parquet").metadata.num_row_groups == 12
    config = dict(epochs=2, patience=3, **config)
    best = lambda m: max(r["valid_metric"] for r in m.history)  # noqa: E731
    memory = best(_fit(name, signal, Runtime(stream=False), **config))
    stream = best(_fit(name, signal, Runtime(buffer_rows=3_000), **config))
    assert memory > 0.65, "the planted signal is learnable"
    assert abs(stream - memory) <= AUC_TOLERANCE, (stream, memory)


# --- the loader -------------------------------------------------------------------------------------
def _ids_file(path: Path, rows: int, row_group: int, splits=("train", "valid")) -> Path:
    split = np.array([splits[i % len(splits)] for i in range(rows)])
    pq.write_table(pa.table({"event_id": np.arange(rows), "split": split, "x": np.arange(rows) * 2.0}),
                   path, row_group_size=row_group)  # fmt: skip
    return path


def _ids(t: pa.Table) -> tuple[np.ndarray, ...]:
    return (t.column("event_id").to_numpy().astype(np.int64), t.column("x").to_numpy().astype(np.float32))


def _rows(path, **kw) -> ParquetRows:
    return ParquetRows(path, "train", ["event_id", "x"], _ids, **kw)


def test_one_row_group_and_a_big_buffer_give_the_in_memory_order(tmp_path):
    path = _ids_file(tmp_path / "t.parquet", 1000, row_group=1000)
    stream = _rows(path, seed=7, buffer_rows=10_000)
    ids = np.arange(0, 1000, 2)
    memory = ArrayRows((ids, ids * np.float32(2.0)), seed=7)
    for epoch in (1, 2, 3):
        got = [b[0] for b in stream.epoch(epoch, 64)]
        want = [b[0] for b in memory.epoch(epoch, 64)]
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_blocks_then_buffer_shuffle_sees_every_row_once_per_epoch(tmp_path):
    path = _ids_file(tmp_path / "t.parquet", 3000, row_group=100)
    rows = _rows(path, seed=0, buffer_rows=250)
    orders = []
    for epoch in (1, 2):
        batches = [b[0].numpy() for b in rows.epoch(epoch, 64)]
        assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(0, 3000, 2))  # every train row once, no valid row
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])
    assert rows.rows == 1500 and rows.groups_for(1) != rows.groups_for(2)


def test_rank_and_world_size_cut_disjoint_shares_of_the_row_groups(tmp_path):
    path = _ids_file(tmp_path / "t.parquet", 3000, row_group=100)
    ranks = [_rows(path, seed=3, buffer_rows=500, rank=r, world_size=3) for r in range(3)]
    for epoch in (1, 2):
        groups = [set(r.groups_for(epoch)) for r in ranks]
        assert set().union(*groups) == set(range(30)) and sum(map(len, groups)) == 30
        seen = [np.concatenate([b[0].numpy() for b in r.epoch(epoch, 32)]) for r in ranks]
        assert sorted(np.concatenate(seen).tolist()) == list(range(0, 3000, 2))
        assert [len(s) for s in seen] == [r.rows_for(epoch) for r in ranks]


def test_row_groups_without_the_split_are_never_read(tmp_path):
    path = tmp_path / "sorted.parquet"  # train rows first, as a file sorted by split
    split = np.array(["train"] * 400 + ["valid"] * 600)
    pq.write_table(pa.table({"event_id": np.arange(1000), "split": split, "x": np.zeros(1000)}), path,
                   row_group_size=100)  # fmt: skip
    rows = _rows(path)
    assert rows.groups == [0, 1, 2, 3] and rows.rows == 400


def test_ordered_batches_keep_file_order_across_row_groups(tmp_path):
    path = _ids_file(tmp_path / "t.parquet", 1000, row_group=70)
    batches = list(_rows(path).ordered(64))
    assert [len(b[0]) for b in batches] == [64] * 7 + [52]
    assert np.concatenate([b[0] for b in batches]).tolist() == list(range(0, 1000, 2))


def _pass_peak(path: Path, buffer_rows: int) -> tuple[int, int]:
    rows = _rows(path, buffer_rows=buffer_rows)
    tracemalloc.start()
    for _ in rows.epoch(1, 256):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return rows.peak_rows, peak


def test_peak_memory_does_not_grow_with_the_row_count(tmp_path):
    small = _ids_file(tmp_path / "small.parquet", 20_000, row_group=1_000)
    large = _ids_file(tmp_path / "large.parquet", 200_000, row_group=1_000)
    rows_small, bytes_small = _pass_peak(small, 4_000)
    rows_large, bytes_large = _pass_peak(large, 4_000)
    # at most the buffer plus one row group's train rows, whatever the file holds
    assert rows_small <= 4_000 + 500 and rows_large <= 4_000 + 500
    # numpy's allocations (traced): 10x the rows, about the same peak (not 10x)
    assert bytes_large < 1.5 * bytes_small, (bytes_small, bytes_large)


def test_pad_history_matches_the_row_by_row_rule():
    lists = pa.array([[1, 2, 3], [], None, [4], [5, 6, 7, 8, 9, 10]], pa.list_(pa.int32()))
    for arr in (lists, lists.slice(1), pa.chunked_array([lists.slice(0, 2), lists.slice(2)])):
        for length in (1, 3, 8):
            want = np.zeros((len(arr), length), np.int64)
            for row, items in enumerate(arr.to_pylist()):
                if items:
                    items = items[-length:]
                    want[row, : len(items)] = items
            assert np.array_equal(pad_history(arr, length), want)


def test_eval_rows_scores_the_same_thinned_valid_rows_streamed_and_in_memory(signal):
    """A valid split above ``eval_rows`` is thinned to every step-th row in file order: the
    row-group stream (batches that straddle the step) and the in-memory arrays pick the same."""
    from models.ctr import CtrData, ctr_meta, eval_stride, predict_logits
    from models.deepfm import DeepFM

    fam = FAMILIES["deepfm"]
    config = parse_config(fam.config_cls, {})
    features, labels = (lambda c: (c.sparse, c.dense)), (lambda c: c.label_like)
    valid = signal.ctr("valid", max_history=1)
    n = len(labels(valid))
    step = eval_stride(n, n // 3)
    assert step == 4 and eval_stride(n, n) == 1
    torch.manual_seed(0)
    module = DeepFM.build_module(config, ctr_meta(signal)).eval()
    data = CtrData(signal, 1, features, labels, 0, n // 3)
    logits, ys = data.predict(module, batch=777)
    x, y = [a[::step] for a in features(valid)], labels(valid)[::step]
    assert len(ys) == -(-n // step) and np.array_equal(ys, y)
    np.testing.assert_allclose(logits, predict_logits(module, *x), rtol=1e-5, atol=1e-6)


# --- evaluation reads the test split the same way ---------------------------------------------------
@pytest.fixture(scope="module")
def exported(signal, tmp_path_factory) -> dict[str, Path]:
    """deepfm (no history input), din (a history of any width) and mmoe (two heads), fitted for one
    epoch on the 12-row-group snapshot and exported through the parity gate."""
    from export.family_export import export_family

    root, out = tmp_path_factory.mktemp("exported"), {}
    for name, config in (("deepfm", {}), ("din", {"max_history": 5}), ("mmoe", {})):
        fam = FAMILIES[name]
        _fit(name, signal, Runtime(), epochs=1, **config).save(root / name / "model")
        result = export_family(fam, root / name / "model", signal.path, root / name / "onnx", run_id="t")
        assert result.parity_passed, result.parity_markdown
        out[name] = root / name / "onnx"
    return out


def _in_memory_ctr_metrics(onnx_dir: Path, snap: Snapshot, width: int | None) -> dict[str, float]:
    """What the evaluation gave before it streamed: the whole test split read at once, scored in
    batches of 1024 rows."""
    from common.metrics import evaluate_ctr
    from export.runtime import OrtScorer

    scorer, test = OrtScorer(onnx_dir / "model.onnx"), snap.ctr("test", max_history=width)
    feeds = {"sparse": test.sparse, "dense": test.dense, "history": test.history}
    names = scorer.input_names
    logits = np.concatenate([
        scorer.run(**{n: feeds[n][lo : lo + 1024] for n in names})[scorer.output_names[0]]
        for lo in range(0, len(test), 1024)
    ])  # fmt: skip
    if logits.ndim == 2:
        return evaluate_ctr(test.label_like, logits[:, 0], test.user_idx, task_name="like") | evaluate_ctr(
            test.label_love, logits[:, 1], test.user_idx, task_name="love")  # fmt: skip
    return evaluate_ctr(test.label_like, logits, test.user_idx)


@pytest.mark.parametrize("name, task", [("deepfm", "ctr"), ("din", "ctr"), ("mmoe", "multitask")])
def test_evaluation_streams_the_test_split_to_the_in_memory_metrics(name, task, exported, signal):
    from evaluation.evaluate import evaluate_onnx

    got = evaluate_onnx(exported[name], signal.path, task)
    want = _in_memory_ctr_metrics(exported[name], signal, 1 if name == "deepfm" else None)
    assert got == pytest.approx(want, rel=0, abs=0), name  # the same batches: the same logits
    assert got["n_rows" if task == "ctr" else "n_rows_like"] == signal.meta["split_rows"]["test"]


def test_evaluation_holds_one_row_group_of_histories_not_the_split(exported, tmp_path):
    """12k test rows with 100-wide histories are 9.6 MB as int64: reading the split at once allocates
    that and more; streamed, the peak is one row group's share (200 rows) plus a few bytes a row."""
    from evaluation.evaluate import evaluate_onnx

    big = Snapshot(write_signal_snapshot(tmp_path, rows=120_000, row_group=2_000, seed=0))
    big.meta["max_history_len"] = 100
    (big.path / "meta.json").write_text(json.dumps(big.meta))
    tests = big.meta["split_rows"]["test"]
    full_history = tests * 100 * 8
    tracemalloc.start()
    metrics = evaluate_onnx(exported["din"], big.path, "ctr")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert metrics["n_rows"] == tests
    assert peak < full_history / 2, (peak, full_history)
