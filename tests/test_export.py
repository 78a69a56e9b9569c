"""export/: ONNX export, parity gate, lineage stamps, onnxruntime loading, on toy scorers.

The toy scorers follow docs/MODEL_API.md (plain torch ops, inputs in spec order) so these tests
do not wait for models/; test_handoff.py reuses them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.lineage import (
    Lineage,
    code_version,
    config_sha256,
    file_sha256,
    read_onnx_lineage,
    stamp_onnx,
    write_lineage_json,
)
from export.onnx_export import (
    MASKED_SCORE,
    OPSET,
    ExportError,
    TopKScorer,
    export_onnx,
    export_topk_onnx,
    topk_spec,
)
from export.parity import PARITY_BATCH, ParityError, parity_batch, parity_gate, require_parity, standard_cases
from export.runtime import ModelFileError, OrtScorer
from export.signature import write_signature

try:  # the real types once models/base.py exists; the exporter only duck-types them
    from models.base import ExportSpec, TensorSpec
except ImportError:

    @dataclass(frozen=True)
    class TensorSpec:  # type: ignore[no-redef]
        name: str
        dtype: str
        shape: tuple[int | str, ...]

    @dataclass(frozen=True)
    class ExportSpec:  # type: ignore[no-redef]
        inputs: tuple[TensorSpec, ...]
        outputs: tuple[TensorSpec, ...]
        example_inputs: tuple[torch.Tensor, ...]
        topk: int | None = None
        notes: Any = None


N_USERS, N_ITEMS, DIM = 40, 30, 8
SPARSE_CARDS = [40, 30, 5, 7]  # user, item, a demographic, a genre
N_DENSE = 3
K = 5


class RatingMF(torch.nn.Module):
    """MF with biases; row 0 of each table is the unknown bucket (zero vector, zero bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.Embedding(N_USERS, DIM, padding_idx=0)
        self.item = torch.nn.Embedding(N_ITEMS, DIM, padding_idx=0)
        self.user_bias = torch.nn.Embedding(N_USERS, 1, padding_idx=0)
        self.item_bias = torch.nn.Embedding(N_ITEMS, 1, padding_idx=0)
        self.register_buffer("global_mean", torch.tensor(3.6))

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        dot = (self.user(user_idx) * self.item(item_idx)).sum(-1)
        return (
            self.global_mean
            + dot
            + self.user_bias(user_idx).squeeze(-1)
            + self.item_bias(item_idx).squeeze(-1)
        )


class TopKMF(torch.nn.Module):
    """Scores all items; the unknown user (row 0) gets popularity scores; column 0 is -1e9."""

    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.Embedding(N_USERS, DIM)
        self.items = torch.nn.Parameter(torch.randn(N_ITEMS, DIM))
        self.register_buffer("popularity", torch.rand(N_ITEMS))

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        scores = self.user(user_idx) @ self.items.T
        scores = torch.where((user_idx == 0).unsqueeze(1), self.popularity.unsqueeze(0), scores)
        return torch.cat([torch.full_like(scores[:, :1], -1e9), scores[:, 1:]], dim=1)


class CtrLR(torch.nn.Module):
    """Field embeddings (one table, per-field offsets) + dense linear part -> logit."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(SPARSE_CARDS)[:-1].tolist()]))
        self.emb = torch.nn.Embedding(sum(SPARSE_CARDS), DIM)
        self.dense = torch.nn.Linear(N_DENSE, DIM)
        self.out = torch.nn.Linear(DIM, 1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.emb(sparse + self.offsets).sum(1) + self.dense(dense)
        return self.out(torch.relu(x)).squeeze(-1)


class HistoryPool(torch.nn.Module):
    """DIN-like: target item attends over a right-padded history; empty history -> zero vector."""

    def __init__(self) -> None:
        super().__init__()
        self.item = torch.nn.Embedding(N_ITEMS, DIM, padding_idx=0)
        self.out = torch.nn.Linear(2 * DIM, 1)

    def forward(self, item_idx: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        target = self.item(item_idx)
        hist = self.item(history)
        att = (hist * target.unsqueeze(1)).sum(-1).masked_fill(history == 0, -1e4)
        weights = torch.softmax(att, dim=1) * (history > 0).float()
        pooled = (weights.unsqueeze(-1) * hist).sum(1)
        return self.out(torch.cat([target, pooled], dim=-1)).squeeze(-1)


@dataclass(frozen=True)
class Toy:
    task: str
    scorer: torch.nn.Module
    spec: Any
    cardinalities: dict[str, Any]


def _idx(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(1, high, shape)


def make_toys(seed: int = 0) -> dict[str, Toy]:
    """One scorer per task shape the contract names, with its ExportSpec."""
    torch.manual_seed(seed)
    rating = ExportSpec(
        inputs=(TensorSpec("user_idx", "int64", ("batch",)), TensorSpec("item_idx", "int64", ("batch",))),
        outputs=(TensorSpec("rating", "float32", ("batch",)),),
        example_inputs=(_idx(N_USERS, 4), _idx(N_ITEMS, 4)),
        topk=None,
        notes="unknown user or item: global mean plus the known side's bias",
    )
    topk = ExportSpec(
        inputs=(TensorSpec("user_idx", "int64", ("batch",)),),
        outputs=(TensorSpec("scores", "float32", ("batch", N_ITEMS)),),
        example_inputs=(_idx(N_USERS, 4),),
        topk=K,
        notes="unknown user: train popularity scores",
    )
    ctr = ExportSpec(
        inputs=(
            TensorSpec("sparse", "int64", ("batch", len(SPARSE_CARDS))),
            TensorSpec("dense", "float32", ("batch", N_DENSE)),
        ),
        outputs=(TensorSpec("logit", "float32", ("batch",)),),
        example_inputs=(
            torch.stack([_idx(c, 4) for c in SPARSE_CARDS], dim=1),
            torch.randn(4, N_DENSE),
        ),
        topk=None,
        notes="unknown ids: row-0 embeddings, trained as the unknown bucket",
    )
    history = ExportSpec(
        inputs=(
            TensorSpec("item_idx", "int64", ("batch",)),
            TensorSpec("history", "int64", ("batch", "history")),
        ),
        outputs=(TensorSpec("logit", "float32", ("batch",)),),
        example_inputs=(_idx(N_ITEMS, 4), _idx(N_ITEMS, 4, 6)),
        topk=None,
        notes="empty history: target embedding only",
    )
    return {
        "rating": Toy("rating", RatingMF().eval(), rating, {}),
        "topk": Toy("topk", TopKMF().eval(), topk, {}),
        "ctr": Toy("ctr", CtrLR().eval(), ctr, {"sparse": SPARSE_CARDS}),
        "history": Toy("ctr", HistoryPool().eval(), history, {}),
    }


TOYS = make_toys()


def _cases(toy: Toy, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    return standard_cases(toy.spec, N_ITEMS, N_USERS, np.random.default_rng(seed), toy.cardinalities)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every toy exported once (plus the top-K graph); the export+parity timings are printed."""
    root = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, toy in TOYS.items():
        start = time.perf_counter()
        paths[name] = export_onnx(toy.scorer, toy.spec, root / name / "model.onnx")
        exported_s = time.perf_counter() - start
        require_parity(parity_gate(toy.scorer, paths[name], _cases(toy)))
        print(f"{name}: export {exported_s:.2f}s, parity {time.perf_counter() - start - exported_s:.2f}s")
    toy = TOYS["topk"]
    paths["topk_graph"] = export_topk_onnx(toy.scorer, toy.spec, K, root / "topk" / "model_topk.onnx")
    return paths


@pytest.mark.parametrize("name", list(TOYS))
def test_export_is_checked_pinned_and_named(exported: dict[str, Path], name: str) -> None:
    model = onnx.load(str(exported[name]))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET
    spec = TOYS[name].spec
    assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
    assert not list(exported[name].parent.glob("*.data")), "weights must be inline, not external data"
    assert not list(exported[name].parent.glob(".*.tmp")), "no temp file left behind"


@pytest.mark.parametrize("name", list(TOYS))
def test_dynamic_batch(exported: dict[str, Path], name: str) -> None:
    session = ort.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    for batch in (1, 300):
        cases = standard_cases(
            TOYS[name].spec,
            N_ITEMS,
            N_USERS,
            np.random.default_rng(1),
            TOYS[name].cardinalities,
            batch_n=batch,
        )
        arrays = cases[f"batch_{batch}"]
        (out,) = session.run(None, dict(zip([i.name for i in session.get_inputs()], arrays)))
        assert out.shape[0] == batch


def test_history_axis_is_dynamic(exported: dict[str, Path]) -> None:
    model = onnx.load(str(exported["history"]))
    dims = [d.dim_param for d in model.graph.input[1].type.tensor_type.shape.dim]
    assert dims == ["batch", "history"]
    cases = _cases(TOYS["history"])
    assert {"empty_history", "full_history", "long_history"} <= set(cases)
    assert cases["long_history"][1].shape[1] > TOYS["history"].spec.example_inputs[1].shape[1]
    assert not cases["empty_history"][1].any() and cases["full_history"][1].all()


@pytest.mark.parametrize("name", list(TOYS))
def test_parity_gate_passes(exported: dict[str, Path], name: str) -> None:
    report = parity_gate(TOYS[name].scorer, exported[name], _cases(TOYS[name], seed=7))
    assert report.passed, report
    assert (report.atol, report.rtol) == (1e-5, 1e-4)
    assert {c.name for c in report.cases} >= {"batch_1", "batch_257", "unknown_ids"}
    assert all(c.max_abs_diff <= 1e-4 for c in report.cases)


def test_unknown_ids_case_uses_index_zero() -> None:
    sparse, dense = _cases(TOYS["ctr"])["unknown_ids"]
    assert not sparse.any() and dense.dtype == np.float32
    sparse, _ = _cases(TOYS["ctr"])["batch_257"]
    assert (sparse.min(0) >= 1).all() and (sparse.max(0) < np.array(SPARSE_CARDS)).all()


def test_topk_graph(exported: dict[str, Path]) -> None:
    toy = TOYS["topk"]
    model = onnx.load(str(exported["topk_graph"]))
    assert "TopK" in [n.op_type for n in model.graph.node]
    assert [i.name for i in model.graph.input] == ["user_idx", "seen_mask"]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    spec = topk_spec(toy.scorer, toy.spec, K)
    report = require_parity(
        parity_gate(
            TopKScorer(toy.scorer, K),
            exported["topk_graph"],
            standard_cases(spec, N_ITEMS, N_USERS, np.random.default_rng(0)),
        )
    )
    assert report.passed
    # Seen items and the padding column never come back, and scores are sorted.
    user_idx = np.arange(1, 11, dtype=np.int64)
    seen = np.zeros((10, N_ITEMS), dtype=bool)
    seen[:, 1:20] = True
    out = OrtScorer(exported["topk_graph"]).run(user_idx=user_idx, seen_mask=seen)
    assert out["top_items"].dtype == np.int64 and out["top_items"].shape == (10, K)
    assert (out["top_items"] >= 20).all()
    assert (np.diff(out["top_scores"], axis=1) <= 0).all()
    # With everything seen, the only entries left are the masked ones, all with MASKED_SCORE.
    out = OrtScorer(exported["topk_graph"]).run(user_idx=user_idx[:2], seen_mask=np.ones((2, N_ITEMS), bool))
    assert (out["top_scores"] == MASKED_SCORE).all()


def test_changed_weights_fail_parity(exported: dict[str, Path]) -> None:
    broken = make_toys()["rating"].scorer  # same seed: identical weights, then perturbed
    with torch.no_grad():
        broken.item.weight[1:] += 0.01
    report = parity_gate(broken, exported["rating"], _cases(TOYS["rating"]))
    assert not report.passed
    assert [c.passed for c in report.cases if c.name == "unknown_ids"] == [True]  # row 0 untouched
    with pytest.raises(ParityError, match=r"batch_1 \(batch 1\).*\n.*batch_257") as err:
        require_parity(report)
    assert "atol=1e-05" in str(err.value) and "do not evaluate or promote" in str(err.value)


def test_model_file_errors_name_the_file(exported: dict[str, Path], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated" / "model.onnx"
    truncated.parent.mkdir()
    data = exported["rating"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (truncated.parent / "lineage.json").write_text(json.dumps({"family": "mf_sgd", "version": "v7"}))
    with pytest.raises(ModelFileError, match="corrupt or truncated") as err:
        OrtScorer(truncated)
    assert str(truncated) in str(err.value) and "family=mf_sgd version=v7" in str(err.value)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 100)
    with pytest.raises(ModelFileError, match=str(garbage)):
        OrtScorer(garbage)
    with pytest.raises(ModelFileError, match="does not exist"):
        OrtScorer(tmp_path / "missing.onnx")


def test_ort_scorer_batches_and_checks_signature(exported: dict[str, Path], tmp_path: Path) -> None:
    toy = TOYS["ctr"]
    sparse, dense = _cases(toy)["batch_257"]
    whole = OrtScorer(exported["ctr"], batch_size=1000).run(sparse=sparse, dense=dense)["logit"]
    batched = OrtScorer(exported["ctr"], batch_size=10).run(sparse=sparse, dense=dense)["logit"]
    assert batched.shape == (257,) and np.array_equal(whole, batched)
    with pytest.raises(ValueError, match="'dense' is float64"):
        OrtScorer(exported["ctr"]).run(sparse=sparse, dense=dense.astype(np.float64))

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(exported["ctr"].read_bytes())
    write_signature(
        TOYS["rating"].spec, folder / "signature.json", {"task": "rating", "family": "toy_rating"}
    )
    with pytest.raises(ModelFileError, match="signature.json"):
        OrtScorer(folder / "model.onnx")


def test_signature_json(tmp_path: Path) -> None:
    toy = TOYS["topk"]
    path = write_signature(toy.spec, tmp_path / "signature.json", {"task": "topk", "family": "toy_topk"})
    sig = json.loads(path.read_text())
    assert sig["opset"] == OPSET and sig["task"] == "topk" and sig["family"] == "toy_topk"
    assert sig["inputs"] == [{"name": "user_idx", "dtype": "int64", "shape": ["batch"]}]
    assert sig["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch", N_ITEMS]}]
    assert sig["index_conventions"]["unknown_or_padding_index"] == 0
    assert "train" in sig["index_conventions"]["vocabularies_fitted_on"]
    assert sig["fallback_rules"] == toy.spec.notes
    assert sig["topk_k"] == K and sig["topk"]["k"] == K
    assert [t["name"] for t in sig["topk"]["outputs"]] == ["top_items", "top_scores"]

    hist = write_signature(TOYS["history"].spec, tmp_path / "h.json", {"task": "ctr", "family": "toy_din"})
    assert json.loads(hist.read_text())["inputs"][1]["shape"] == ["batch", "history"]


