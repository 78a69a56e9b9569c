"""Neural Collaborative Filtering (He et al. 2017, "Neural Collaborative Filtering"), task ``topk``.

Three families in one file, sharing the data pipeline, the loss and the scorer convention:

- ``gmf``: generalised MF, ``logit = h . (p_u * q_i) + b`` (element-wise product of the
  user/item embeddings, then a learned linear layer; MF is the special case h = 1).
- ``ncf_mlp``: ``logit = h . MLP([p_u, q_i]) + b`` over the concatenated embeddings.
- ``neumf``: GMF and MLP with *separate* embeddings, their last layers concatenated, then one
  linear prediction layer. With ``pretrain`` (the paper's recipe) GMF and MLP are trained
  first inside ``fit``, NeuMF starts from their weights with the output layer
  ``h = [alpha h_gmf, (1 - alpha) h_mlp]`` (alpha = 0.5) and is fine-tuned with plain SGD
  at a low learning rate (Adam's moments are not carried over from pretraining, so the paper
  fine-tunes with SGD rather than restarting Adam on already-good weights).

Training (implicit feedback): every distinct (user, item) pair of the train split is a
positive; each positive gets ``negatives`` items drawn uniformly from the items the user did
not interact with in train, drawn afresh for every mini-batch (so every epoch sees new
negatives). Pointwise log loss (BCE with logits, outside the module), Adam, early stopping on
NDCG@10 over a fixed sample of valid users (full ranking, train items excluded).

Scorer (ONNX): ``user_idx [B]`` -> ``scores [B, n_items]``, the logits of every item for each
user (not the sigmoid: same ranking, no saturation in float32); column 0 (padding) is -1e9;
the unknown user (index 0, or out of range) gets train popularity ``count_j / max count``
(in [0, 1]), exactly as ``wals``. Scoring all items broadcasts the user embedding against the
whole item table. For the MLP path the first layer is applied to each half of the concatenation
separately (``W [p_u, q_i] = W_u p_u + W_i q_i``: the same numbers, without materialising
``[B, n_items, 2d]``), so peak memory is ``B * n_items * hidden[0] * 4`` bytes (~110 MB for
B = 256, 1.7k items, width 64); plan batches with that in mind for large catalogues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.metrics import ranking_metrics
from models.base import ExportSpec, Task, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.layers import MLP, UserTopKScorer
from models.train import deterministic, history_row, train_torch

Log = Callable[[str], None]


# --- configs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GMFConfig:
    FAMILY: ClassVar[str] = "gmf"  # models.config names errors after it
    # 32 predictive factors: the paper's ML-1M curves keep improving up to 64, but gains past
    # 32 are small and 32 matches wals' budget, keeping the comparison fair.
    dim: int = 32
    # 4 negatives per positive: the paper's default (its Fig. 7 shows 3-6 is the sweet spot).
    negatives: int = 4
    # Positives per step; with 4 negatives each a step is 1280 rows, in the paper's/CTR range
    # of ~1k rows. Larger batches need more epochs for the same number of updates.
    batch_size: int = 256
    # Adam 1e-3: the paper's and the reference code's setting for training from scratch.
    lr: float = 1e-3
    # L2 on the embedding rows a batch touches. The paper uses none and relies on early
    # stopping; a tiny penalty keeps rare users' embeddings from growing without bound.
    reg: float = 0.0
    # Early stopping decides; the cap keeps fit well under 30 s on MovieLens-100k-sized data
    # (one epoch = (1 + negatives) x #train pairs rows). The paper reports ~20 epochs.
    epochs: int = 30
    # Patience 3: the first few epochs only learn popularity (valid NDCG flat) before the
    # personal signal takes over; 1-2 stops in that flat stretch.
    patience: int = 3
    # Valid users sampled for model selection: full ranking costs n_items scores per user.
    eval_users: int = 1000
    # Embedding init std. The paper's 0.01 makes p_u * q_i ~ 1e-4 at the start, so GMF spends
    # ~10 epochs on a plateau that early stopping easily mistakes for convergence; 0.05 still
    # starts near zero logits but leaves the plateau within 1-2 epochs.
    init_std: float = 0.05
    seed: int = 0

    def __post_init__(self):
        _check_common(self)
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class MLPConfig:
    FAMILY: ClassVar[str] = "ncf_mlp"  # models.config names errors after it
    # Embeddings of 32 per side (64 concatenated) into a 64-32-16 tower: the paper's
    # halving tower ending at 16 predictive factors, sized for ~100k-1M interactions.
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64, 32, 16)
    # No dropout: the paper uses none; early stopping on valid NDCG does the regularising.
    dropout: float = 0.0
    negatives: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    reg: float = 0.0
    epochs: int = 30
    patience: int = 3
    eval_users: int = 1000
    # Larger than GMF's: the tower's first layer sees the embeddings through Kaiming-uniform
    # weights, and with 0.01 its input is ~0 for the first ~10 epochs (a plateau again).
    init_std: float = 0.1
    seed: int = 0

    def __post_init__(self):
        _check_common(self)
        if self.embed_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"embed_dim and every hidden width must be >= 1, got {self}")


@dataclass(frozen=True)
class NeuMFConfig:
    FAMILY: ClassVar[str] = "neumf"  # models.config names errors after it
    # GMF and MLP halves: the same sizes as the gmf / ncf_mlp defaults, so pretraining them
    # is exactly those families' fits.
    gmf_dim: int = 32
    mlp_embed_dim: int = 32
    mlp_hidden: tuple[int, ...] = (64, 32, 16)
    dropout: float = 0.0
    negatives: int = 4
    batch_size: int = 256
    # The paper's recipe: pretrain GMF and MLP (Adam), initialise NeuMF from them with the
    # output layer weighted alpha / (1 - alpha), fine-tune with SGD.
    pretrain: bool = True
    alpha: float = 0.5
    # Epoch cap of each pretraining fit (early stopping usually ends them first); the same as
    # the standalone families, so the halves are as good as gmf / ncf_mlp alone.
    pretrain_epochs: int = 30
    # Adam lr when training from scratch (pretrain = False).
    lr: float = 1e-3
    # Fine-tuning after pretraining: plain SGD (the paper's choice), with a learning rate
    # that moves the pretrained weights gently. The loss is a batch mean, so an embedding
    # row seen once in a step gets lr / 1280 of its gradient: lr must be O(1) for SGD to do
    # anything at all, yet well below the point where it undoes the pretraining.
    finetune_optimizer: str = "sgd"
    # (On a MovieLens-like temporal split the blend itself was the best valid point: both halves
    # are already early-stopped, so fit keeps the blend when fine-tuning does not beat it.)
    finetune_lr: float = 0.05
    finetune_momentum: float = 0.9
    reg: float = 0.0
    # Fine-tuning cap: pretrained weights are already near a good optimum, so few epochs.
    # Without pretraining this is the whole training cap (raise it, e.g. to 30).
    epochs: int = 8
    patience: int = 3
    eval_users: int = 1000
    # Init std of each half, as in the gmf / ncf_mlp defaults (see there).
    gmf_init_std: float = 0.05
    mlp_init_std: float = 0.1
    seed: int = 0

    def __post_init__(self):
        _check_common(self)
        if self.gmf_dim < 1 or self.mlp_embed_dim < 1 or not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ValueError("gmf_dim, mlp_embed_dim and every mlp_hidden width must be >= 1")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.finetune_optimizer not in ("sgd", "adam"):
            raise ValueError(f"finetune_optimizer must be 'sgd' or 'adam', got {self.finetune_optimizer!r}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be >= 1, got {self.pretrain_epochs}")


def _check_common(c) -> None:
    if c.negatives < 1 or c.batch_size < 1 or c.epochs < 1 or c.eval_users < 1:
        raise ValueError("negatives, batch_size, epochs and eval_users must be >= 1")
    if c.lr <= 0 or c.reg < 0:
        raise ValueError(f"lr must be > 0 and reg >= 0, got lr={c.lr}, reg={c.reg}")
    if not 0 <= getattr(c, "dropout", 0.0) < 1:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")


# --- negative sampling --------------------------------------------------------------------
def train_pairs(snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """Distinct train (user, item) pairs with both indices > 0, sorted by user then item."""
    m = snapshot.train_matrix("ones")
    m.sum_duplicates()
    coo = m.tocoo()
    keep = (coo.row > 0) & (coo.col > 0)
    users, items = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64)
    order = np.lexsort((items, users))
    return users[order], items[order]


class NegativeSampler:
    """Uniform negatives over ``[1, n_items)`` minus each user's train items, vectorised.

    Draw all candidates at once, look each (user, item) key up in the sorted train keys, redraw
    only the hits; after ``max_rounds`` the few left (users who saw most of the catalogue) are
    drawn exactly from their complement.
    """

    def __init__(
        self, users: np.ndarray, items: np.ndarray, n_items: int, seed: int = 0, max_rounds: int = 20
    ):
        self.n_items = int(n_items)
        self.keys = np.unique(users.astype(np.int64) * self.n_items + items.astype(np.int64))
        self.rng = np.random.default_rng(seed)
        self.max_rounds = max_rounds
        counts = np.bincount(users, minlength=1)
        if len(counts) and counts.max() >= self.n_items - 1:
            raise ValueError(f"user {int(counts.argmax())} interacted with every item: no negative to sample")

    def _seen(self, users: np.ndarray, cand: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + cand
        pos = np.searchsorted(self.keys, keys)
        return self.keys[np.minimum(pos, len(self.keys) - 1)] == keys

    def sample(self, users: np.ndarray, k: int) -> np.ndarray:
        """``[len(users), k]`` item indices, none of them a train item of that row's user."""
        users = np.asarray(users, np.int64)
        rep = np.repeat(users, k)
        cand = self.rng.integers(1, self.n_items, size=len(rep))
        bad = np.flatnonzero(self._seen(rep, cand)) if len(self.keys) else np.zeros(0, np.int64)
        for _ in range(self.max_rounds):
            if not len(bad):
                break
            cand[bad] = self.rng.integers(1, self.n_items, size=len(bad))
            bad = bad[self._seen(rep[bad], cand[bad])]
        for r in bad:  # rare: heavy users; exact draw from the complement
            u = rep[r]
            lo, hi = np.searchsorted(self.keys, [u * self.n_items, (u + 1) * self.n_items])
            cand[r] = self.rng.choice(
                np.setdiff1d(np.arange(1, self.n_items), self.keys[lo:hi] - u * self.n_items)
            )
        return cand.reshape(len(users), k)

    def expand(self, users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Positives plus ``k`` fresh negatives each: ``(user, item, label float32)`` rows."""
        neg = self.sample(users, k)
        u = np.concatenate([users, np.repeat(users, k)])
        i = np.concatenate([items, neg.reshape(-1)])
        y = np.concatenate([np.ones(len(users), np.float32), np.zeros(neg.size, np.float32)])
        return u, i, y


# --- modules --------------------------------------------------------------------------------
def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    emb = nn.Embedding(n, dim, padding_idx=0)
    nn.init.normal_(emb.weight, std=std)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class NCFScorer(UserTopKScorer):
    """Shared NCF scorer (the top-K contract of ``UserTopKScorer``): subclasses give
    ``pair_logits(u, i)`` (training), ``all_scores(u)`` (logits ``[B, n_items]``, u already
    mapped to a valid row) and ``embedding_tables(u, i)`` (for ``reg``)."""

    def touched_sq(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the embedding rows a pair uses, ``[N]`` (for ``reg``)."""
        return sum(t(x).pow(2).sum(-1) for t, x in self.embedding_tables(u, i))

    def embedding_tables(self, u, i):
        raise TypeError(f"{type(self).__name__} must define embedding_tables(u, i)")


class GMFModule(NCFScorer):
    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.01):
        super().__init__(n_users, n_items)
        self.user = _embedding(n_users, dim, init_std)
        self.item = _embedding(n_items, dim, init_std)
        self.predict = nn.Linear(dim, 1)

    def features(self, u, i):
        return self.user(u) * self.item(i)

    def pair_logits(self, u, i):
        return self.predict(self.features(u, i)).squeeze(-1)

    def all_scores(self, u):
        # h . (p_u * q_j) + b = (p_u * h) . q_j + b: one [B, d] x [d, n_items] matmul
        return (self.user(u) * self.predict.weight) @ self.item.weight.T + self.predict.bias

    def embedding_tables(self, u, i):
        return ((self.user, u), (self.item, i))


