"""DIN and BST: masking, empty/padded/long histories, the activation unit's inputs, shared
item embeddings, and export + parity on the tiny snapshot (the zoo-wide tests in test_models.py
cover shapes, one optimisation step, save/load and determinism)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_models import write_tiny_snapshot

from export.family_export import export_family
from models import din
from models.catalogue import FAMILIES
from models.data import Snapshot


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("seq_snap")))


def build(name: str, snapshot: Snapshot, seed: int = 0, **overrides):
    """An untrained scorer in eval mode (random weights: masking does not depend on training)."""
    family = FAMILIES[name]
    config = family.config_cls(**overrides)
    meta = din.sequence_meta(snapshot, config)
    torch.manual_seed(seed)
    return family.model.build_module(config, meta).eval(), config


def rows(snapshot: Snapshot, length: int, n: int = 12):
    c = snapshot.ctr("test", max_history=length)
    return tuple(torch.from_numpy(a[:n]) for a in (c.sparse, c.dense, c.history))


def right_padded(batch: int, length: int, lengths: list[int], n_items: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(1, n_items, (batch, length), generator=g)
    return h.masked_fill(torch.arange(length) >= torch.tensor(lengths).unsqueeze(1), 0)


@pytest.mark.parametrize("softmax", [False, True])
def test_din_padding_slots_get_zero_weight_and_empty_history_no_nan(snapshot, softmax):
    m, _ = build("din", snapshot, attention_softmax=softmax)
    sparse, dense, _ = rows(snapshot, 5, n=4)
    history = right_padded(4, 7, [0, 3, 7, 1], snapshot.n_items)
    with torch.no_grad():
        w = m.attention_weights(sparse, history)
        out = m(sparse, dense, history)
    assert w.shape == (4, 7)
    assert (w[history == 0] == 0).all()
    assert (w[0] == 0).all()  # empty history: zero weights, not NaN (masked softmax over no keys)
    assert torch.isfinite(out).all()
    if softmax:  # normalised over the real slots only
        torch.testing.assert_close(w[1:].sum(dim=1), torch.ones(3))


def test_bst_padding_keys_get_zero_attention(snapshot):
    m, config = build("bst", snapshot, num_layers=2)
    sparse, _, _ = rows(snapshot, 5, n=4)
    history = right_padded(4, 6, [0, 2, 6, 5], snapshot.n_items)
    with torch.no_grad():
        w = m.attention_weights(sparse, history)  # [B, heads, L + 1], the target's key last
    assert w.shape == (4, config.num_heads, 7)
    assert (w[:, :, :-1][(history == 0).unsqueeze(1).expand(-1, config.num_heads, -1)] == 0).all()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(4, config.num_heads))
    assert (w[0, :, -1] == 1).all()  # empty history: the target attends to itself only


@pytest.mark.parametrize("name", ["din", "bst"])
def test_empty_and_unknown_inputs_give_finite_logits(snapshot, name):
    m, _ = build(name, snapshot)
    sparse, dense, history = rows(snapshot, 5)
    with torch.no_grad():
        for h in (torch.zeros_like(history), torch.zeros(len(sparse), 0, dtype=torch.int64)):
            assert torch.isfinite(m(sparse, dense, h)).all()
        assert torch.isfinite(m(torch.zeros_like(sparse), dense, torch.zeros_like(history))).all()
        # out-of-range history ids are ignored like padding
        bad = history.masked_fill(history == 0, snapshot.n_items + 7)
        torch.testing.assert_close(m(sparse, dense, bad), m(sparse, dense, history))


def test_din_activation_inputs_are_h_t_difference_product():
    h, t = torch.randn(3, 5, 4), torch.randn(3, 4)
    got = din.LocalActivationUnit.activation_inputs(h, t)
    te = t.unsqueeze(1).expand(3, 5, 4)
    torch.testing.assert_close(got, torch.cat([h, te, h - te, h * te], dim=-1))
    unit = din.LocalActivationUnit(4, (8,), softmax=False)
    assert unit.mlp.net[0].in_features == 16


def test_history_and_target_share_the_item_embedding_table(snapshot):
    for name in ("din", "bst"):
        m, _ = build(name, snapshot)
        sparse, _, _ = rows(snapshot, 5)
        items = sparse[:, m.item_column : m.item_column + 1]
        hist, mask = m.history(items)
        known = items[:, 0] > 0
        torch.testing.assert_close(hist[known, 0], m.embedding(sparse)[known, m.item_column])
        assert mask[:, 0].equal(known)


def test_recency_ranks_count_back_from_the_last_event():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ranks = din.recency_ranks(mask, max_rank=3)
    assert ranks.tolist() == [[3, 2, 1, 0, 0], [0, 0, 0, 0, 0], [3, 3, 3, 2, 1]]


@pytest.mark.parametrize("name", ["din", "bst"])
def test_output_is_invariant_to_extra_right_padding(snapshot, name):
    m, _ = build(name, snapshot)
    sparse, dense, history = rows(snapshot, 5)
    with torch.no_grad():
        ref = m(sparse, dense, history)
        for extra in (1, 17):
            padded = torch.cat([history, torch.zeros(len(history), extra, dtype=torch.int64)], dim=1)
            torch.testing.assert_close(m(sparse, dense, padded), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["din", "bst"])
def test_history_longer_than_trained_is_scored(snapshot, name):
    m, config = build(name, snapshot, max_history=4)
    sparse, dense, _ = rows(snapshot, 5, n=6)
    long = 3 * config.max_history + 5
    history = right_padded(6, long, [long, long - 2, 2, 0, 9, config.max_history], snapshot.n_items)
    with torch.no_grad():
        out = m(sparse, dense, history)
        recent = m(sparse, dense, history[:, : config.max_history])
    assert out.shape == (6,) and torch.isfinite(out).all()
    # rows whose events all fit in max_history score as if the history were truncated there
    short = (history > 0).sum(dim=1) <= config.max_history
    torch.testing.assert_close(out[short], recent[short], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["din", "bst"])
def test_export_passes_parity_on_history_cases(snapshot, name, tmp_path):
    fam = FAMILIES[name]
    model = fam.fit(snapshot, fam.config_cls(epochs=1, max_history=5), lambda _: None)
    model.save(tmp_path / "model")
    result = export_family(fam, tmp_path / "model", snapshot.path, tmp_path / "onnx", run_id="t")
    cases = {c.name: c for c in result.parity.cases}
    assert {"batch_1", "batch_257", "unknown_ids", "empty_history", "full_history", "long_history"} <= set(
        cases
    )
    assert result.parity_passed, result.parity_markdown
    history = next(i for i in result.signature["inputs"] if i["name"] == "history")
    assert history["shape"] == ["batch", "history"]
    # the file scores the snapshot's real rows like torch
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    sparse, dense, hist = rows(snapshot, 5, n=50)
    got = session.run(None, {"sparse": sparse.numpy(), "dense": dense.numpy(), "history": hist.numpy()})[0]
    np.testing.assert_allclose(got, model.score(sparse, dense, hist).numpy(), rtol=1e-4, atol=1e-5)