@dataclass(frozen=True)
class _Config:
    dim: int = 8
    lr: float = 0.01


def _lineage(config: _Config) -> Lineage:
    return Lineage(
        family="toy_rating",
        version="20261127T000000-abc",
        data_fingerprint="raw:1234",
        snapshot_fingerprint="snap:5678",
        dbt_manifest_sha256="f" * 64,
        split="temporal",
        config_sha256=config_sha256(config),
        config={"dim": config.dim, "lr": config.lr},
        code_version=code_version(Path(__file__)),
        trained_rows=12345,
        upstream={"raw_interactions": "dv1", "fct_ratings": "dv2"},
    )


def test_lineage_round_trip(exported: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(exported["rating"].read_bytes())
    lineage = _lineage(_Config())
    stamp_onnx(path, lineage)
    stamp_onnx(path, lineage)  # re-stamping replaces, never duplicates
    assert read_onnx_lineage(path) == asdict(lineage)
    keys = [p.key for p in onnx.load(str(path)).metadata_props if p.key.startswith("recsys.")]
    assert len(keys) == len(set(keys)) == len(asdict(lineage))
    assert json.loads(write_lineage_json(tmp_path, lineage).read_text()) == asdict(lineage)
    # The stamps ride along for other runtimes and do not change the scores.
    assert ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map["recsys.split"] == "temporal"
    require_parity(parity_gate(TOYS["rating"].scorer, path, _cases(TOYS["rating"])))
    assert file_sha256(path) != file_sha256(exported["rating"])


def test_config_hash_and_code_version() -> None:
    assert config_sha256(_Config()) == config_sha256(_Config())
    assert config_sha256(_Config()) != config_sha256(_Config(lr=0.02))
    version = code_version(Path(__file__))
    assert version.startswith(("git:", "pkg:"))
    fallback = code_version(Path(__file__), repo_dir="/")
    assert fallback.startswith("pkg:recsys-pipeline==") and "+src:" in fallback


def test_legacy_exporter_is_available_per_call(tmp_path: Path) -> None:
    toy = TOYS["history"]
    path = export_onnx(toy.scorer, toy.spec, tmp_path / "legacy.onnx", exporter="legacy")
    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[1].type.tensor_type.shape.dim]
    assert dims == ["batch", "history"]
    require_parity(parity_gate(toy.scorer, path, _cases(toy)))


