"""Collaborative Denoising Auto-Encoder (Wu et al. 2016, "Collaborative Denoising Auto-Encoders
for Top-N Recommender Systems"), task ``topk``.

A user is their binary train item vector ``y_u`` (implicit feedback: 1 = interacted). Training
corrupts it with dropout noise (each observed item dropped with probability ``q``, the survivors
scaled by ``1 / (1 - q)`` so the expected input is unchanged) and learns to reconstruct the
*uncorrupted* vector::

    h   = sigmoid(W^T y~_u + V_u + b)        W [n_items, K] item input weights, V_u the user node
    y^  = sigmoid(W' h + b')                 W' [n_items, K] item output weights

The user node ``V_u`` (a per-user bias on the hidden layer) is what makes the DAE
*collaborative*; without it the model is an item-based DAE.

Loss (``loss``): logistic loss of the reconstruction, summed over the scored items and averaged
over the batch's users, plus L2 (``reg``) on the rows of W and W' the step reads and on the
batch's user nodes. Two ways to score, both in the paper:

- ``"full"`` (default), the paper's objective: every item of the catalogue, the user's items as
  1s and the rest as 0s. One ``[batch, n_items]`` logit block per step, ``O(n_items K)`` per user.
- ``"sampled"``, the paper's negative sampling: the user's items ``O_u`` and
  ``negatives x |O_u|`` items drawn uniformly from the rest (fresh every step),
  ``O(|O_u| (1 + negatives) K)`` per user; for catalogues where a ``[batch, n_items]`` block per
  step costs too much.

Why full is the default: at ML-25M shape (59k items, BENCHMARKS.md) sampled training stayed
below popularity after two whole epochs, while full beat it; and on the CPU full was the faster
of the two per user (one dense product against gathers and the rejection sampler). On the
default data (1.7k items) they rank level and full fits in about two thirds of the time.

Only the rows a step reads are penalised (all of W' under "full"), so over an epoch an item's
input and output rows are shrunk as often as they are used, as their data gradient is, and
the tables can train with sparse gradients. A whole-table penalty at every step (the code
before) also shrank items no step of the epoch had fed in.

Unknown user node: a fraction ``unknown_rate`` of training users has the node replaced by row 0,
so V_0 is trained as "a user we do not know" and the rest of the network learns to score from
the item vector alone (as the CTR families train their row-0 buckets).

Scorer (ONNX): ``user_idx [B]`` int64, ``user_items [B, n_items]`` float32 (the user's train
items: any value > 0 counts as seen; column 0 is ignored) -> ``scores [B, n_items]``, the
logits ``W' h + b'`` (not the sigmoid: same ranking, no saturation in float32); column 0
(padding) is -1e9. Rule for users outside the training vocabulary (index 0, negative or
``>= n_users``): their node is V_0; if their item vector is also empty, the row is the train
popularity ``count_j / max count`` (in [0, 1]) as for every ``topk`` family, otherwise the
model scores their items with V_0. That is CDAE's serving advantage: a user who signed up
after training is scored from the items they interacted with, without refitting (no fold-in
solve as in MF); on the synthetic snapshot, scoring every test user as new (index 0 plus
their items) gave NDCG@10 0.199, against 0.210 with their own node and 0.163 for popularity.
A known user with an empty vector is scored from their node alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from models.base import TOPK, TOPK_NOTES, ExportSpec, Task, TensorSpec, TrainedModel
from models.data import Snapshot
from models.distributed import rank_seed
from models.runtime import module_device
from models.topk import NegativeSampler, SampledTraining, ValidNDCG, popularity
from models.train import deterministic, train_torch

Log = Callable[[str], None]
LOSSES = ("full", "sampled")


@dataclass(frozen=True)
class Config(SampledTraining):
    # K = 50 hidden units: the paper's default size for its MovieLens experiments, and what the
    # public reference implementations use.
    hidden: int = 50
    # Dropout corruption q = 0.5: the public reference implementations' default (the paper
    # treats q as a per-data-set hyper-parameter).
    corruption: float = 0.5
    # The scored items: the whole catalogue ("full") or the user's items plus sampled
    # negatives ("sampled"); module docstring.
    loss: str = "full"
    # Negatives per observed item under loss = "sampled": enough to rank against the whole
    # catalogue while a step stays O(|O_u|) rather than O(n_items).
    negatives: int = 5
    # Users per step. The paper updates per user (AdaGrad); 32 users stay close to that in
    # updates per epoch (~190 on MovieLens-1M's 6k users) while a step stays vectorised.
    batch_size: int = 32
    # Adam 1e-2. An item's input/output rows only get gradient from the batch users who have
    # the item, and batching cuts the paper's per-user updates 32-fold; at the usual 1e-3 the
    # item weights barely move for dozens of epochs and early stopping ends in that plateau.
    lr: float = 1e-2
    # L2 lambda = 0.01 on W, W' and the user nodes: the reference implementations' value.
    reg: float = 0.01
    # Share of training users whose node is replaced by the unknown node 0 (see module doc).
    unknown_rate: float = 0.05
    # Each epoch is one pass over the users (a few steps on small data), so early stopping on
    # valid NDCG@10 decides; the cap bounds fit time.
    epochs: int = 200
    # Patience 10: an epoch is one pass over the users (a few dozen steps on small data), so
    # the valid metric moves less and is noisier per epoch than for the pair-based NCF families.
    patience: int = 10
    # Initial std of W, W' and V: ~1/sqrt(K) (Xavier scale for W'), so h differs across users
    # from the first step. With 0.01 every h is ~0.5, only the item biases learn (popularity)
    # for ~10 epochs, and early stopping mistakes that plateau for convergence (as in GMF).
    init_std: float = 0.1
    # eval_users, seed: SampledTraining's.

    def __post_init__(self):
        super().__post_init__()
        if self.hidden < 1 or self.patience < 1:
            raise ValueError("cdae: hidden and patience must be >= 1")
        if not 0 <= self.corruption < 1:
            raise ValueError(f"cdae: corruption must be in [0, 1), got {self.corruption}")
        if not 0 <= self.unknown_rate < 1:
            raise ValueError(f"cdae: unknown_rate must be in [0, 1), got {self.unknown_rate}")
        if self.init_std <= 0:
            raise ValueError(f"cdae: init_std must be > 0, got {self.init_std}")
        if self.loss not in LOSSES:
            raise ValueError(f"cdae: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


# --- module -----------------------------------------------------------------------------------
class CDAEModule(nn.Module):
    """The auto-encoder and the scorer contract of the module docstring in one module.

    Args:
        n_users: user nodes (row 0 = the unknown node).
        n_items: items (index 0 = padding, never an input or an output).
        hidden: K, the hidden layer's width.
        init_std: std of the normal init of W, W' and V.
    """

    def __init__(self, n_users: int, n_items: int, hidden: int, init_std: float = 0.1):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.item_in = nn.Embedding(n_items, hidden)  # W: row j = item j's input weights
        self.user_node = nn.Embedding(n_users, hidden)  # V: row 0 = the unknown node
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))  # b
        self.item_out = nn.Embedding(n_items, hidden)  # W': row j = item j's output weights
        self.item_bias = nn.Parameter(torch.zeros(n_items))  # b'
        for table in (self.item_in, self.user_node, self.item_out):
            nn.init.normal_(table.weight, std=init_std)
        with torch.no_grad():  # the padding item never enters or leaves the network
            self.item_in.weight[0].zero_()
            self.item_out.weight[0].zero_()
        self.register_buffer("popularity", torch.zeros(n_items))  # count / max count
        self.register_buffer("pad_mask", torch.arange(n_items) == 0, persistent=False)

    def hidden_sparse(
        self, node: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Training path: ``h [B, K]`` from each user's kept items as one embedding bag
        (``sum_j weights_j W_j``, i.e. ``W^T y~`` without materialising ``y~``)."""
        bag = nn.functional.embedding_bag(
            items, self.item_in.weight, offsets, mode="sum", per_sample_weights=weights,
            sparse=self.item_in.sparse,  # the lazy-Adam flag train_torch sets on large tables
        )  # fmt: skip
        return torch.sigmoid(bag + self.user_node(node) + self.hidden_bias)

    def pair_logits(self, h: torch.Tensor, row: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Logits of ``(row of h, item)`` pairs: ``W'_item . h_row + b'_item``."""
        return (h[row] * self.item_out(item)).sum(-1) + self.item_bias[item]

    def forward(self, user_idx: torch.Tensor, user_items: torch.Tensor) -> torch.Tensor:
        known = (user_idx > 0) & (user_idx < self.n_users)
        node = torch.where(known, user_idx, torch.zeros_like(user_idx))
        y = ((user_items > 0) & ~self.pad_mask).to(self.item_in.weight.dtype)
        h = torch.sigmoid(y @ self.item_in.weight + self.user_node(node) + self.hidden_bias)
        logits = h @ self.item_out.weight.T + self.item_bias
        nothing_known = ~known & (y.sum(dim=1) == 0)
        scores = torch.where(nothing_known.unsqueeze(1), self.popularity.unsqueeze(0), logits)
        return scores.masked_fill(self.pad_mask, -1e9)


# --- data -------------------------------------------------------------------------------------
def binary_train_matrix(snapshot: Snapshot) -> sp.csr_matrix:
    """Users x items CSR with 1 where the user interacted with the item in train (repeats count once)."""
    m = snapshot.train_matrix("ones").tocsr()
    m.sum_duplicates()
    m.data[:] = 1.0
    m.eliminate_zeros()
    return m


def user_item_rows(train: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """The scorer's ``user_items`` input: dense float32 rows of ``train`` (> 0 -> 1) for ``users``.

    Users outside ``train``'s rows (index 0, out of range) get an empty row."""
    users = np.asarray(users, np.int64)
    inside = (users > 0) & (users < train.shape[0])
    rows = np.zeros((len(users), train.shape[1]), dtype=np.float32)
    rows[inside] = (train[users[inside]].toarray() > 0).astype(np.float32)
    return rows


class BatchBuilder:
    """Turns a batch of users into ``CDAE.loss``'s tensors: corrupted inputs (kept items, bag
    offsets, 1/(1-q) weights), the user nodes (some replaced by 0) and the scored pairs (the
    user's items as positives plus sampled negatives). Its own seeded RNG, so training is
    reproducible and independent of train_torch's shuffling."""

    def __init__(self, train: sp.csr_matrix, config: Config, seed: int):
        self.train = train
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.sampler = None
        if config.loss == "sampled":  # the full loss draws nothing (no sorted keys to hold)
            coo = train.tocoo()
            self.sampler = NegativeSampler(
                coo.row.astype(np.int64), coo.col.astype(np.int64), train.shape[1], seed=seed + 1
            )

    def __call__(self, users: np.ndarray) -> tuple[torch.Tensor, ...]:
        c = self.config
        users = np.asarray(users, np.int64)
        rows = self.train[users]
        counts = np.diff(rows.indptr)
        items = rows.indices.astype(np.int64)
        owner = np.repeat(np.arange(len(users)), counts)
        node = np.where(self.rng.random(len(users)) < c.unknown_rate, 0, users)
        keep = self.rng.random(len(items)) >= c.corruption
        kept_per_user = np.bincount(owner[keep], minlength=len(users))
        offsets = np.concatenate([[0], np.cumsum(kept_per_user)[:-1]]).astype(np.int64)
        weights = np.full(int(keep.sum()), 1.0 / (1.0 - c.corruption), dtype=np.float32)
        if c.loss == "full":  # the positives only (no labels): the loss scores every item
            arrays = (node, items[keep], offsets, weights, owner, items, np.zeros(0, np.float32))
            return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        neg = self.sampler.sample(np.repeat(users, counts), c.negatives).reshape(-1)
        pair_row = np.concatenate([owner, np.repeat(owner, c.negatives)])
        pair_item = np.concatenate([items, neg])
        label = np.concatenate([np.ones(len(items), np.float32), np.zeros(len(neg), np.float32)])
        arrays = (node, items[keep], offsets, weights, pair_row, pair_item, label)
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _train_users(train: sp.csr_matrix) -> np.ndarray:
    users = np.flatnonzero(np.diff(train.indptr) > 0)
    return users[users > 0].astype(np.int64)


@torch.no_grad()
def score_users(module: nn.Module, users: np.ndarray, train: sp.csr_matrix, batch: int = 256) -> np.ndarray:
    """Full-catalogue scores of ``users``, each fed their train item vector."""
    module.eval()
    device = module_device(module)
    users = np.asarray(users, np.int64)
    out = []
    for lo in range(0, len(users), batch):
        u = users[lo : lo + batch]
        x = (torch.from_numpy(u).to(device), torch.from_numpy(user_item_rows(train, u)).to(device))
        out.append(module(*x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, train.shape[1]), np.float32)


# --- fitted model -----------------------------------------------------------------------------
class CDAE(TrainedModel):
    family = "cdae"
    task = Task.TOPK
    config_cls = Config

    @staticmethod
    def loss(module: CDAEModule, batch, config: Config) -> torch.Tensor:
        """Logistic loss summed over each user's scored items (``config.loss``: the whole
        catalogue or the positives plus sampled negatives), averaged over the batch's users,
        plus ``reg`` x (the squared norms of the W rows the batch feeds in and of the W' rows
        it scores, and the mean squared norm of the batch's user nodes)."""
        node, items, offsets, weights, pair_row, pair_item, label = batch
        h = module.hidden_sparse(node, items, offsets, weights)
        if config.loss == "full":  # pair_row, pair_item: the positives (label empty); column 0 never scored
            logits = h @ module.item_out.weight[1:].T + module.item_bias[1:]
            target = torch.zeros_like(logits)
            target[pair_row, pair_item - 1] = 1.0
            out_rows = module.item_out.weight
        else:
            logits = module.pair_logits(h, pair_row, pair_item)
            target = label
            out_rows = module.item_out(torch.unique(pair_item))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(node)
        if config.reg > 0:
            rows_sq = module.item_in(torch.unique(items)).pow(2).sum() + out_rows.pow(2).sum()
            loss = loss + config.reg * (rows_sq + module.user_node(node).pow(2).sum(-1).mean())
        return loss

    @staticmethod
    def training_batch(snapshot: Snapshot, config: Config, rows: int = 64) -> tuple[torch.Tensor, ...]:
        """``loss``'s batch for the first ``rows`` train users."""
        train = binary_train_matrix(snapshot)
        return BatchBuilder(train, config, config.seed)(_train_users(train)[:rows])

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return CDAEModule(meta["n_users"], meta["n_items"], config.hidden, config.init_std)

    def export_spec(self) -> ExportSpec:
        n_users, n_items = self.meta["n_users"], self.meta["n_items"]
        gen = torch.Generator().manual_seed(0)
        users = torch.randint(1, max(n_users, 2), (4,), generator=gen)
        users[0] = 0  # an unknown user in every example batch
        items = (torch.rand((4, n_items), generator=gen) < 0.05).float()
        items[0] = 0.0  # ... with an empty item vector: the popularity fallback
        items[:, 0] = 0.0
        return ExportSpec(
            inputs=(
                TensorSpec("user_idx", "int64", ("batch",)),
                TensorSpec("user_items", "float32", ("batch", n_items)),
            ),
            outputs=(TensorSpec("scores", "float32", ("batch", n_items)),),
            example_inputs=(users, items),
            topk=min(TOPK, n_items),  # a catalogue smaller than K (tests) still gets a top-K graph
            notes=(
                "scores = W' sigmoid(W^T y + V[user] + b) + b' (logits; sigmoid for a probability), "
                "y = (user_items > 0), column 0 ignored; user_items = the user's train items "
                "(1 = seen); a user outside the vocabulary is scored from their items with the "
                "unknown node V[0], and only one with an EMPTY user_items row gets the popularity "
                f"fallback; {TOPK_NOTES}"
            ),
        )


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> CDAE:
    train = binary_train_matrix(snapshot)
    users = _train_users(train)
    if len(users) == 0:
        raise ValueError(f"{snapshot.path}: empty train split; cdae needs train interactions")
    # The NCF families' valid NDCG@10 (same user sample and protocol), scoring with the item vectors.
    validation = ValidNDCG(snapshot, config.eval_users, config.seed, score=score_users)
    with deterministic(config.seed):
        module = CDAEModule(snapshot.n_users, snapshot.n_items, config.hidden, config.init_std)
        module.popularity.copy_(popularity(snapshot))
        build = BatchBuilder(train, config, rank_seed(config.seed + 1))  # torchrun: a stream per rank
        history = train_torch(
            module,
            lambda m, b: CDAE.loss(m, b, config),
            (users,),
            validation,
            family="cdae",
            metric_name="ndcg@10",
            higher_is_better=True,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer="adam",
            lr=config.lr,
            patience=config.patience,
            seed=config.seed,
            log=log,
            prepare=lambda batch: build(batch[0].numpy()),  # on the CPU, before the move to the device
            max_minutes=config.max_minutes,
            # Tables read by lookup only (the L2 term too) train with a lazy Adam above the
            # runtime's sparse_min_rows: the user nodes, W, and W' under "sampled" ("full" reads
            # all of W'). At 25M events a dense Adam step over 162k x 50 nodes cost more than the
            # rest of the step; the default data's 944 users and 1.7k items stay dense.
            sparse=("user_node", "item_in") + (("item_out",) if config.loss == "sampled" else ()),
        )
    meta = {"n_users": snapshot.n_users, "n_items": snapshot.n_items}
    return CDAE(config, module.eval(), meta, history)
