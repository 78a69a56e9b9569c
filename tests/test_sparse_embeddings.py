"""Large embedding tables train with sparse gradients and a lazy Adam (RECSYS_SPARSE_MIN_ROWS):
which tables, which families, that smaller tables keep the dense path bit for bit, and that the
trained module is a plain one again for saving and export."""

from __future__ import annotations

import pytest
import torch
from test_models import write_tiny_snapshot
from torch import nn

from export.family_export import export_family
from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import Snapshot
from models.lazy_sgd import LazySGD, rows_caught_up
from models.runtime import DEFAULT_SPARSE_MIN_ROWS, Runtime, use_runtime
from models.train import Optimizers, make_optimizer, sparse_tables, train_torch
from pipeline.fitting import gradient_trained
from pipeline.settings import DEFAULT_SPARSE_MIN_ROWS as SETTINGS_DEFAULT
from pipeline.settings import SettingsError, load_settings

# The tiny snapshot has 61 users, 51 items and CTR feature tables of a few hundred rows; 52 picks
# the user tables and the CTR tables, and leaves out tables of 51 rows and fewer (items,
# DIN's recency and BST's position embeddings, which BST also reads by its weight).
MIN_ROWS = 52
# Families whose every table is read by lookup get sparse tables (Adam: a lazy Adam; mf_sgd's
# momentum SGD: LazySGD). cdae's item tables have 51 rows here, so only its user nodes go sparse
# (its item tables: test_cdae_item_tables_go_sparse_where_read_by_lookup). mf_implicit's factor
# tables are plain parameters, picked by its own fit.
OWN_TABLES = {"mf_implicit": ["user_factors"], "cdae": ["user_node"]}
GRADIENT = sorted(n for n, f in FAMILIES.items() if gradient_trained(f) and n != "neumf")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


def _fit(name: str, snapshot: Snapshot, runtime: Runtime, **fields):
    family = FAMILIES[name]
    config = parse_config(family.config_cls, {"epochs": 2, **fields})
    with use_runtime(runtime) as loops:
        model = family.fit(snapshot, config, lambda _: None)
    return model, loops


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_default_threshold_matches_settings_and_is_above_the_default_data():
    assert DEFAULT_SPARSE_MIN_ROWS == SETTINGS_DEFAULT == load_settings({}).sparse_min_rows
    # the default data's largest table (the CTR families' shared one: 943 users, 1682 items and
    # the side features) is far below the threshold, so the default leaderboard is unchanged
    assert 943 + 1682 + 200 < DEFAULT_SPARSE_MIN_ROWS
    assert load_settings({"RECSYS_SPARSE_MIN_ROWS": "0"}).sparse_min_rows == 0
    with pytest.raises(SettingsError, match="RECSYS_SPARSE_MIN_ROWS"):
        load_settings({"RECSYS_SPARSE_MIN_ROWS": "-1"})
    # torchrun groups all-reduce dense gradients: no sparse tables there
    assert Runtime(world_size=2).sparse_rows == 0 and Runtime().sparse_rows == DEFAULT_SPARSE_MIN_ROWS
    assert Runtime(sparse_min_rows=5).key() != Runtime().key()  # the reuse cache tells them apart


@pytest.mark.parametrize("name", GRADIENT)
def test_family_trains_large_tables_sparse_and_hands_back_plain_tables(name, snapshot):
    model, loops = _fit(name, snapshot, Runtime(sparse_min_rows=MIN_ROWS))
    tables = sorted({t for loop in loops for t in loop["sparse_tables"]})
    module = model.module
    expected = OWN_TABLES.get(name) or sparse_tables(module, MIN_ROWS)
    assert tables == sorted(expected), (name, tables)
    assert tables, f"{name} has no table of {MIN_ROWS}+ rows on the tiny snapshot"
    assert not any(m.sparse for m in module.modules() if isinstance(m, nn.Embedding))
    assert not getattr(module, "sparse_tables", None)  # mf_implicit's flag is cleared too
    assert all(torch.isfinite(p).all() for p in module.parameters())


CDAE_SPARSE = [("full", ["item_in", "user_node"]), ("sampled", ["item_in", "item_out", "user_node"])]


@pytest.mark.parametrize(("loss", "expected"), CDAE_SPARSE)
def test_cdae_item_tables_go_sparse_where_read_by_lookup(snapshot, loss, expected):
    """The full loss reads the whole of W' (every item scored), so W' stays dense there."""
    model, loops = _fit("cdae", snapshot, Runtime(sparse_min_rows=2), loss=loss)
    assert loops[0]["sparse_tables"] == expected
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_sparse_deepfm_exports_and_passes_the_parity_gate(snapshot, tmp_path):
    model, loops = _fit("deepfm", snapshot, Runtime(sparse_min_rows=MIN_ROWS))
    assert loops[0]["sparse_tables"] == ["embedding.embedding", "linear.weight"]
    model.save(tmp_path / "model")
    result = export_family(FAMILIES["deepfm"], tmp_path / "model", snapshot.path, tmp_path / "onnx")
    assert result.parity.passed


def test_tables_below_the_threshold_train_exactly_as_dense_adam(snapshot):
    """A threshold above every table is the dense path: the same weights as no sparse tables."""
    dense, loops = _fit("gmf", snapshot, Runtime(sparse_min_rows=0))
    high, high_loops = _fit("gmf", snapshot, Runtime(sparse_min_rows=10_000))
    lazy, lazy_loops = _fit("gmf", snapshot, Runtime(sparse_min_rows=MIN_ROWS))
    assert loops[0]["sparse_tables"] == high_loops[0]["sparse_tables"] == []
    assert lazy_loops[0]["sparse_tables"] == ["user"]
    a, b, c = _weights(dense.module), _weights(high.module), _weights(lazy.module)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["user.weight"], c["user.weight"])  # lazy Adam is another optimiser