class MLPTower(nn.Module):
    """Embeddings + MLP tower; ``pair`` -> ``[N, h_last]``, ``all`` -> ``[B, n_items, h_last]``."""

    def __init__(self, n_users, n_items, embed_dim, hidden, dropout=0.0, init_std=0.01):
        super().__init__()
        self.user = _embedding(n_users, embed_dim, init_std)
        self.item = _embedding(n_items, embed_dim, init_std)
        self.mlp = MLP(2 * embed_dim, hidden, out_dim=None, dropout=dropout)
        self.embed_dim = embed_dim

    def pair(self, u, i):
        return self.mlp(torch.cat([self.user(u), self.item(i)], dim=-1))

    def all(self, u):
        first, rest = self.mlp.net[0], self.mlp.net[1:]
        d = self.embed_dim
        w_u, w_i = first.weight[:, :d], first.weight[:, d:]
        hu = self.user(u) @ w_u.T + first.bias  # [B, h0]
        hi = self.item.weight @ w_i.T  # [n_items, h0]
        return rest(hu.unsqueeze(1) + hi.unsqueeze(0))  # [B, n_items, h_last]


class MLPModule(NCFScorer):
    def __init__(self, n_users, n_items, embed_dim, hidden, dropout=0.0, init_std=0.01):
        super().__init__(n_users, n_items)
        self.tower = MLPTower(n_users, n_items, embed_dim, hidden, dropout, init_std)
        self.predict = nn.Linear(hidden[-1], 1)

    def features(self, u, i):
        return self.tower.pair(u, i)

    def pair_logits(self, u, i):
        return self.predict(self.features(u, i)).squeeze(-1)

    def all_scores(self, u):
        return self.predict(self.tower.all(u)).squeeze(-1)

    def embedding_tables(self, u, i):
        return ((self.tower.user, u), (self.tower.item, i))


