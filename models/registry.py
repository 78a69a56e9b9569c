"""Every model family, one line each. A new family is one file plus one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import deepfm, item_knn, mf_implicit, mf_sgd, ncf, wals
from models.base import Task, TrainedModel


@dataclass(frozen=True)
class Family:
    name: str
    task: Task
    config_cls: type
    fit: Callable[..., TrainedModel]  # fit(snapshot, config, log) -> TrainedModel
    load: Callable[[Path | str], TrainedModel]


def _family(module: Any, model: type[TrainedModel]) -> Family:
    return Family(model.family, model.task, module.Config, module.fit, model.load)


FAMILIES: dict[str, Family] = {
    "item_knn": _family(item_knn, item_knn.ItemKNN),
    "mf_sgd": _family(mf_sgd, mf_sgd.MFSGD),
    "wals": _family(wals, wals.WALS),
    "mf_implicit": _family(mf_implicit, mf_implicit.MFImplicit),
    "gmf": Family("gmf", Task.TOPK, ncf.GMFConfig, ncf.fit_gmf, ncf.GMF.load),
    "ncf_mlp": Family("ncf_mlp", Task.TOPK, ncf.MLPConfig, ncf.fit_mlp, ncf.NCFMLP.load),
    "neumf": Family("neumf", Task.TOPK, ncf.NeuMFConfig, ncf.fit_neumf, ncf.NeuMF.load),
    "deepfm": _family(deepfm, deepfm.DeepFM),
}
