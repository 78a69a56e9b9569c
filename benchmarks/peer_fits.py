"""The peer libraries of ``bench_peers.py``, fitted on a pipeline snapshot's rows and wrapped as
scorers that the project's own evaluator (``evaluation.evaluate.EVALUATORS``) can call.

Each ``fit_*`` takes the snapshot, the project family's parsed ``Config`` (the peer's
hyper-parameters are derived from it: ``bench_peers.py``'s docstring states the mapping) and the
thread count, and returns a :class:`PeerModel`. A peer's ``scorer.run(**feeds)`` takes the inputs
the family's ONNX signature takes (``user_idx, item_idx`` -> ``rating``; ``user_idx`` ->
``scores [B, n_items]``; ``sparse, dense`` -> ``logit``), so the rows, the masks and the metric
code are the family's, only the scorer differs.

The peer libraries come from the ``peers`` extra (``pip install -e '.[peers]'``); each is
imported inside its ``fit_*`` so the project side runs without them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from models.data import Snapshot, ctr_arrays

# The peer library (import name) each pair needs, for "is it installed?" checks.
LIBRARIES = {"surprise": "scikit-surprise", "implicit": "implicit", "deepctr_torch": "deepctr-torch"}


@dataclass
class ArrayScorer:
    """``run(**feeds) -> {output: array}`` over a plain function, the ``OrtScorer`` interface."""

    inputs: tuple[str, ...]
    output: str
    fn: Callable[..., np.ndarray]
    # What the evaluator sizes its calls by (OrtScorer reads it from the graph): bytes one row
    # of a call holds, output and temporaries, and the most rows per call.
    row_bytes: int = 64
    batch_size: int = 4096

    def bytes_per_row(self, *per_axes: str) -> int:
        return self.row_bytes

    def run(self, **feeds) -> dict[str, np.ndarray]:
        return {self.output: np.asarray(self.fn(*(feeds[n] for n in self.inputs)), dtype=np.float32)}

    def signature(self) -> dict:
        """The part of ``signature.json`` the evaluator reads: input and output names."""
        return {"inputs": [{"name": n, "shape": ["batch"]} for n in self.inputs],
                "outputs": [{"name": self.output}]}  # fmt: skip


@dataclass
class PeerModel:
    name: str  # e.g. "Surprise SVD"
    scorer: ArrayScorer
    params: dict  # the peer's hyper-parameters as passed
    info: dict = field(default_factory=dict)  # epochs run, etc.


# --- rating: Surprise ---------------------------------------------------------------------
def _surprise_trainset(snap: Snapshot):
    import pandas as pd
    from surprise import Dataset, Reader

    r = snap.ratings("train")
    lo, hi = (float(x) for x in snap.meta.get("rating_range", (r.rating.min(), r.rating.max())))
    frame = pd.DataFrame({"u": r.user_idx, "i": r.item_idx, "r": r.rating.astype(np.float64)})
    return Dataset.load_from_df(frame, Reader(rating_scale=(lo, hi))).build_full_trainset()


def _surprise_scorer(algo) -> ArrayScorer:
    """Surprise's own ``predict`` per row (clipped to the rating scale; an id it never saw
    gets its default prediction, the train mean). Snapshot index 0 is never a train id."""

    def predict(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.array([algo.predict(u, i).est for u, i in zip(users.tolist(), items.tolist())])

    return ArrayScorer(("user_idx", "item_idx"), "rating", predict)


def fit_surprise_svd(snap: Snapshot, config, threads: int, epochs: int = 20, lr: float = 0.005) -> PeerModel:
    """Surprise ``SVD`` (biased MF by per-rating SGD) with mf_sgd's factors, reg and init."""
    from surprise import SVD

    params = dict(n_factors=config.dim, n_epochs=epochs, biased=True, init_std_dev=config.init_std,
                  lr_all=lr, reg_all=config.reg, random_state=config.seed)  # fmt: skip
    algo = SVD(**params)
    algo.fit(_surprise_trainset(snap))
    return PeerModel("Surprise SVD", _surprise_scorer(algo), params)


def fit_surprise_knn(snap: Snapshot, config, threads: int, user_based: bool, sim: str = "pearson_baseline"):
    """Surprise ``KNNWithMeans`` with the family's k and shrinkage (``pearson_baseline`` is the
    only Surprise similarity with shrinkage; ``pearson`` and ``cosine`` take none)."""
    from surprise import KNNWithMeans

    sim_options = {"name": sim, "user_based": user_based}
    if sim == "pearson_baseline":
        sim_options["shrinkage"] = config.shrink
    params = dict(k=config.k, min_k=1, sim_options=sim_options)
    algo = KNNWithMeans(**params, verbose=False)
    algo.fit(_surprise_trainset(snap))
    side = "user" if user_based else "item"
    return PeerModel(f"Surprise KNNWithMeans ({side})", _surprise_scorer(algo), params)


# --- top-K: implicit ----------------------------------------------------------------------
def _blas_one_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, "blas")