class NeuMFModule(NCFScorer):
    def __init__(
        self, n_users, n_items, gmf_dim, mlp_embed_dim, mlp_hidden, dropout=0.0, gmf_std=0.05, mlp_std=0.1
    ):
        super().__init__(n_users, n_items)
        self.gmf_user = _embedding(n_users, gmf_dim, gmf_std)
        self.gmf_item = _embedding(n_items, gmf_dim, gmf_std)
        self.tower = MLPTower(n_users, n_items, mlp_embed_dim, mlp_hidden, dropout, mlp_std)
        self.predict = nn.Linear(gmf_dim + mlp_hidden[-1], 1)
        self.gmf_dim = gmf_dim

    def pair_logits(self, u, i):
        x = torch.cat([self.gmf_user(u) * self.gmf_item(i), self.tower.pair(u, i)], dim=-1)
        return self.predict(x).squeeze(-1)

    def all_scores(self, u):
        w = self.predict.weight[0]
        w_g, w_m = w[: self.gmf_dim], w[self.gmf_dim :]
        gmf = (self.gmf_user(u) * w_g) @ self.gmf_item.weight.T  # [B, n_items]
        mlp = self.tower.all(u) @ w_m  # [B, n_items]
        return gmf + mlp + self.predict.bias

    def embedding_tables(self, u, i):
        return ((self.gmf_user, u), (self.gmf_item, i), (self.tower.user, u), (self.tower.item, i))


