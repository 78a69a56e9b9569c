"""Every model family, one line each. A new family is one file plus one line here.

A family ``x`` is the module ``models/x.py`` holding ``Config`` (a dataclass), ``fit(snapshot,
config, log[, upstream])`` and one ``TrainedModel`` subclass whose ``family`` is ``"x"``;
``family_of`` reads the rest (task, loader, upstream families, loss hooks) from that class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType

from models.base import CONFIG_FILE, Task, TrainedModel


@dataclass(frozen=True)
class Family:
    """What the other layers need of a family.

    Args:
        name: the family's name (its module's name).
        task: what its scorer computes.
        config_cls: its ``Config`` dataclass.
        fit: ``fit(snapshot, config, log[, upstream]) -> TrainedModel``, defined in the family's
            own file (the export's code version hashes that file).
        load: ``load(directory) -> TrainedModel``.
        upstream: families whose fitted models this one builds on (e.g. embeddings for
            emb_knn). When non-empty, fit takes a 4th argument ``upstream: Mapping[name,
            TrainedModel]`` holding (some of) them, fitted on the same snapshot; the
            orchestration makes each a dependency.
        model: the ``TrainedModel`` subclass; its ``loss`` / ``training_batch`` hooks are
            ``None`` for memory-based families.
    """

    name: str
    task: Task
    config_cls: type
    fit: Callable[..., TrainedModel]
    load: Callable[[Path | str], TrainedModel]
    upstream: tuple[str, ...] = ()
    model: type[TrainedModel] | None = None


def family_of(module: ModuleType) -> Family:
    """The ``Family`` of ``models/<name>.py``, from its ``Config``, ``fit`` and model class."""
    name = module.__name__.rpartition(".")[2]
    models = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, TrainedModel)
        and obj.__module__ == module.__name__
        and getattr(obj, "family", None) == name
    ]
    if len(models) != 1:
        raise TypeError(f"{module.__name__} must define one TrainedModel subclass with family = {name!r}")
    model = models[0]
    if model.config_cls is not getattr(module, "Config", None) or not callable(getattr(module, "fit", None)):
        raise TypeError(f"{module.__name__} must define Config (= {model.__name__}.config_cls) and fit")
    return Family(name, model.task, model.config_cls, module.fit, model.load, tuple(model.upstream), model)


# One line per family: the name of its module in models/, in leaderboard order.
FAMILY_MODULES = (
    "item_knn",
    "mf_sgd",
    "wals",
    "mf_implicit",
    "gmf",
    "ncf_mlp",
    "neumf",
    "cdae",
    "deepfm",
    "wide_deep",
    "dlrm",
    "dcn_stacked",
    "dcn_parallel",
    "din",
    "bst",
    "mmoe",
    "user_knn",
    "user_knn_topk",
    "emb_knn",
)
FAMILIES: dict[str, Family] = {
    family.name: family for family in (family_of(import_module(f"models.{m}")) for m in FAMILY_MODULES)
}


def select_families(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """The families to build, in catalogue order: ``names`` plus the upstream families they build on.

    ``None`` or empty selects every family. An unknown name raises ``ValueError`` with the
    closest family name and the full list.
    """
    if not names:
        return list(FAMILIES)
    import difflib

    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        hints = "".join(
            f" ({n!r}: did you mean {close[0]!r}?)"
            for n in unknown
            if (close := difflib.get_close_matches(n, FAMILIES, n=1))
        )
        raise ValueError(f"unknown families {unknown}{hints}; known: {', '.join(FAMILIES)}")
    chosen = set(names)
    stack = list(names)
    while stack:
        for up in FAMILIES[stack.pop()].upstream:
            if up not in chosen:
                chosen.add(up)
                stack.append(up)
    return [n for n in FAMILIES if n in chosen]


def load_model(directory: Path | str) -> TrainedModel:
    """Load any saved model: the family named in its config.json picks the loader."""
    family = json.loads((Path(directory) / CONFIG_FILE).read_text())["family"]
    if family not in FAMILIES:
        raise ValueError(f"{directory} holds unknown family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].load(directory)
