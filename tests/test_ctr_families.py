"""Wide & Deep, DLRM and DCN-v2 (stacked, parallel): their named parts against the papers'
formulas, and every family fitted on the tiny snapshot, exported and passing the parity gate."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from test_models import write_tiny_snapshot

from export.family_export import export_family
from export.parity import parity_gate
from models import dcn, dcn_parallel, dcn_stacked, wide_deep
from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import Snapshot
from models.layers import CrossNetV2, DotInteraction, FeatureCross

CTR_FAMILIES = ("wide_deep", "dlrm", "dcn_stacked", "dcn_parallel")


def test_cross_layer_equals_the_formula():
    torch.manual_seed(0)
    net = CrossNetV2(dim=5, n_layers=2)
    x0 = torch.randn(3, 5)
    x = x0
    for layer in net.layers:  # x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, written out
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x0), x)


def test_low_rank_mixture_equals_the_per_expert_formula():
    torch.manual_seed(0)
    net = CrossNetV2(dim=6, n_layers=2, rank=2, n_experts=3)
    x0 = torch.randn(4, 6)
    x = x0
    for layer in net.layers:
        gates = torch.softmax(x @ layer.gate.weight.T, dim=1)
        mixed = x.clone()
        for i in range(3):  # sum_i G_i(x_l) * x_0 * (U_i tanh(C_i tanh(V_i^T x_l)) + b)
            expert = torch.tanh(torch.tanh(x @ layer.v[i]) @ layer.c[i]) @ layer.u[i]
            mixed = mixed + gates[:, i : i + 1] * x0 * (expert + layer.bias)
        x = mixed
    torch.testing.assert_close(net(x0), x)


def _dcn(config_cls: type, seed: int = 0) -> dcn.DCNModule:
    torch.manual_seed(seed)
    config = config_cls(embed_dim=4, cross_layers=2, hidden=(8, 6), dropout=0.0)
    return dcn.DCNModule([5, 7, 3], 2, config).eval()


def test_dcn_stacked_and_parallel_structures_differ_as_in_the_paper():
    sparse = torch.tensor([[1, 2, 0], [4, 6, 2], [0, 0, 0]])
    dense = torch.randn(3, 2)
    dim = 3 * 4 + 2
    stacked, parallel = _dcn(dcn_stacked.Config), _dcn(dcn_parallel.Config)
    with torch.no_grad():
        x0 = stacked.stem(sparse, dense)
        assert x0.shape == (3, dim)
        # stacked: deep on top of the cross output, head reads the deep output only
        assert stacked.deep.net[0].in_features == dim and stacked.head.in_features == 6
        want = stacked.head(stacked.deep(stacked.cross(x0))).squeeze(-1)
        torch.testing.assert_close(stacked(sparse, dense), want)
        # parallel: both read x_0, head reads [cross, deep] side by side
        x0 = parallel.stem(sparse, dense)
        assert parallel.deep.net[0].in_features == dim and parallel.head.in_features == dim + 6
        want = parallel.head(torch.cat([parallel.cross(x0), parallel.deep(x0)], 1)).squeeze(-1)
        torch.testing.assert_close(parallel(sparse, dense), want)
    assert FAMILIES["dcn_stacked"].config_cls is dcn_stacked.Config
    assert FAMILIES["dcn_parallel"].config_cls is dcn_parallel.Config


def test_dot_interaction_equals_explicit_pairwise_dots():
    z = torch.randn(3, 4, 5)
    explicit = torch.stack([(z[:, i] * z[:, j]).sum(-1) for i, j in itertools.combinations(range(4), 2)], 1)
    layer = DotInteraction(4)
    assert layer.out_dim == 6
    torch.testing.assert_close(layer(z), explicit)


def test_wide_cross_index_equals_the_explicit_product_index():
    card = [4, 3, 5]
    cross = FeatureCross(card, [(0, 2), (1, 2)])
    assert cross.total == 4 * 5 + 3 * 5
    rows = [(a, b, c) for a in range(4) for b in range(3) for c in range(5)]
    x = torch.tensor(rows)
    want = torch.tensor([(a * 5 + c, 4 * 5 + b * 5 + c) for a, b, c in rows])
    assert torch.equal(cross(x), want)
    # every value combination has its own row; out-of-range and negative ids are the unknown 0
    assert len(set(want[:, 0].tolist())) == 20 and len(set(want[:, 1].tolist())) == 15
    assert torch.equal(cross(torch.tensor([[9, -1, 7]])), torch.tensor([[0, 20]]))


def test_wide_deep_crosses_are_named_by_field_and_checked():
    fields = ["user_idx", "gender_idx", "genre_idx"]
    assert wide_deep.cross_columns((("gender_idx", "genre_idx"),), fields) == [(1, 2)]
    with pytest.raises(ValueError, match="crosses.*'age_idx'"):
        wide_deep.cross_columns((("age_idx", "genre_idx"),), fields)
    with pytest.raises(ValueError, match="crosses"):
        parse_config(wide_deep.Config, {"crosses": [["genre_idx", "genre_idx"]]})


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory) -> Path:
    return write_tiny_snapshot(tmp_path_factory.mktemp("ctr_snap"))


@pytest.mark.parametrize("name", CTR_FAMILIES)
def test_family_exports_and_passes_parity(name, snapshot_dir, tmp_path):
    fam = FAMILIES[name]
    model = fam.fit(Snapshot(snapshot_dir), parse_config(fam.config_cls, {"epochs": 2}), lambda _: None)
    assert model.family == name and [r["valid_metric_name"] for r in model.history] == ["auc"] * 2
    model.save(tmp_path / "model")
    result = export_family(fam, tmp_path / "model", snapshot_dir, tmp_path / "onnx", run_id="test")
    cases = {c.name: c for c in result.parity.cases}
    assert result.parity_passed, result.parity_markdown
    assert {"batch_1", "batch_257", "unknown_ids"} <= set(cases) and cases["batch_1"].batch == 1
    # ids past the vocabulary (and negative ones) fall back to the unknown bucket in both runtimes
    card = np.array(model.meta["cardinalities"])
    rng = np.random.default_rng(0)
    sparse = np.stack([card + 3, np.full_like(card, -1), rng.integers(1, card)]).astype(np.int64)
    dense = rng.normal(size=(3, len(model.meta["dense_fields"]))).astype(np.float32)
    dense[1] = dense[0]
    report = parity_gate(model.scorer(), tmp_path / "onnx" / "model.onnx", {"out_of_range": (sparse, dense)})
    assert report.passed, report.cases
    with torch.no_grad():
        out = model.score(sparse, dense)
        torch.testing.assert_close(out[0], out[1])  # both rows are "every field unknown"
        torch.testing.assert_close(out[0], model.score(np.zeros_like(sparse[:1]), dense[:1])[0])
