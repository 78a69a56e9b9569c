"""Exact K nearest neighbours over learned embeddings (SEED.md "Clustering"), task ``topk``.

"Given user or item embeddings, apply K nearest neighbours to find the K closest users or
items." The embeddings come from an upstream family fitted on the same snapshot
(``Config.source``: WALS, implicit MF, GMF or explicit MF), handed to ``fit`` as
``upstream[source]``; their ``embeddings()`` give ``user [n_users, d]`` and ``item
[n_items, d]`` with row 0 the unknown id. Similarity is cosine: both tables are L2-normalised
once at fit time, so a query is one MatMul and ``torch.topk``, exact (no approximate index).

Two graphs:

* ``model.onnx`` (the ``topk`` contract), user-neighbour recommendation: for user u the k most
  similar other users v by cosine (self and the padding row excluded, neighbours with cosine
  <= 0 dropped), then ``score_uj = sum_v cos(u, v) * R_vj`` with R the binary train matrix
  (``models.neighbours.NeighbourRows``: CSR rows gathered per neighbour, never a dense users x
  items table). Unknown user (0 / out of range) -> train popularity (``UserTopKScorer``).
* ``similar_items.onnx`` (``extra_graphs()``): ``item_idx [batch]`` -> ``similar_items [batch,
  K]``, ``similarity [batch, K]``, the K items of highest cosine, the item itself excluded.

Cosines are computed in float64 inside both graphs. The neighbour set is a discrete choice:
in float32 two candidates whose cosines differ by ~1e-7 can swap between torch and
onnxruntime (different MatMul summation orders) and move a score by a whole neighbour's
vote, failing the parity gate; in float64 the runtimes differ by ~1e-16, and candidates
that close practically never occur, so both pick the same neighbours and the same items.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import ranking_metrics
from models.base import ExportSpec, Task, TensorSpec, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.layers import UserTopKScorer
from models.neighbours import NeighbourRows
from models.topk import popularity
from models.train import format_row, history_row

# Families whose TrainedModel has embeddings() in one dot-product space: score = user . item
# (+ biases). ncf_mlp and NeuMF are left out: their scores come (partly) from an MLP over the
# concatenated embeddings, so cosine between those embeddings is not the similarity the model
# ranks by.
SOURCES = ("wals", "mf_implicit", "gmf", "mf_sgd")
# Marks a candidate that must never be picked (self, padding, no embedding): below any cosine.
_EXCLUDED = -2.0
# similarity reported where fewer than K items have an embedding (tiny catalogues only).
NO_ITEM_SIMILARITY = -1e9


@dataclass(frozen=True)
class Config:
    # Upstream family whose embeddings define similarity (one of SOURCES). mf_implicit: the
    # seed's weighted implicit objective, whose factors put users who interact with the same
    # items close together (what a neighbour vote needs); of the four sources its neighbours
    # ranked best on valid NDCG@10 on the default snapshot (mf_implicit 0.249, gmf 0.246,
    # wals 0.243, explicit mf_sgd 0.205: rating-fit factors model taste, not what is watched).
    # It is trained by the pipeline anyway, so the dependency costs ordering, not compute.
    source: str = "mf_implicit"
    # Neighbours per user: Herlocker et al. (1999) found 20-50 best for user-based CF on
    # MovieLens; the larger end, because cosine over dense factors is less noisy than over
    # sparse rating rows and more voters smooth the scores of light users.
    k: int = 50
    # Length of a similar-items list: a carousel shows ~10-20.
    similar_k: int = 20
    # Neighbours whose train rows are read per step (NeighbourRows): a step holds ~50 bytes per
    # stored cell of those rows, at most batch * slots * max_row cells (~120 MB at 256 users
    # and MovieLens-1M's heaviest user, 2.3k items); each step adds a few graph nodes.
    slots_per_step: int = 10
    # Valid users sampled to report a valid NDCG@10 (as WALS / mf_implicit do).
    eval_users: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(
                f"emb_knn: source {self.source!r} is not one of {SOURCES}; set `source` in the "
                "[emb_knn] section of models/families.toml (or RECSYS_MODEL_CONFIG) to one of them"
            )
        if min(self.k, self.similar_k, self.slots_per_step, self.eval_users) < 1:
            raise ValueError(f"emb_knn: k, similar_k, slots_per_step and eval_users must be >= 1, got {self}")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; all-zero rows (unknown, cold) stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def binary_rows(train: sp.csr_matrix) -> sp.csr_matrix:
    """The train matrix with every observed cell 1 (repeats counted once)."""
    r = train.tocsr().astype(np.float32, copy=True)
    r.sum_duplicates()
    r.eliminate_zeros()
    r.data[:] = 1.0
    r.sort_indices()
    return r


class CosineKNN(nn.Module):
    """Exact top-k rows of a unit-row table by cosine: ``forward(q [B]) -> (idx [B, k], sim [B, k])``.

    Candidates excluded: the query row itself, row 0 (padding) and rows without an embedding;
    each gets ``_EXCLUDED`` minus a tiny index-based offset, so even excluded entries never tie
    and the selection is the same in every runtime."""

    def __init__(self, n_rows: int, dim: int):
        super().__init__()
        self.register_buffer("unit", torch.zeros(n_rows, dim, dtype=torch.float64))
        self.register_buffer("rows", torch.arange(n_rows), persistent=False)

    def exclusion(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, n_rows]`` bool: candidates never to return for the queries ``q``."""
        empty = (self.unit == 0).all(dim=1)  # padding row 0 and rows without an embedding
        return (self.rows.unsqueeze(0) == q.unsqueeze(1)) | empty.unsqueeze(0)

    def masked(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``keys [B, n_rows]`` with the excluded candidates of ``q`` set to distinct values <= _EXCLUDED."""
        tie_break = self.rows.to(torch.float64) / self.rows.shape[0]
        return torch.where(self.exclusion(q), _EXCLUDED - tie_break.unsqueeze(0), keys)

    def similarities(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, n_rows]`` float64 cosines of the query rows ``q``, excluded candidates masked."""
        return self.masked(q, self.unit[q] @ self.unit.T)

    def forward(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sim, idx = torch.topk(self.similarities(q), k, dim=1)
        return idx, sim


class EmbKNNScorer(UserTopKScorer):
    """``user_idx [B]`` -> ``scores [B, n_items] = sum_{v in kNN(u)} cos(u, v) R_v``."""

    def __init__(self, n_users: int, n_items: int, dim: int, k: int, nnz: int, max_row: int, slots: int):
        super().__init__(n_users, n_items)
        self.k = k
        self.users = CosineKNN(n_users, dim)
        self.rows = NeighbourRows(n_users, n_items, nnz, max_row, slots)
        # not used to score users: kept so a saved model can rebuild its similar-items graph
        self.register_buffer("item_unit", torch.zeros(n_items, dim, dtype=torch.float64))

    def neighbours(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest users of valid rows ``u``; cosine <= 0 becomes padding (index 0, weight 0)."""
        idx, sim = self.users(u, self.k)
        vote = sim > 0  # dissimilar users (and excluded candidates) vote nothing
        return torch.where(vote, idx, torch.zeros_like(idx)), torch.where(vote, sim, 0.0).float()

    def all_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.rows(*self.neighbours(u))


class SimilarItems(nn.Module):
    """``item_idx [B]`` -> ``(similar_items [B, K] int64, similarity [B, K] float32)``.

    Known items with an embedding: the K others of highest cosine. Unknown (0 / out of
    range) or cold items (no embedding): the K most popular train items, similarity 0."""

    def __init__(self, n_items: int, dim: int, k: int):
        super().__init__()
        self.k = k
        self.items = CosineKNN(n_items, dim)
        # distinct values in (0, 1], higher = more popular (count desc, then index asc): no ties
        self.register_buffer("popular_key", torch.zeros(n_items, dtype=torch.float64))

    def forward(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_items = self.items.unit.shape[0]
        in_range = (item_idx > 0) & (item_idx < n_items)
        i = torch.where(in_range, item_idx, torch.zeros_like(item_idx))
        known = in_range & (self.items.unit[i] != 0).any(dim=1)
        sim = self.items.similarities(i)
        popular = self.items.masked(i, self.popular_key.unsqueeze(0).expand_as(sim))
        key = torch.where(known.unsqueeze(1), sim, popular)
        top, similar = torch.topk(key, self.k, dim=1)
        similarity = torch.where(known.unsqueeze(1), top, torch.zeros_like(top))
        similarity = torch.where(top <= _EXCLUDED, NO_ITEM_SIMILARITY, similarity)
        return similar, similarity.float()


def popular_key(pop: np.ndarray) -> np.ndarray:
    """Distinct ranking keys in (0, 1]: most popular first, ties by lower index."""
    order = np.lexsort((np.arange(len(pop)), -np.asarray(pop, np.float64)))
    key = np.empty(len(pop), dtype=np.float64)
    key[order] = (len(pop) - np.arange(len(pop))) / len(pop)
    return key


class EmbKNN(TrainedModel):
    family = "emb_knn"
    task = Task.TOPK
    config_cls = Config
    upstream = SOURCES
    upstream_note = (
        f"Built on the embeddings of one of {', '.join(SOURCES)} (config `source`); "
        "`upstream_models` names the one used."
    )

    @classmethod
    def reads_upstream(cls, config: Config) -> tuple[str, ...]:
        return (config.source,)

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return EmbKNNScorer(
            meta["n_users"],
            meta["n_items"],
            meta["dim"],
            meta["k"],
            meta["nnz"],
            meta["max_row"],
            config.slots_per_step,
        )

    def export_spec(self) -> ExportSpec:
        spec = user_topk_spec(
            self.meta,
            f"scores = sum over the {self.meta['k']} users of highest cosine over "
            f"{self.meta['source']} user embeddings (self excluded, cosine > 0) of cosine * their "
            "binary train interactions",
        )
        # the top-K graph cannot return more items than the catalogue has (tiny snapshots)
        return replace(spec, topk=min(spec.topk, self.meta["n_items"]))

    def similar_items(self) -> SimilarItems:
        """The similar-items module over this model's item embeddings (``extra_graphs``)."""
        module = SimilarItems(self.meta["n_items"], self.meta["dim"], self.meta["similar_k"])
        module.items.unit.copy_(self.module.item_unit)
        module.popular_key.copy_(torch.from_numpy(popular_key(self.module.popularity.numpy())))
        return module.eval()

    def extra_graphs(self) -> dict[str, tuple[nn.Module, ExportSpec]]:
        """Graphs exported beside model.onnx: ``{file stem: (module, spec)}``."""
        k = self.meta["similar_k"]
        items = torch.randint(1, self.meta["n_items"], (4,), generator=torch.Generator().manual_seed(0))
        items[0] = 0  # an unknown item in the example batch
        spec = ExportSpec(
            inputs=(TensorSpec("item_idx", "int64", ("batch",)),),
            outputs=(
                TensorSpec("similar_items", "int64", ("batch", k)),
                TensorSpec("similarity", "float32", ("batch", k)),
            ),
            example_inputs=(items,),
            topk=k,
            notes=f"the {k} items of highest cosine over {self.meta['source']} item embeddings, the "
            "item itself excluded, best first; unknown (0) or cold item -> the most popular train "
            f"items with similarity 0; similarity {NO_ITEM_SIMILARITY:g} = no candidate left",
        )
        return {"similar_items": (self.similar_items(), spec)}


def _source_model(config: Config, upstream: Mapping[str, TrainedModel], snapshot: Snapshot) -> TrainedModel:
    if config.source not in upstream:
        raise ValueError(
            f"emb_knn: source {config.source!r} was not handed to fit (got {sorted(upstream)}); "
            f"fit {config.source} on the same snapshot first and pass it as upstream[{config.source!r}]"
        )
    model = upstream[config.source]
    if model.family != config.source:
        raise ValueError(f"emb_knn: upstream[{config.source!r}] is a {model.family!r} model")
    shape = (model.meta.get("n_users"), model.meta.get("n_items"))
    if shape != (snapshot.n_users, snapshot.n_items):
        raise ValueError(
            f"emb_knn: the {config.source} model has (n_users, n_items) = {shape} but snapshot "
            f"{snapshot.path} has {(snapshot.n_users, snapshot.n_items)}; refit {config.source} on it"
        )
    return model


def fit(
    snapshot: Snapshot,
    config: Config,
    log: Callable[[str], None] = print,
    upstream: Mapping[str, TrainedModel] | None = None,
) -> EmbKNN:
    start = time.perf_counter()
    source = _source_model(config, upstream or {}, snapshot)
    user_emb, item_emb = (np.asarray(x) for x in source.embeddings())
    n_users, n_items = snapshot.n_users, snapshot.n_items
    if user_emb.shape[0] != n_users or item_emb.shape[0] != n_items or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"emb_knn: {config.source}.embeddings() gave {user_emb.shape} and {item_emb.shape}; "
            f"expected [{n_users}, d] and [{n_items}, d]"
        )
    train = binary_rows(snapshot.train_matrix("ones"))
    if train.nnz == 0:
        raise ValueError(f"{snapshot.path}: empty train split; emb_knn needs train interactions")
    dim = user_emb.shape[1]
    # at most every other user / item: k beyond that only adds excluded candidates
    k, similar_k = min(config.k, max(n_users - 2, 1)), min(config.similar_k, max(n_items - 2, 1))
    rows = NeighbourRows.from_csr(train, config.slots_per_step)
    meta = {
        "n_users": n_users,
        "n_items": n_items,
        "dim": dim,
        "k": k,
        "similar_k": similar_k,
        "nnz": int(train.nnz),
        "max_row": int(np.diff(train.indptr).max()),
        "source": config.source,
        "source_meta": {key: v for key, v in source.meta.items() if isinstance(v, int | float | str)},
    }
    module = EmbKNN.build_module(config, meta)
    module.rows.load_state_dict(rows.state_dict())
    module.users.unit.copy_(torch.from_numpy(unit_rows(user_emb)))
    module.item_unit.copy_(torch.from_numpy(unit_rows(item_emb)))
    module.popularity.copy_(popularity(snapshot))
    module.eval()
    model = EmbKNN(config, module, meta)

    metric = _valid_ndcg(module, snapshot, train, config)
    row = history_row(1, None, metric, "ndcg@10", train.nnz, time.perf_counter() - start)
    model.history = [row]
    log(format_row("emb_knn", row) + f"  (source={config.source}, d={dim}, k={k})")
    return model


def _valid_ndcg(
    module: EmbKNNScorer, snapshot: Snapshot, train: sp.csr_matrix, config: Config
) -> float | None:
    """NDCG@10 on a fixed sample of valid users (train items excluded), for the history row."""
    valid = snapshot.ratings("valid")
    keep = (valid.user_idx > 0) & (valid.item_idx > 0)
    relevant = sp.csr_matrix(
        (np.ones(int(keep.sum())), (valid.user_idx[keep], valid.item_idx[keep])), shape=train.shape
    )
    candidates = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if not len(candidates):
        return None
    rng = np.random.default_rng(config.seed)
    users = np.sort(rng.choice(candidates, size=min(config.eval_users, len(candidates)), replace=False))
    with torch.no_grad():
        scores = np.concatenate(
            [module(torch.from_numpy(users[lo : lo + 256])).numpy() for lo in range(0, len(users), 256)]
        )
    return ranking_metrics(scores, train, users, relevant)["ndcg@10"]
