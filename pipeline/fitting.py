"""One family's fit inside a runtime. The step's own process (``pipeline.steps.train``) and every
rank of a ``torchrun`` group (``pipeline.torchrun``) call the same function, so a model trained
either way carries the same ``meta["training"]``. Light on purpose: a torchrun worker imports
this, not the export and evaluation code ``pipeline.steps`` brings."""

from __future__ import annotations

from collections.abc import Callable

from models.base import TrainedModel
from models.catalogue import Family
from models.data import Snapshot
from models.runtime import Runtime, use_runtime


def gradient_trained(family: Family) -> bool:
    """Trained by gradient steps (the family has a ``loss`` hook): the families that
    DistributedDataParallel can spread over processes. The others (kNN, WALS) fit in one."""
    return family.model is not None and family.model.loss is not None


def training_summary(runtime: Runtime, loops: list[dict]) -> dict:
    """The model's ``meta["training"]``: the runtime, whether a time budget cut training short,
    and the epochs each training loop validated (neumf runs three)."""
    return {**runtime.describe(), "budget_hit": any(loop["budget_hit"] for loop in loops),
            "epochs": sum(loop["epochs"] for loop in loops), "loops": loops}  # fmt: skip


def fit_family(family: Family, snapshot: str, config, log: Callable[[str], None], runtime: Runtime,
               *upstream) -> TrainedModel:  # fmt: skip
    """``family.fit`` inside ``runtime``; the training summary goes into the model's meta."""
    with use_runtime(runtime) as loops:
        model = family.fit(Snapshot(snapshot), config, log, *upstream)
    model.meta["training"] = training_summary(runtime, loops)
    return model
