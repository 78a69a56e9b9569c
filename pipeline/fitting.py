"""One family's fit inside a runtime. The step's own process (``pipeline.steps.train``) and every
rank of a ``torchrun`` group (``pipeline.torchrun``) call the same function, so a model trained
either way carries the same ``meta["training"]``. Light on purpose: a torchrun worker imports
this, not the export and evaluation code ``pipeline.steps`` brings."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from models.base import CONFIG_FILE, TrainedModel
from models.catalogue import Family, load_model
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


def upstream_read(family: Family, config) -> tuple[str, ...]:
    """The upstream families ``fit`` reads under ``config`` (the model class's ``reads_upstream``:
    emb_knn the one its ``source`` names, neumf its halves when it pretrains)."""
    reads = family.model.reads_upstream(config) if family.model is not None else family.upstream
    return tuple(name for name in reads if name in family.upstream)


def upstream_input_name(family: str) -> str:
    """The model asset's input (and Dagster ``ins`` key) for an upstream family's checkpoint."""
    return f"model_{family}"


class UpstreamModels(Mapping):
    """The upstream models a family may build on, loaded only when ``fit`` asks for one.

    ``dirs`` maps family name -> saved model dir (the ``model_<family>`` asset values). A
    family declares every candidate (``Family.upstream``) but its config picks which it uses
    (emb_knn: ``source``; neumf: the halves whose config matches); loading lazily keeps the
    others off disk and tells the step which ones went into the model (``used``), so lineage
    names exactly those. ``config_of`` reads a model's config without loading it."""

    def __init__(self, dirs: Mapping[str, str]):
        self.dirs = dict(dirs)
        self._loaded: dict = {}

    def __getitem__(self, family: str):
        if family not in self._loaded:
            self._loaded[family] = load_model(self.dirs[family])
        return self._loaded[family]

    def __iter__(self) -> Iterator[str]:
        return iter(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)

    def config_of(self, family: str) -> dict:
        """The saved model's config fields (its ``config.json``), weights left on disk."""
        return json.loads((Path(self.dirs[family]) / CONFIG_FILE).read_text())["config"]

    def used(self) -> dict[str, str]:
        """``{asset key: "run_id=... model_dir=..."}`` of the models fit loaded; the run id is the
        folder the model asset wrote under (``artifacts/<family>/<run_id>/model``)."""
        where = {upstream_input_name(family): Path(self.dirs[family]) for family in self._loaded}
        return {key: f"run_id={path.parent.name} model_dir={path}" for key, path in where.items()}