@torch.no_grad()
def init_from_pretrained(neumf: NeuMFModule, gmf: GMFModule, mlp: MLPModule, alpha: float = 0.5) -> None:
    """The paper's pretraining init: copy both halves, output layer ``[alpha h_gmf, (1-alpha) h_mlp]``
    and bias ``alpha b_gmf + (1-alpha) b_mlp`` (so NeuMF starts as the alpha-blend of the two logits)."""
    neumf.gmf_user.weight.copy_(gmf.user.weight)
    neumf.gmf_item.weight.copy_(gmf.item.weight)
    neumf.tower.load_state_dict(mlp.tower.state_dict())
    neumf.predict.weight.copy_(torch.cat([alpha * gmf.predict.weight, (1 - alpha) * mlp.predict.weight], 1))
    neumf.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)
    neumf.popularity.copy_(gmf.popularity)


# --- loss and training --------------------------------------------------------------------
def loss_fn(module: NCFScorer, batch, config=None) -> torch.Tensor:
    """Pointwise log loss on ``(user, item, label)`` rows (+ ``config.reg`` L2 on the touched
    embedding rows); the same signature as every family's ``loss_fn``."""
    reg = float(getattr(config, "reg", 0.0) or 0.0)
    u, i, y = batch
    loss = nn.functional.binary_cross_entropy_with_logits(module.pair_logits(u, i), y)
    if reg > 0:
        loss = loss + reg * module.touched_sq(u, i).mean()
    return loss