def fit_implicit_als(snap: Snapshot, config, threads: int) -> PeerModel:
    """implicit's CPU ALS on WALS' objective divided by omega0 (exact mapping: confidences
    ``w / omega0`` with WALS' own ``w = 1 + alpha log(1 + c / eps)``, regularisation
    ``lam / omega0``, implicit's alpha 1), WALS' factors, sweeps and CG steps."""
    from implicit.cpu.als import AlternatingLeastSquares

    from models.wals import confidence_weights

    counts = snap.train_matrix("rating")
    conf = confidence_weights(counts, config.alpha, config.eps).astype(np.float32)
    conf.data /= config.omega0
    params = dict(factors=config.dim, regularization=config.lam / config.omega0, alpha=1.0,
                  iterations=config.iterations, cg_steps=config.cg_steps, num_threads=threads,
                  random_state=config.seed)  # fmt: skip
    with _blas_one_thread():
        model = AlternatingLeastSquares(
            **{k: v for k, v in params.items() if k != "cg_steps"}, calculate_training_loss=False
        )
        model.cg_steps = config.cg_steps
        model.fit(sp.csr_matrix(conf), show_progress=False)
    u, v = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return PeerModel(
        "implicit ALS",
        ArrayScorer(("user_idx",), "scores", lambda users: u[users] @ v.T, 16 * v.shape[0]),
        params,
    )


def fit_implicit_cosine(snap: Snapshot, config, threads: int) -> PeerModel:
    """implicit's item-item ``CosineRecommender`` (K most similar items per item) on the binary
    train matrix. Its scores are ``user_items @ similarity``, what its ``recommend`` ranks."""
    from implicit.nearest_neighbours import CosineRecommender
    from implicit.utils import ParameterWarning

    ones = snap.train_matrix("ones")
    params = dict(K=config.k, num_threads=threads)
    with _blas_one_thread(), warnings.catch_warnings():
        # its fit hands a COO matrix to its own CSR check and warns about the conversion
        warnings.simplefilter("ignore", category=ParameterWarning)
        model = CosineRecommender(**params)
        model.fit(sp.csr_matrix(ones), show_progress=False)
    sim = model.similarity.tocsr()
    if sim.shape != (ones.shape[1], ones.shape[1]):
        raise RuntimeError(f"implicit's similarity is {sim.shape}, expected items x items {ones.shape[1]}")

    def scores(users: np.ndarray) -> np.ndarray:
        return (ones[users] @ sim).toarray()

    return PeerModel(
        "implicit CosineRecommender (item-item)",
        ArrayScorer(("user_idx",), "scores", scores, 16 * sim.shape[0]),
        params,
    )


# --- CTR: DeepCTR-Torch -------------------------------------------------------------------
def read_ctr(snap: Snapshot, split: str):
    """``CtrArrays`` of one split without the history lists (the plain CTR inputs only)."""
    columns = [*snap.ctr_columns(1), "split"]
    t = pq.read_table(snap.path / "fct_ctr_samples.parquet", columns=columns, filters=[("split", "=", split)])
    return ctr_arrays(t, snap.meta, 1)


def fit_deepctr_deepfm(snap: Snapshot, config, threads: int) -> PeerModel:
    """DeepCTR-Torch ``DeepFM`` on the same sparse and dense fields, with deepfm's embedding
    size, tower, dropout, embedding L2, Adam lr, batch size, epochs and early stopping on valid
    AUC (patience); the best validated epoch's weights are kept, as deepfm keeps its best."""
    from deepctr_torch.callbacks import EarlyStopping
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM

    sparse_fields, dense_fields = list(snap.meta["sparse_fields"]), list(snap.meta["dense_fields"])
    card = snap.meta["sparse_cardinality"]
    columns = [
        SparseFeat(f, vocabulary_size=int(card[f]), embedding_dim=config.embed_dim) for f in sparse_fields
    ]
    columns += [DenseFeat(f, 1) for f in dense_fields]

    def features(c) -> dict[str, np.ndarray]:
        x = {f: c.sparse[:, j] for j, f in enumerate(sparse_fields)}
        return x | {f: c.dense[:, j] for j, f in enumerate(dense_fields)}

    label = f"label_{config.label}"
    train, valid = read_ctr(snap, "train"), read_ctr(snap, "valid")
    params = dict(dnn_hidden_units=tuple(config.hidden), l2_reg_embedding=config.embedding_reg,
                  dnn_dropout=config.dropout, seed=config.seed, lr=config.lr, batch_size=config.batch_size,
                  epochs=config.epochs, patience=config.patience)  # fmt: skip

    class KeepBest(EarlyStopping):
        """EarlyStopping restores the best weights only when it stops early; also at the end."""

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
            super().on_train_end(logs)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = DeepFM(columns, columns, dnn_hidden_units=params["dnn_hidden_units"],
                       l2_reg_embedding=config.embedding_reg, dnn_dropout=config.dropout, seed=config.seed,
                       task="binary", device="cpu")  # fmt: skip
        model.compile(
            torch.optim.Adam(model.parameters(), lr=config.lr), "binary_crossentropy", metrics=["auc"]
        )
        stop = KeepBest(monitor="val_auc", patience=config.patience, mode="max", restore_best_weights=True)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the device and a summary line
            history = model.fit(features(train), getattr(train, label), batch_size=config.batch_size,
                                epochs=config.epochs, verbose=0, callbacks=[stop],
                                validation_data=(features(valid), getattr(valid, label)))  # fmt: skip
    finally:
        torch.set_num_threads(old)
    val_auc = history.history.get("val_auc", [])

    def logits(sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        # DeepCTR's last layer is a sigmoid; switched to "regression" it returns the logit, so
        # the evaluator's logloss sees logits as it does for deepfm (AUC is the same either way).
        x = {f: sparse[:, j] for j, f in enumerate(sparse_fields)}
        x |= {f: dense[:, j] for j, f in enumerate(dense_fields)}
        model.out.task = "regression"
        try:
            return model.predict(x, batch_size=8192).reshape(-1)
        finally:
            model.out.task = "binary"

    info = {"epochs": len(val_auc), "best_valid_auc": max(val_auc) if val_auc else None}
    return PeerModel("DeepCTR-Torch DeepFM", ArrayScorer(("sparse", "dense"), "logit", logits), params, info)
