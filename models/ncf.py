"""Neural Collaborative Filtering (He et al. 2017, "Neural Collaborative Filtering"), task ``topk``:
what the three NCF families share. Each family has its own file:

- ``gmf`` (``models/gmf.py``): generalised MF, ``logit = h . (p_u * q_i) + b`` (element-wise
  product of the user/item embeddings, then a learned linear layer; MF is the case h = 1).
- ``ncf_mlp`` (``models/ncf_mlp.py``): ``logit = h . MLP([p_u, q_i]) + b`` over the
  concatenated embeddings.
- ``neumf`` (``models/neumf.py``): GMF and MLP with *separate* embeddings, their last layers
  concatenated, then one linear prediction layer, optionally initialised from pretrained GMF
  and MLP halves (the paper's recipe).

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

from collections.abc import Callable
from dataclasses import MISSING

import numpy as np
import torch
from torch import nn

from models.base import ExportSpec, Task, TrainedModel, user_topk_spec
from models.data import Snapshot
from models.distributed import rank_seed
from models.layers import MLP, UserTopKScorer
from models.topk import NegativeSampler, SampledTraining, ValidNDCG, popularity
from models.train import train_torch

Log = Callable[[str], None]


def check_dropout(config) -> None:
    """Range check of the ``dropout`` field of the MLP-bearing NCF configs."""
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")


def train_pairs(snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """Distinct train (user, item) pairs with both indices > 0, sorted by user then item."""
    m = snapshot.train_matrix("ones")
    m.sum_duplicates()
    coo = m.tocoo()
    keep = (coo.row > 0) & (coo.col > 0)
    users, items = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64)
    order = np.lexsort((items, users))
    return users[order], items[order]


# --- parts ----------------------------------------------------------------------------------
def embedding(n: int, dim: int, std: float) -> nn.Embedding:
    """``nn.Embedding(n, dim)`` drawn from N(0, std), row 0 (padding / unknown) zero."""
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


class MLPTower(nn.Module):
    """User and item embeddings and the MLP over their concatenation (ncf_mlp, neumf).

    Args:
        n_users, n_items: embedding rows (index 0 = unknown / padding).
        embed_dim: width of each side's embedding (the MLP reads ``2 * embed_dim``).
        hidden: the tower's layer widths; its output is ``hidden[-1]`` wide.
        dropout: dropout after each hidden layer.
        init_std: std of the embeddings' normal init.

    ``pair(u, i)`` -> ``[N, hidden[-1]]``; ``all(u)`` -> ``[B, n_items, hidden[-1]]``.
    """

    def __init__(self, n_users, n_items, embed_dim, hidden, dropout=0.0, init_std=0.01):
        super().__init__()
        self.user = embedding(n_users, embed_dim, init_std)
        self.item = embedding(n_items, embed_dim, init_std)
        self.mlp = MLP(2 * embed_dim, hidden, out_dim=None, dropout=dropout)
        self.embed_dim = embed_dim

    def pair(self, u, i):
        return self.mlp(torch.cat([self.user(u), self.item(i)], dim=-1))

    def all_row_bytes(self) -> int:
        """What ``all`` holds per user at its peak: every item's two widest consecutive
        activations in float32 (``models.topk.score_users`` sizes its batches from it)."""
        widths = [m.out_features for m in self.mlp.net if isinstance(m, nn.Linear)]
        peak = max((a + b for a, b in zip(widths, widths[1:], strict=False)), default=widths[0])
        return 4 * peak * self.item.num_embeddings

    def all(self, u):
        first, rest = self.mlp.net[0], self.mlp.net[1:]
        d = self.embed_dim
        w_u, w_i = first.weight[:, :d], first.weight[:, d:]
        hu = self.user(u) @ w_u.T + first.bias  # [B, h0]
        hi = self.item.weight @ w_i.T  # [n_items, h0]
        return rest(hu.unsqueeze(1) + hi.unsqueeze(0))  # [B, n_items, h_last]


# --- loss and training ----------------------------------------------------------------------
def pointwise_loss(module: NCFScorer, batch, config: SampledTraining) -> torch.Tensor:
    """Pointwise log loss on ``(user, item, label)`` rows (+ ``config.reg`` L2 on the touched
    embedding rows)."""
    reg = float(getattr(config, "reg", 0.0) or 0.0)
    u, i, y = batch
    loss = nn.functional.binary_cross_entropy_with_logits(module.pair_logits(u, i), y)
    if reg > 0:
        loss = loss + reg * module.touched_sq(u, i).mean()
    return loss


def pair_batch(snapshot: Snapshot, config: SampledTraining, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """The first ``rows`` train pairs plus their negatives, in ``pointwise_loss``'s layout."""
    users, items = train_pairs(snapshot)
    sampler = NegativeSampler(users, items, snapshot.n_items, config.seed)
    return tuple(torch.from_numpy(a) for a in sampler.expand(users[:rows], items[:rows], config.negatives))


def train_ncf(
    module: NCFScorer,
    snapshot: Snapshot,
    config: SampledTraining,
    family: str,
    log: Log,
    *,
    optimizer: str = "adam",
    lr: float | None = None,
    momentum: float = 0.0,
    epochs: int | None = None,
    validation: ValidNDCG | None = None,
    max_minutes: float | None | object = MISSING,
) -> list[dict]:
    """Train ``module`` in place with ``pointwise_loss`` on fresh negatives every step, early
    stopping on ``validation`` (valid NDCG@10); returns the history rows.

    Args:
        module: the scorer; its ``popularity`` buffer is set from the snapshot.
        snapshot, config: the data and the family's config (``SampledTraining`` fields).
        family: the name in log lines and errors.
        log: where progress lines go.
        optimizer, lr, momentum, epochs: override the config's Adam / ``lr`` / ``epochs``
            (neumf's fine-tuning).
        validation: a shared ``ValidNDCG`` (neumf scores its pretrained init with it).
        max_minutes: the time budget, if not the config's (neumf: what pretraining left).
    """
    users, items = train_pairs(snapshot)
    if len(users) == 0:
        raise ValueError(f"{snapshot.path}: empty train split; {family} needs train interactions")
    # Its own seed stream: the negatives do not depend on train_torch's shuffling (and, under
    # torchrun, differ by rank: each rank draws the negatives of its part of the batch).
    sampler = NegativeSampler(users, items, snapshot.n_items, seed=rank_seed(config.seed + 1))
    validation = validation or ValidNDCG(snapshot, config.eval_users, config.seed)
    module.popularity.copy_(popularity(snapshot))

    def expand(batch):  # on the CPU, before the batch moves to the training device
        u, i = (t.numpy() for t in batch)
        return tuple(torch.from_numpy(a) for a in sampler.expand(u, i, config.negatives))

    return train_torch(
        module,
        lambda m, b: pointwise_loss(m, b, config),
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
        prepare=expand,
        max_minutes=config.max_minutes if max_minutes is MISSING else max_minutes,
    )


# --- fitted models --------------------------------------------------------------------------
class NCFModel(TrainedModel):
    """Base of the fitted NCF families: the top-K task, the loss hooks and the export spec."""

    task = Task.TOPK
    loss = staticmethod(pointwise_loss)
    training_batch = staticmethod(pair_batch)
    # The formula of the scores, for the export notes.
    SCORES: str = ""

    def export_spec(self) -> ExportSpec:
        notes = f"{self.SCORES}; scores are logits (apply sigmoid for a probability)"
        return user_topk_spec(self.meta, notes)


def ncf_meta(snapshot: Snapshot) -> dict:
    return {"n_users": snapshot.n_users, "n_items": snapshot.n_items}
