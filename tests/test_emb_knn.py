"""emb_knn: exact cosine KNN over upstream embeddings, against brute-force numpy; the similar-items
graph through onnxruntime; upstream selection; the export and Dagster wiring of the upstream model."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_models import write_tiny_snapshot

from export.family_export import export_family
from export.onnx_export import export_onnx
from models import emb_knn
from models.catalogue import FAMILIES
from models.config import ConfigError, parse_config
from models.data import Snapshot


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("emb_snap")))


_UPSTREAM: dict[str, object] = {}


def upstream_model(name: str, snapshot: Snapshot):
    if name not in _UPSTREAM:
        fam = FAMILIES[name]
        _UPSTREAM[name] = fam.fit(snapshot, parse_config(fam.config_cls, {}), lambda _: None)
    return _UPSTREAM[name]


def fit(snapshot: Snapshot, **overrides) -> emb_knn.EmbKNN:
    config = emb_knn.Config(**{"source": "wals", **overrides})
    return emb_knn.fit(
        snapshot, config, lambda _: None, {config.source: upstream_model(config.source, snapshot)}
    )


def brute_force_cosine_topk(emb: np.ndarray, queries: np.ndarray, k: int):
    """Per query: the k other rows of highest cosine, skipping row 0 and all-zero rows, by loops."""
    out_idx, out_sim = [], []
    for q in queries:
        cand = []
        for v in range(1, len(emb)):
            if v == q or not emb[v].any():
                continue
            cos = emb[q] @ emb[v] / (np.linalg.norm(emb[q]) * np.linalg.norm(emb[v])) if emb[q].any() else 0.0
            cand.append((cos, v))
        cand.sort(key=lambda t: -t[0])
        out_idx.append([v for _, v in cand[:k]])
        out_sim.append([c for c, _ in cand[:k]])
    return np.array(out_idx), np.array(out_sim)


def test_user_neighbours_and_scores_equal_brute_force(snapshot):
    model = fit(snapshot, k=7)
    user_emb, _ = model_source_embeddings(model, snapshot)
    users = np.arange(1, snapshot.n_users)
    ref_idx, ref_sim = brute_force_cosine_topk(user_emb, users, 7)
    m = model.scorer()
    with torch.no_grad():
        idx, w = m.neighbours(torch.from_numpy(users))
        scores = m(torch.from_numpy(users)).numpy()
    positive = ref_sim > 0
    np.testing.assert_array_equal(idx.numpy(), np.where(positive, ref_idx, 0))
    np.testing.assert_allclose(w.numpy(), np.where(positive, ref_sim, 0.0), rtol=1e-6, atol=1e-7)
    # scores = sum over neighbours of cosine * their binary train rows; column 0 padding
    binary = (snapshot.train_matrix("ones").toarray() > 0).astype(np.float64)
    ref = np.einsum("bk,bki->bi", np.where(positive, ref_sim, 0.0), binary[ref_idx])
    np.testing.assert_allclose(scores[:, 1:], ref[:, 1:], rtol=1e-5, atol=1e-5)
    assert (scores[:, 0] == -1e9).all()


def model_source_embeddings(model, snapshot):
    return upstream_model(model.config.source, snapshot).embeddings()


def test_unknown_user_gets_popularity_and_self_is_never_a_neighbour(snapshot):
    model = fit(snapshot)
    m = model.scorer()
    with torch.no_grad():
        out = m(torch.tensor([0, snapshot.n_users + 5]))
        idx, _ = m.neighbours(torch.arange(1, snapshot.n_users))
    pop = snapshot.item_popularity()
    np.testing.assert_allclose(out[:, 1:].numpy(), np.tile(pop[1:] / pop.max(), (2, 1)), rtol=1e-6)
    assert not (idx.numpy() == np.arange(1, snapshot.n_users)[:, None]).any()
    assert model.meta["k"] == min(emb_knn.Config().k, snapshot.n_users - 2)


def test_similar_items_graph_through_onnxruntime_equals_numpy(snapshot, tmp_path):
    model = fit(snapshot, similar_k=6)
    ((module, spec),) = model.extra_graphs().values()
    path = export_onnx(module, spec, tmp_path / "similar_items.onnx")
    assert any(n.op_type == "TopK" for n in onnx.load(str(path)).graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["similar_items", "similarity"]
    _, item_emb = model_source_embeddings(model, snapshot)
    known = np.flatnonzero(np.abs(item_emb).sum(1) > 0)
    known = known[known > 0]
    got_items, got_sim = session.run(None, {"item_idx": known.astype(np.int64)})
    ref_items, ref_sim = brute_force_cosine_topk(item_emb, known, 6)
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_allclose(got_sim, ref_sim, rtol=1e-6, atol=1e-6)
    # unknown / out-of-range items: the most popular train items (ties by lower index), similarity 0
    pop = snapshot.item_popularity()
    order = np.lexsort((np.arange(len(pop)), -pop))
    popular = order[order > 0][:6]
    items, sim = session.run(None, {"item_idx": np.array([0, snapshot.n_items + 3], dtype=np.int64)})
    np.testing.assert_array_equal(items, np.tile(popular, (2, 1)))
    assert (sim == 0).all()


def test_similar_items_cold_items_and_k_beyond_candidates_agree_with_onnxruntime(snapshot, tmp_path):
    """Cold items (no embedding) are never returned; K above the candidates pads with -1e9, and
    even those padded positions come out the same in torch and onnxruntime."""
    model = fit(snapshot, similar_k=snapshot.n_items)
    module, spec = model.extra_graphs()["similar_items"]
    k = model.meta["similar_k"]
    assert k == snapshot.n_items - 2
    cold = [3, 7, 11]
    module.items.unit[cold] = 0
    path = export_onnx(module, spec, tmp_path / "similar_items.onnx")
    queries = np.arange(0, snapshot.n_items + 2, dtype=np.int64)
    got_items, got_sim = ort.InferenceSession(str(path)).run(None, {"item_idx": queries})
    with torch.no_grad():
        ref_items, ref_sim = (t.numpy() for t in module(torch.from_numpy(queries)))
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_allclose(got_sim, ref_sim, rtol=1e-6, atol=1e-6)
    returned = got_sim > emb_knn.NO_ITEM_SIMILARITY
    assert not np.isin(got_items[returned], [0, *cold]).any()
    known = np.array([q not in (0, *cold) and q < snapshot.n_items for q in queries])
    # known item: all but itself, padding and the 3 cold items -> 3 padded slots; fallback: 2
    assert ((~returned[known]).sum(1) == 3).all() and ((~returned[~known]).sum(1) == 2).all()
    assert (got_sim[~known][returned[~known]] == 0).all()


def test_upstream_selection_and_errors(snapshot):
    gmf = fit(snapshot, source="gmf")
    assert gmf.meta["source"] == "gmf"
    user_emb, _ = upstream_model("gmf", snapshot).embeddings()
    np.testing.assert_allclose(gmf.scorer().users.unit.numpy(), emb_knn.unit_rows(user_emb), rtol=1e-6)
    with pytest.raises(ValueError, match="source 'ncf_mlp' is not one of"):
        emb_knn.Config(source="ncf_mlp")
    with pytest.raises(ConfigError, match=r"emb_knn.*models/families.toml"):
        parse_config(emb_knn.Config, {"source": "neumf"})
    with pytest.raises(ValueError, match=r"source 'mf_sgd' was not handed to fit.*fit mf_sgd"):
        emb_knn.fit(
            snapshot,
            emb_knn.Config(source="mf_sgd"),
            lambda _: None,
            {"wals": upstream_model("wals", snapshot)},
        )
    with pytest.raises(ValueError, match=r"upstream\['gmf'\] is a 'wals' model"):
        emb_knn.fit(
            snapshot, emb_knn.Config(source="gmf"), lambda _: None, {"gmf": upstream_model("wals", snapshot)}
        )
    assert FAMILIES["emb_knn"].upstream == emb_knn.SOURCES


def test_export_writes_similar_items_graph_parity_signature_and_upstream_lineage(snapshot, tmp_path):
    model = fit(snapshot)
    model.meta["upstream_models"] = {
        "model_wals": "run_id=r1 model_dir=/art/wals/r1/model"
    }  # as the asset does
    model.save(tmp_path / "model")
    result = export_family(
        FAMILIES["emb_knn"], tmp_path / "model", snapshot.path, tmp_path / "onnx", run_id="r2"
    )
    assert result.parity_passed, result.parity_markdown
    names = {c.name for c in result.parity.cases}
    assert {"batch_1", "topk:batch_1", "similar_items:batch_257", "similar_items:unknown_ids"} <= names
    graph = result.signature["graphs"]["similar_items"]
    assert graph["file"] == "similar_items.onnx" and graph["k"] == model.meta["similar_k"]
    assert [t["name"] for t in graph["outputs"]] == ["similar_items", "similarity"]
    assert (tmp_path / "onnx" / "similar_items.onnx").exists()
    lineage = json.loads((tmp_path / "onnx" / "lineage.json").read_text())
    assert lineage["upstream"]["model_wals"] == "run_id=r1 model_dir=/art/wals/r1/model"
    stamps = {p.key: p.value for p in onnx.load(str(tmp_path / "onnx" / "similar_items.onnx")).metadata_props}
    assert "model_wals" in stamps["recsys.upstream"]


def test_factory_wires_every_upstream_model_asset():
    from orchestration.definitions import defs
    from pipeline.steps import UpstreamModels

    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("model_emb_knn")).parent_keys}
    assert parents == {"training_snapshot", *(f"model_{s}" for s in emb_knn.SOURCES)}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("model_wals")).parent_keys} == {
        "training_snapshot"
    }
    # the asset hands fit a lazy mapping: only the model fit reads is loaded and named in lineage
    lazy = UpstreamModels({s: f"/nowhere/{s}/run-{s}/model" for s in emb_knn.SOURCES})
    assert sorted(lazy) == sorted(emb_knn.SOURCES) and lazy.used() == {}


def test_factory_upstream_models_load_only_what_fit_reads(snapshot, tmp_path):
    from pipeline.steps import UpstreamModels

    upstream_model("wals", snapshot).save(tmp_path / "wals" / "run-a" / "model")
    lazy = UpstreamModels({"wals": str(tmp_path / "wals" / "run-a" / "model"), "gmf": "/not/read"})
    model = emb_knn.fit(snapshot, emb_knn.Config(source="wals"), lambda _: None, lazy)
    assert model.meta["source"] == "wals"
    assert lazy.used() == {"model_wals": f"run_id=run-a model_dir={tmp_path / 'wals' / 'run-a' / 'model'}"}