def test_export_refuses_a_specialised_axis(tmp_path: Path) -> None:
    class FixedLength(torch.nn.Module):
        def forward(self, history: torch.Tensor) -> torch.Tensor:
            return history.float().reshape(history.shape[0], 6).sum(-1)  # pins history to 6

    spec = ExportSpec(
        inputs=(TensorSpec("history", "int64", ("batch", "history")),),
        outputs=(TensorSpec("logit", "float32", ("batch",)),),
        example_inputs=(_idx(N_ITEMS, 4, 6),),
        topk=None,
        notes=None,
    )
    with pytest.raises(ExportError, match="history"):
        export_onnx(FixedLength(), spec, tmp_path / "fixed.onnx")
    assert not list(tmp_path.iterdir()), "a failed export leaves nothing behind"


def test_torch_registry_is_built_once_and_the_files_are_the_same(tmp_path: Path, monkeypatch) -> None:
    """The dynamo exporter's ATen -> ONNX registry is shared across exports in a process; the
    graphs it gives are byte-identical to torch's own per-call registry."""
    import contextlib

    from torch.onnx._internal.exporter import _registration

    from export import torch_registry

    toy = TOYS["history"]
    built = []
    original = vars(_registration.ONNXRegistry)["from_torchlib"]

    def counting(cls, *args, **kwargs):
        built.append(args or kwargs)
        return original.__get__(None, cls)(*args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(torch_registry, "_TORCHLIB_REGISTRIES", {})
    shared = [export_onnx(toy.scorer, toy.spec, tmp_path / f"shared{i}.onnx") for i in range(2)]
    assert len(built) == 1, "the second export reused the first one's registry"
    assert vars(_registration.ONNXRegistry)["from_torchlib"].__func__ is counting, "restored afterwards"
    monkeypatch.setattr(torch_registry, "shared_torchlib_registry", contextlib.nullcontext)
    own = export_onnx(toy.scorer, toy.spec, tmp_path / "own.onnx")
    assert len(built) == 2
    graphs = {onnx.load(str(p)).graph.SerializeToString() for p in (*shared, own)}
    assert len(graphs) == 1


def test_the_batch_case_shrinks_where_each_row_scores_a_large_catalogue():
    """257 rows of a user's scores over 59k items through an MLP tower held ~19 GiB in the parity
    gate at ML-25M shape: the batch case keeps rows x output cells within a budget, odd, and keeps
    257 for the default data's 1,682 items and for one-score-per-row graphs."""

    def spec(*outputs):
        user = TensorSpec("user_idx", "int64", ("batch",))
        return ExportSpec(inputs=(user,), outputs=outputs, example_inputs=(torch.tensor([0, 1]),))

    scores = lambda n: TensorSpec("scores", "float32", ("batch", n))  # noqa: E731
    assert parity_batch(spec(TensorSpec("rating", "float32", ("batch",)))) == PARITY_BATCH
    assert parity_batch(spec(scores(1682))) == PARITY_BATCH
    wide = parity_batch(spec(scores(59_047)))
    assert wide % 2 == 1 and 3 <= wide < PARITY_BATCH and wide * 59_047 <= 1 << 21
    assert parity_batch(spec(scores(10_000_000))) == 3
    cases = standard_cases(spec(scores(59_047)), 59_047, 1000, np.random.default_rng(0), batch_n=wide)
    assert cases[f"batch_{wide}"][0].shape == (wide,)
