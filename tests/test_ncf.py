"""NCF families (gmf, ncf_mlp, neumf) on the tiny planted snapshot of test_models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_models import write_tiny_snapshot

from models import ncf, topk
from models.base import TOPK, Task
from models.catalogue import FAMILIES as CATALOGUE
from models.config import ConfigError, parse_config
from models.data import Snapshot
from models.gmf import GMFModule
from models.ncf_mlp import MLPModule
from models.neumf import NeuMFModule, init_from_pretrained

FAST = {"epochs": 2, "eval_users": 20}
FAMILIES = ["gmf", "ncf_mlp", "neumf"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("ncf_snap")))


_FITTED: dict[str, object] = {}


def fast_config(name: str):
    cfg_cls = CATALOGUE[name].config_cls
    extra = {"pretrain_epochs": 2} if name == "neumf" else {}
    return parse_config(cfg_cls, FAST | extra)


@pytest.fixture
def fitted(snapshot):
    def get(name: str):
        if name not in _FITTED:
            _FITTED[name] = CATALOGUE[name].fit(snapshot, fast_config(name), lambda _: None)
        return _FITTED[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_scorer_shapes_dtypes_and_padding(name, fitted, snapshot):
    model = fitted(name)
    assert model.family == name and model.task is Task.TOPK
    spec = model.export_spec()
    assert [t.name for t in spec.inputs] == ["user_idx"] and spec.topk == TOPK
    users = torch.arange(0, snapshot.n_users + 3)  # includes unknown 0 and out-of-range ids
    with torch.no_grad():
        out = model.scorer()(users)
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(users), snapshot.n_items)
    assert torch.isfinite(out).all() and (out[:, 0] == -1e9).all()
    assert {"epoch", "train_loss", "valid_metric", "valid_metric_name", "rows_per_s", "seconds"} <= set(
        model.history[-1]
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_user_gets_train_popularity(name, fitted, snapshot):
    model = fitted(name)
    pop = snapshot.item_popularity().astype(np.float64)
    expected = (pop / pop.max()).astype(np.float32)
    with torch.no_grad():
        out = model.scorer()(torch.tensor([0, snapshot.n_users, -1])).numpy()
    for row in out:
        np.testing.assert_allclose(row[1:], expected[1:], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", FAMILIES)
def test_pair_logits_match_full_scores(name, fitted, snapshot):
    """The broadcast all-items path (split first MLP layer) equals the per-pair training path."""
    module = fitted(name).module
    users = torch.tensor([1, 5, 17])
    with torch.no_grad():
        full = module(users)
        u = users.repeat_interleave(snapshot.n_items - 1)
        i = torch.arange(1, snapshot.n_items).repeat(len(users))
        pairs = module.pair_logits(u, i).reshape(len(users), -1)
    torch.testing.assert_close(full[:, 1:], pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_optimisation_step_lowers_the_loss(name, snapshot):
    cfg = fast_config(name)
    model_cls = CATALOGUE[name].model
    torch.manual_seed(0)
    module = model_cls.build_module(cfg, {"n_users": snapshot.n_users, "n_items": snapshot.n_items}).train()
    batch = model_cls.training_batch(snapshot, cfg)
    assert len(batch[0]) == 256 * (1 + cfg.negatives)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    before = model_cls.loss(module, batch, cfg)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model_cls.loss(module, batch, cfg)
    assert after.item() < before.item()


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip_gives_identical_scores(name, fitted, snapshot, tmp_path):
    model = fitted(name)
    model.save(tmp_path / name)
    loaded = CATALOGUE[name].load(tmp_path / name)
    assert loaded.config == model.config and loaded.meta == model.meta
    users = torch.arange(0, snapshot.n_users)
    with torch.no_grad():
        assert torch.equal(model.scorer()(users), loaded.scorer()(users))


def test_neumf_initialises_from_pretrained_halves(snapshot):
    n_u, n_i = snapshot.n_users, snapshot.n_items
    torch.manual_seed(1)
    gmf = GMFModule(n_u, n_i, 8)
    mlp = MLPModule(n_u, n_i, 6, (12, 4))
    for m in (gmf, mlp):
        with torch.no_grad():
            m.predict.bias.fill_(float(torch.randn(())))
        m.popularity.copy_(torch.rand(n_i))
    neumf = NeuMFModule(n_u, n_i, 8, 6, (12, 4))
    init_from_pretrained(neumf, gmf, mlp, alpha=0.5)
    assert torch.equal(neumf.gmf_user.weight, gmf.user.weight)
    assert torch.equal(neumf.gmf_item.weight, gmf.item.weight)
    for (k, a), (k2, b) in zip(neumf.tower.state_dict().items(), mlp.tower.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    torch.testing.assert_close(
        neumf.predict.weight, torch.cat([0.5 * gmf.predict.weight, 0.5 * mlp.predict.weight], 1)
    )
    # so NeuMF starts as the alpha-blend of the two halves' logits
    users = torch.tensor([1, 2, 30])  # known users (unknown ones get popularity)
    with torch.no_grad():
        blend = 0.5 * gmf(users) + 0.5 * mlp(users)
        torch.testing.assert_close(neumf(users)[:, 1:], blend[:, 1:], rtol=1e-5, atol=1e-5)


def test_neumf_fit_with_pretraining_records_it(fitted):
    model = fitted("neumf")
    assert model.config.pretrain
    assert model.history[0]["epoch"] == 0 and model.history[0]["valid_metric"] is not None
    assert {"gmf_valid_ndcg@10", "ncf_mlp_valid_ndcg@10", "init_valid_ndcg@10"} <= set(model.meta["pretrain"])


def test_neumf_starts_from_fitted_halves_with_its_halves_config(fitted, snapshot):
    """Handed the gmf and ncf_mlp models (the pipeline's upstream), NeuMF does not train them
    again: the result is the same model as pretraining inside fit. A half whose fitted model
    has another config is pretrained inside fit instead, and the log says why."""
    alone = fitted("neumf")  # pretrained both halves itself
    halves = {"gmf": fitted("gmf"), "ncf_mlp": fitted("ncf_mlp")}
    lines: list[str] = []
    reused = CATALOGUE["neumf"].fit(snapshot, fast_config("neumf"), lines.append, halves)
    assert reused.meta["pretrain"]["halves"] == {"gmf": "fitted model", "ncf_mlp": "fitted model"}
    assert alone.meta["pretrain"]["halves"] == {"gmf": "pretrained here", "ncf_mlp": "pretrained here"}
    a, b = alone.module.state_dict(), reused.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["valid_metric"] for r in alone.history] == [r["valid_metric"] for r in reused.history]

    other = parse_config(CATALOGUE["neumf"].config_cls, FAST | {"pretrain_epochs": 2, "gmf_dim": 4})
    lines.clear()
    mixed = CATALOGUE["neumf"].fit(snapshot, other, lines.append, halves)
    assert mixed.meta["pretrain"]["halves"] == {"gmf": "pretrained here", "ncf_mlp": "fitted model"}
    assert any("pretraining the gmf half itself" in line and "'dim'" in line for line in lines), lines
    assert CATALOGUE["neumf"].model.reads_upstream(parse_config(other.__class__, {"pretrain": False})) == ()


def test_negative_sampler_never_returns_a_train_positive(snapshot):
    users, items = ncf.train_pairs(snapshot)
    sampler = topk.NegativeSampler(users, items, snapshot.n_items, seed=3)
    # many draws per user, on a catalogue where each user saw ~half the items
    batch_users = np.repeat(np.unique(users), 50)
    neg = sampler.sample(batch_users, 4)
    assert neg.shape == (len(batch_users), 4)
    assert neg.min() >= 1 and neg.max() < snapshot.n_items
    seen = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in seen for u, row in zip(batch_users.tolist(), neg.tolist()) for i in row)
    u, i, y = sampler.expand(users[:10], items[:10], 4)
    assert len(u) == len(i) == len(y) == 50 and y.sum() == 10 and y[:10].all()


def test_negative_sampler_handles_users_who_saw_almost_everything():
    n_items = 6
    users = np.repeat([1, 2], [4, 1])
    items = np.array([1, 2, 3, 4, 1])  # user 1 has only item 5 left
    neg = topk.NegativeSampler(users, items, n_items, seed=0, max_rounds=0).sample(np.array([1] * 20), 3)
    assert (neg == 5).all()


@pytest.mark.parametrize(
    ("cfg_cls", "field"), [(CATALOGUE["gmf"].config_cls, "dim"), (CATALOGUE["ncf_mlp"].config_cls, "hidden")]
)
def test_config_unknown_field_is_rejected(cfg_cls, field):
    with pytest.raises(ConfigError, match=r"unknown config field 'dimm'.*allowed fields") as e:
        parse_config(cfg_cls, {"dimm": 8})
    assert field in str(e.value)
    with pytest.raises(ConfigError, match="finetune_optimizer"):
        parse_config(CATALOGUE["neumf"].config_cls, {"finetune_optimizer": "rmsprop"})


@pytest.mark.parametrize("n_items", [1683, 59_048])
def test_tower_scoring_batches_fit_the_score_memory_budget(n_items):
    """ncf_mlp/neumf validation scores users against every item through [users, items, width]
    activations: the batch shrinks with the catalogue (256 users at the default data's 1,683
    items, as before; a few at ML-25M's 59k), and the scores do not depend on it."""
    from common.budget import DEFAULT_SCORE_MEMORY_BYTES

    torch.manual_seed(0)
    modules = [MLPModule(50, n_items, 8, (64, 32, 16)), NeuMFModule(50, n_items, 8, 8, (64, 32, 16))]
    for module in modules:
        sizes: list[int] = []
        module.register_forward_pre_hook(lambda _m, args, seen=sizes: seen.append(len(args[0])))
        users = np.arange(1, 50, dtype=np.int64).repeat(6)[:260]
        scores = topk.score_users(module, users)
        per_user_bytes = module.score_row_bytes()
        assert max(sizes) * per_user_bytes <= DEFAULT_SCORE_MEMORY_BYTES or max(sizes) == 1
        assert max(sizes) == (256 if n_items == 1683 else DEFAULT_SCORE_MEMORY_BYTES // per_user_bytes)
        with torch.no_grad():
            one = torch.cat([module(torch.from_numpy(users[k : k + 1])) for k in range(0, 260, 37)])
        assert np.allclose(scores[::37], one.numpy(), rtol=1e-6, atol=1e-6)
