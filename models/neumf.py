"""NeuMF (He et al. 2017, "Neural Collaborative Filtering"), task ``topk``: GMF and MLP with
*separate* embeddings, their last layers concatenated, then one linear prediction layer.

With ``pretrain`` (the paper's recipe) NeuMF starts from fitted GMF and MLP halves: in the
pipeline these are the ``gmf`` and ``ncf_mlp`` models of the same run (``upstream``), whose
default configs are exactly the halves', so they are not trained twice; a half whose fitted
model has another config (or a ``fit`` called without them) is trained inside ``fit`` by
exactly that family's fit. NeuMF starts from their weights with the output layer
``h = [alpha h_gmf, (1 - alpha) h_mlp]`` (alpha = 0.5) and is fine-tuned with plain SGD at a
low learning rate (Adam's moments are not carried over from pretraining, so the paper
fine-tunes with SGD rather than restarting Adam on already-good weights). Training, scorer
contract and fallbacks otherwise: the NCF family's, ``models/ncf.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from models import gmf, ncf_mlp
from models.base import TrainedModel
from models.config import config_values
from models.data import Snapshot
from models.ncf import Log, MLPTower, NCFModel, NCFScorer, check_dropout, embedding, ncf_meta, train_ncf
from models.runtime import Budget
from models.topk import SampledTraining, ValidNDCG
from models.train import deterministic, history_row

# Of a time budget, the part each half pretrained inside neumf's fit may take (the rest, and
# what a half leaves unused, goes to the next loop): with one budget for the three loops, the
# first would otherwise take it all and leave the MLP half a single batch.
PRETRAIN_SHARE = 0.4


@dataclass(frozen=True)
class Config(SampledTraining):
    # GMF and MLP halves: the same sizes as the gmf / ncf_mlp defaults, so pretraining them
    # is exactly those families' fits.
    gmf_dim: int = 32
    mlp_embed_dim: int = 32
    mlp_hidden: tuple[int, ...] = (64, 32, 16)
    dropout: float = 0.0
    # The paper's recipe: pretrain GMF and MLP (Adam), initialise NeuMF from them with the
    # output layer weighted alpha / (1 - alpha), fine-tune with SGD.
    pretrain: bool = True
    alpha: float = 0.5
    # Epoch cap of each pretraining fit (early stopping usually ends them first); the same as
    # the standalone families, so the halves are as good as gmf / ncf_mlp alone.
    pretrain_epochs: int = 30
    # (lr: the Adam learning rate when training from scratch, pretrain = False.)
    # Fine-tuning after pretraining: plain SGD (the paper's choice), with a learning rate
    # that moves the pretrained weights gently. The loss is a batch mean, so an embedding
    # row seen once in a step gets lr / 1280 of its gradient: lr must be O(1) for SGD to do
    # anything at all, yet well below the point where it undoes the pretraining.
    finetune_optimizer: str = "sgd"
    # (On a MovieLens-like temporal split the blend itself was the best valid point: both halves
    # are already early-stopped, so fit keeps the blend when fine-tuning does not beat it.)
    finetune_lr: float = 0.05
    finetune_momentum: float = 0.9
    # Fine-tuning cap: pretrained weights are already near a good optimum, so few epochs.
    # Without pretraining this is the whole training cap (raise it, e.g. to 30).
    epochs: int = 8
    # Init std of each half, as in the gmf / ncf_mlp defaults (see there).
    gmf_init_std: float = 0.05
    mlp_init_std: float = 0.1
    # Other training fields (negatives, batch_size, lr, reg, patience, eval_users, seed):
    # SampledTraining, whose defaults are the paper's.

    def __post_init__(self):
        super().__post_init__()
        check_dropout(self)
        if self.gmf_dim < 1 or self.mlp_embed_dim < 1 or not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ValueError("gmf_dim, mlp_embed_dim and every mlp_hidden width must be >= 1")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.finetune_optimizer not in ("sgd", "adam"):
            raise ValueError(f"finetune_optimizer must be 'sgd' or 'adam', got {self.finetune_optimizer!r}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be >= 1, got {self.pretrain_epochs}")


class NeuMFModule(NCFScorer):
    """NeuMF's scorer: a GMF half and an ``MLPTower`` half under one prediction layer.

    Args:
        n_users, n_items: embedding rows (index 0 = unknown / padding).
        gmf_dim: the GMF half's embedding width.
        mlp_embed_dim, mlp_hidden, dropout: the MLP half's (``ncf.MLPTower``).
        gmf_std, mlp_std: init std of each half's embeddings.
    """

    def __init__(
        self, n_users, n_items, gmf_dim, mlp_embed_dim, mlp_hidden, dropout=0.0, gmf_std=0.05, mlp_std=0.1
    ):
        super().__init__(n_users, n_items)
        self.gmf_user = embedding(n_users, gmf_dim, gmf_std)
        self.gmf_item = embedding(n_items, gmf_dim, gmf_std)
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

    def score_row_bytes(self) -> int:
        return self.tower.all_row_bytes()

    def embedding_tables(self, u, i):
        return ((self.gmf_user, u), (self.gmf_item, i), (self.tower.user, u), (self.tower.item, i))


@torch.no_grad()
def init_from_pretrained(
    neumf: NeuMFModule, gmf_half: gmf.GMFModule, mlp_half: ncf_mlp.MLPModule, alpha: float = 0.5
) -> None:
    """The paper's pretraining init: copy both halves, output layer ``[alpha h_gmf, (1-alpha) h_mlp]``
    and bias ``alpha b_gmf + (1-alpha) b_mlp`` (so NeuMF starts as the alpha-blend of the two logits)."""
    neumf.gmf_user.weight.copy_(gmf_half.user.weight)
    neumf.gmf_item.weight.copy_(gmf_half.item.weight)
    neumf.tower.load_state_dict(mlp_half.tower.state_dict())
    h_gmf, h_mlp = gmf_half.predict, mlp_half.predict
    neumf.predict.weight.copy_(torch.cat([alpha * h_gmf.weight, (1 - alpha) * h_mlp.weight], 1))
    neumf.predict.bias.copy_(alpha * h_gmf.bias + (1 - alpha) * h_mlp.bias)
    neumf.popularity.copy_(gmf_half.popularity)


class NeuMF(NCFModel):
    family = "neumf"
    config_cls = Config
    upstream = ("gmf", "ncf_mlp")
    upstream_note = (
        "With `pretrain` (the default) it starts from the gmf and ncf_mlp models of the same "
        "snapshot when their configs are its halves' (else it pretrains those halves itself); "
        "`upstream_models` names the ones used."
    )

    SCORES = "scores = h . [P_g[user] * Q_g,j, MLP([P_m[user], Q_m,j])] + b for every item j"

    @classmethod
    def reads_upstream(cls, config: Config) -> tuple[str, ...]:
        return cls.upstream if config.pretrain else ()

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return NeuMFModule(
            meta["n_users"],
            meta["n_items"],
            config.gmf_dim,
            config.mlp_embed_dim,
            config.mlp_hidden,
            config.dropout,
        )


def _comparable(config) -> dict:
    """A config as JSON values, without the time budget (a half fitted without one is as good)."""
    values = config_values(config)
    values.pop("max_minutes", None)
    return values


def _fitted_half(name: str, wanted, upstream: Mapping[str, TrainedModel] | None, log: Log, budgeted: bool):
    """The ``name`` model handed in by the pipeline, when it was fitted with exactly the config
    this half would be pretrained with; else ``None`` (and the log says why). A model cut short
    by its own time budget is used only when neumf runs under a budget too: pretraining it
    again here would get less time than it had."""
    if not upstream or name not in upstream:
        return None
    config_of = getattr(upstream, "config_of", None)  # reads config.json without loading weights
    theirs = _comparable(config_of(name) if config_of else upstream[name].config)
    ours = _comparable(wanted)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        why = f"the fitted {name} model's config differs in {differ}"
        log(f"[neumf] pretraining the {name} half itself: {why}")
        return None
    model = upstream[name]
    if (model.meta.get("training") or {}).get("budget_hit"):
        if not budgeted:  # unbounded, the pretraining runs to its early stop
            log(f"[neumf] pretraining the {name} half itself: the fitted {name} model hit its time budget")
            return None
        log(f"[neumf] the {name} half is the fitted {name} model (same config; both under a time budget)")
        return model
    log(f"[neumf] the {name} half is the fitted {name} model (same config)")
    return model


def fit(
    snapshot: Snapshot, config: Config, log: Log = print, upstream: Mapping[str, TrainedModel] | None = None
) -> NeuMF:
    meta = ncf_meta(snapshot)
    # One budget for the whole fit: a half pretrained here gets PRETRAIN_SHARE of it (so the
    # first loop cannot take it all), the fine-tuning what is left; each at least a moment, so
    # each still validates once.
    budget = Budget(config.max_minutes)
    budgeted = config.max_minutes is not None

    def left(share: float = 1.0) -> float | None:
        return max(budget.remaining_minutes() * share, 1e-6) if budgeted else None

    validation = ValidNDCG(snapshot, config.eval_users, config.seed)
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
            history = train_ncf(module, snapshot, config, "neumf", log, validation=validation)
            return NeuMF(config, module, meta, history)
    t0 = time.perf_counter()
    gmf_config = gmf.Config(dim=config.gmf_dim, init_std=config.gmf_init_std, **common)
    halves = {}
    gmf_half = _fitted_half("gmf", gmf_config, upstream, log, budgeted)
    halves["gmf"] = "fitted model" if gmf_half is not None else "pretrained here"
    if gmf_half is None:
        gmf_half = gmf.fit(snapshot, replace(gmf_config, max_minutes=left(PRETRAIN_SHARE)), log)
    mlp_config = ncf_mlp.Config(
        embed_dim=config.mlp_embed_dim,
        hidden=config.mlp_hidden,
        dropout=config.dropout,
        init_std=config.mlp_init_std,
        **common,
    )
    mlp_half = _fitted_half("ncf_mlp", mlp_config, upstream, log, budgeted)
    halves["ncf_mlp"] = "fitted model" if mlp_half is not None else "pretrained here"
    if mlp_half is None:
        # its share of what is left: PRETRAIN_SHARE of the whole when the gmf half used its own
        share = PRETRAIN_SHARE / (1 - PRETRAIN_SHARE if halves["gmf"] == "pretrained here" else 1)
        mlp_half = ncf_mlp.fit(snapshot, replace(mlp_config, max_minutes=left(share)), log)
    pretrain_s = time.perf_counter() - t0
    with deterministic(config.seed):
        init_from_pretrained(module, gmf_half.module, mlp_half.module, config.alpha)
        start = validation(module.eval())
        start_state = {k: v.clone() for k, v in module.state_dict().items()}
        log(f"[neumf] pretrained init ({pretrain_s:.1f}s): valid_ndcg@10 {start:.4f}")
        history = train_ncf(
            module,
            snapshot,
            config,
            "neumf",
            log,
            optimizer=config.finetune_optimizer,
            lr=config.finetune_lr,
            momentum=config.finetune_momentum if config.finetune_optimizer == "sgd" else 0.0,
            validation=validation,
            max_minutes=left(),
        )
        best = max(r["valid_metric"] for r in history)
        # Epoch 0 = the pretrained blend, so the history shows what fine-tuning started from.
        history.insert(0, history_row(0, None, start, "ndcg@10", 0, pretrain_s))
        if start >= best:  # fine-tuning never beat the blend: keep the blend
            module.load_state_dict(start_state)
            log(f"[neumf] fine-tuning did not beat the pretrained init; keeping it ({start:.4f})")
    meta["pretrain"] = {
        "gmf_valid_ndcg@10": max(r["valid_metric"] for r in gmf_half.history),
        "ncf_mlp_valid_ndcg@10": max(r["valid_metric"] for r in mlp_half.history),
        "init_valid_ndcg@10": start,
        "seconds": pretrain_s,
        "halves": halves,
    }
    return NeuMF(config, module.eval(), meta, history)