def training_batch(snapshot: Snapshot, config, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """The first ``rows`` train pairs plus their negatives as ``loss_fn``'s batch (tests)."""
    users, items = train_pairs(snapshot)
    sampler = NegativeSampler(users, items, snapshot.n_items, config.seed)
    return tuple(torch.from_numpy(a) for a in sampler.expand(users[:rows], items[:rows], config.negatives))


@torch.no_grad()
def score_users(module: nn.Module, users: np.ndarray, batch: int = 256) -> np.ndarray:
    module.eval()
    out = [module(torch.from_numpy(users[lo : lo + batch])).numpy() for lo in range(0, len(users), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class _Validation:
    """NDCG@10 on a fixed sample of valid users (full ranking, train items excluded)."""

    def __init__(self, snapshot: Snapshot, n_users_eval: int, seed: int):
        valid = snapshot.ratings("valid")
        keep = (valid.user_idx > 0) & (valid.item_idx > 0)
        self.relevant = sp.csr_matrix(
            (np.ones(int(keep.sum())), (valid.user_idx[keep], valid.item_idx[keep])),
            shape=(snapshot.n_users, snapshot.n_items),
        )
        candidates = np.flatnonzero(np.diff(self.relevant.indptr) > 0)
        rng = np.random.default_rng(seed)
        self.users = np.sort(rng.choice(candidates, size=min(n_users_eval, len(candidates)), replace=False))
        self.train = snapshot.train_matrix("ones").tocsr()

    def __call__(self, module: nn.Module) -> float:
        if not len(self.users):  # no valid split: every epoch ties, the cap stops training
            return 0.0
        return ranking_metrics(score_users(module, self.users), self.train, self.users, self.relevant)[
            "ndcg@10"
        ]


def _popularity(snapshot: Snapshot) -> torch.Tensor:
    pop = snapshot.item_popularity().astype(np.float64)
    pop[0] = 0.0
    return torch.from_numpy((pop / max(pop.max(), 1.0)).astype(np.float32))


def _train(
    module: NCFScorer,
    snapshot: Snapshot,
    config,
    family: str,
    log: Log,
    *,
    optimizer: str = "adam",
    lr: float | None = None,
    momentum: float = 0.0,
    epochs: int | None = None,
    validation: _Validation | None = None,
) -> list[dict]:
    users, items = train_pairs(snapshot)
    if len(users) == 0:
        raise ValueError(f"{snapshot.path}: empty train split; {family} needs train interactions")
    # Its own seed stream: the negatives do not depend on train_torch's shuffling.
    sampler = NegativeSampler(users, items, snapshot.n_items, seed=config.seed + 1)
    validation = validation or _Validation(snapshot, config.eval_users, config.seed)
    module.popularity.copy_(_popularity(snapshot))

    def step_loss(m, batch):
        u, i = (t.numpy() for t in batch)
        expanded = tuple(torch.from_numpy(a) for a in sampler.expand(u, i, config.negatives))
        return loss_fn(m, expanded, config)

    return train_torch(
        module,
        step_loss,
        (users, items),
        validation,
        family=family,
        metric_name="ndcg@10",
        higher_is_better=True,
        epochs=epochs or config.epochs,
        batch_size=config.batch_size,
        optimizer=optimizer,
        lr=config.lr if lr is None else lr,
        momentum=momentum,
        patience=config.patience,
        seed=config.seed,
        log=log,
    )


# --- fitted models --------------------------------------------------------------------------
def _topk_spec(meta: dict, notes: str) -> ExportSpec:
    return user_topk_spec(meta, notes + "; scores are logits (apply sigmoid for a probability)")


class GMF(TrainedModel):
    family = "gmf"
    task = Task.TOPK
    config_cls = GMFConfig

    @classmethod
    def build_module(cls, config: GMFConfig, meta: dict) -> nn.Module:
        return GMFModule(meta["n_users"], meta["n_items"], config.dim)

    def export_spec(self) -> ExportSpec:
        return _topk_spec(self.meta, "scores = h . (P[user] * Q_j) + b for every item j")

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``P * h`` ``[n_users, dim]`` and Q ``[n_items, dim]`` (row 0 = unknown, zero): the score is
        ``(P_u * h) . Q_j + b``, so these are the vectors the model ranks items by."""
        m = self.module
        with torch.no_grad():
            return (m.user.weight * m.predict.weight).numpy().copy(), m.item.weight.numpy().copy()


class NCFMLP(TrainedModel):
    family = "ncf_mlp"
    task = Task.TOPK
    config_cls = MLPConfig

    @classmethod
    def build_module(cls, config: MLPConfig, meta: dict) -> nn.Module:
        return MLPModule(meta["n_users"], meta["n_items"], config.embed_dim, config.hidden, config.dropout)

    def export_spec(self) -> ExportSpec:
        return _topk_spec(self.meta, "scores = h . MLP([P[user], Q_j]) + b for every item j")


class NeuMF(TrainedModel):
    family = "neumf"
    task = Task.TOPK
    config_cls = NeuMFConfig

    @classmethod
    def build_module(cls, config: NeuMFConfig, meta: dict) -> nn.Module:
        return NeuMFModule(
            meta["n_users"],
            meta["n_items"],
            config.gmf_dim,
            config.mlp_embed_dim,
            config.mlp_hidden,
            config.dropout,
        )

    def export_spec(self) -> ExportSpec:
        return _topk_spec(
            self.meta, "scores = h . [P_g[user] * Q_g,j, MLP([P_m[user], Q_m,j])] + b for every item j"
        )


def _meta(snapshot: Snapshot) -> dict:
    return {"n_users": snapshot.n_users, "n_items": snapshot.n_items}


def fit_gmf(snapshot: Snapshot, config: GMFConfig, log: Log = print) -> GMF:
    with deterministic(config.seed):
        module = GMFModule(snapshot.n_users, snapshot.n_items, config.dim, config.init_std)
        history = _train(module, snapshot, config, "gmf", log)
    return GMF(config, module, _meta(snapshot), history)


def fit_mlp(snapshot: Snapshot, config: MLPConfig, log: Log = print) -> NCFMLP:
    with deterministic(config.seed):
        module = MLPModule(
            snapshot.n_users,
            snapshot.n_items,
            config.embed_dim,
            config.hidden,
            config.dropout,
            config.init_std,
        )
        history = _train(module, snapshot, config, "ncf_mlp", log)
    return NCFMLP(config, module, _meta(snapshot), history)


def fit_neumf(snapshot: Snapshot, config: NeuMFConfig, log: Log = print) -> NeuMF:
    meta = _meta(snapshot)
    validation = _Validation(snapshot, config.eval_users, config.seed)
    common = dict(
        negatives=config.negatives,
        batch_size=config.batch_size,
        lr=config.lr,
        reg=config.reg,
        epochs=config.pretrain_epochs,
        patience=config.patience,
        eval_users=config.eval_users,
        seed=config.seed,
    )
    with deterministic(config.seed):
        module = NeuMFModule(
            snapshot.n_users,
            snapshot.n_items,
            config.gmf_dim,
            config.mlp_embed_dim,
            config.mlp_hidden,
            config.dropout,
            config.gmf_init_std,
            config.mlp_init_std,
        )
        if not config.pretrain:
            history = _train(module, snapshot, config, "neumf", log, validation=validation)
            return NeuMF(config, module, meta, history)
    t0 = time.perf_counter()
    gmf = fit_gmf(snapshot, GMFConfig(dim=config.gmf_dim, init_std=config.gmf_init_std, **common), log)
    mlp = fit_mlp(
        snapshot,
        MLPConfig(
            embed_dim=config.mlp_embed_dim,
            hidden=config.mlp_hidden,
            dropout=config.dropout,
            init_std=config.mlp_init_std,
            **common,
        ),
        log,
    )
    pretrain_s = time.perf_counter() - t0
    with deterministic(config.seed):
        init_from_pretrained(module, gmf.module, mlp.module, config.alpha)
        start = validation(module.eval())
        start_state = {k: v.clone() for k, v in module.state_dict().items()}
        log(f"[neumf] pretrained init ({pretrain_s:.1f}s): valid_ndcg@10 {start:.4f}")
        history = _train(
            module,
            snapshot,
            config,
            "neumf",
            log,
            optimizer=config.finetune_optimizer,
            lr=config.finetune_lr,
            momentum=config.finetune_momentum if config.finetune_optimizer == "sgd" else 0.0,
            validation=validation,
        )
        best = max(r["valid_metric"] for r in history)
        # Epoch 0 = the pretrained blend, so the history shows what fine-tuning started from.
        history.insert(0, history_row(0, None, start, "ndcg@10", 0, pretrain_s))
        if start >= best:  # fine-tuning never beat the blend: keep the blend
            module.load_state_dict(start_state)
            log(f"[neumf] fine-tuning did not beat the pretrained init; keeping it ({start:.4f})")
    meta["pretrain"] = {
        "gmf_valid_ndcg@10": max(r["valid_metric"] for r in gmf.history),
        "ncf_mlp_valid_ndcg@10": max(r["valid_metric"] for r in mlp.history),
        "init_valid_ndcg@10": start,
        "seconds": pretrain_s,
    }
    return NeuMF(config, module.eval(), meta, history)


# Registry helpers: name -> (Config class, fit, model class).
FAMILIES_IN_FILE = {
    "gmf": (GMFConfig, fit_gmf, GMF),
    "ncf_mlp": (MLPConfig, fit_mlp, NCFMLP),
    "neumf": (NeuMFConfig, fit_neumf, NeuMF),
}