def _toy_loop(runtime: Runtime, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    torch.manual_seed(0)
    table, head = nn.Embedding(100, 3), nn.Linear(3, 1)
    module = nn.ModuleDict({"table": table, "head": head})
    start = table.weight.detach().clone()
    target = torch.linspace(-1, 1, len(rows))

    def loss(m, batch):
        x, y = batch
        return nn.functional.mse_loss(m["head"](m["table"](x)).squeeze(-1), y)

    with use_runtime(runtime) as loops:
        train_torch(module, loss, (rows.numpy(), target.numpy()), lambda m: 0.0, family="toy",
                    metric_name="none", higher_is_better=True, epochs=3, batch_size=4,
                    optimizer="adam", lr=0.1, log=lambda _: None)  # fmt: skip
    return start, table.weight.detach().clone(), loops


def test_lazy_adam_moves_only_the_rows_a_batch_touched():
    """Rows 0-9 are touched, 10-99 never: both optimisers leave 10-99 alone; the sparse path's
    gradients reach the optimiser as sparse tensors and every touched row moves."""
    rows = torch.arange(10).repeat(2)
    start, lazy, loops = _toy_loop(Runtime(sparse_min_rows=50), rows)
    assert loops[0]["sparse_tables"] == ["table"]
    assert torch.equal(lazy[10:], start[10:])
    assert not torch.isclose(lazy[:10], start[:10]).all(dim=1).any()
    _, dense, dense_loops = _toy_loop(Runtime(sparse_min_rows=0), rows)
    assert dense_loops[0]["sparse_tables"] == []
    assert not torch.equal(dense[:10], lazy[:10])


def test_make_optimizer_splits_sparse_tables_and_refuses_weight_decay_on_them():
    table, head = nn.Embedding(10, 2, sparse=True), nn.Linear(2, 1)
    params = [*table.parameters(), *head.parameters()]
    opt = make_optimizer(params, "adam", 0.01, sparse=[table.weight])
    assert isinstance(opt, Optimizers)
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds == ["Adam", "SparseAdam"]
    assert [len(o.param_groups[0]["params"]) for o in opt.optimizers] == [2, 1]
    sgd = make_optimizer(params, "sgd", 0.01, momentum=0.9, sparse=[table.weight])
    assert [type(o).__name__ for o in sgd.optimizers] == ["SGD", "LazySGD"]
    assert sgd.optimizers[1].param_groups[0]["momentum"] == 0.9
    for name in ("adam", "sgd"):  # a weight decay gives every row a gradient at every step
        with pytest.raises(ValueError, match="without weight_decay"):
            make_optimizer(params, name, 0.01, weight_decay=1e-4, sparse=[table.weight])
    assert isinstance(make_optimizer(params, "adam", 0.01), torch.optim.Adam)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lazy_sgd_is_dense_momentum_sgd_at_the_cost_of_the_touched_rows(momentum):
    """Random batches of rows, most rows idle for many steps in a row: after ``catch_up`` every
    row is where torch's dense SGD has it; before, the idle rows have not been touched."""
    torch.manual_seed(0)
    dense, lazy = nn.Embedding(200, 4), nn.Embedding(200, 4, sparse=True)
    lazy.weight.data.copy_(dense.weight.data)
    target = torch.randn(200, 4)
    opt_dense = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=momentum)
    opt_lazy = LazySGD(lazy.parameters(), lr=0.05, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    with rows_caught_up({"t": lazy}, Optimizers([opt_lazy])):
        for step in range(1, 61):
            rows = torch.randint(0, 40 if step < 30 else 200, (8,), generator=gen)  # 40-199 idle, then not
            for table, opt in ((dense, opt_dense), (lazy, opt_lazy)):
                opt.zero_grad()
                ((table(rows) - target[rows]) ** 2).sum().backward()
                opt.step()
            if step % 10 == 9:
                before = lazy.weight.detach().clone()
                opt_lazy.catch_up()
                # momentum moves idle rows in dense SGD: under LazySGD only once caught up
                assert torch.equal(before, lazy.weight) == (momentum == 0.0)
                gap = (lazy.weight - dense.weight).abs().max().item()
                assert gap < 1e-5, (step, gap)


def test_mf_sgd_sparse_tables_train_the_dense_models_weights(snapshot):
    """mf_sgd's momentum SGD on sparse tables is the dense algorithm: the same epochs, the same
    validation RMSE and the same weights, up to float32 rounding. Batches of 16 leave most users
    idle for many steps (read at stale weights, the gap is 1e-2)."""
    small = {"batch_size": 16, "lr": 0.05}
    dense, dense_loops = _fit("mf_sgd", snapshot, Runtime(sparse_min_rows=0), **small)
    lazy, lazy_loops = _fit("mf_sgd", snapshot, Runtime(sparse_min_rows=MIN_ROWS), **small)
    assert dense_loops[0]["sparse_tables"] == []
    assert lazy_loops[0]["sparse_tables"] == ["user", "user_bias"]
    a, b = _weights(dense.module), _weights(lazy.module)
    gaps = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(gaps.values()) < 1e-5, gaps
    assert [r["epoch"] for r in dense.history] == [r["epoch"] for r in lazy.history]
    for d, s in zip(dense.history, lazy.history):
        assert abs(d["valid_metric"] - s["valid_metric"]) < 1e-5
