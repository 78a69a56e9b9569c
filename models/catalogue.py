"""Every model family, one line each. A new family is one file plus one line here."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import (
    bst,
    cdae,
    dcn,
    deepfm,
    din,
    dlrm,
    emb_knn,
    item_knn,
    mf_implicit,
    mf_sgd,
    mmoe,
    ncf,
    user_knn,
    wals,
    wide_deep,
)
from models.base import CONFIG_FILE, Task, TrainedModel


@dataclass(frozen=True)
class Family:
    name: str
    task: Task
    config_cls: type
    fit: Callable[..., TrainedModel]  # fit(snapshot, config, log[, upstream]) -> TrainedModel
    load: Callable[[Path | str], TrainedModel]
    # Families whose fitted models this one may build on (e.g. embeddings for emb_knn). When
    # non-empty, fit takes a 4th argument ``upstream: Mapping[name, TrainedModel]`` holding
    # (some of) them, fitted on the same snapshot; the orchestration makes each a dependency.
    upstream: tuple[str, ...] = ()


def _family(module: Any, model: type[TrainedModel], upstream: tuple[str, ...] = ()) -> Family:
    return Family(model.family, model.task, module.Config, module.fit, model.load, upstream)


FAMILIES: dict[str, Family] = {
    "item_knn": _family(item_knn, item_knn.ItemKNN),
    "mf_sgd": _family(mf_sgd, mf_sgd.MFSGD),
    "wals": _family(wals, wals.WALS),
    "mf_implicit": _family(mf_implicit, mf_implicit.MFImplicit),
    "gmf": Family("gmf", Task.TOPK, ncf.GMFConfig, ncf.fit_gmf, ncf.GMF.load),
    "ncf_mlp": Family("ncf_mlp", Task.TOPK, ncf.MLPConfig, ncf.fit_mlp, ncf.NCFMLP.load),
    "neumf": Family("neumf", Task.TOPK, ncf.NeuMFConfig, ncf.fit_neumf, ncf.NeuMF.load),
    "cdae": _family(cdae, cdae.CDAE),
    "deepfm": _family(deepfm, deepfm.DeepFM),
    "wide_deep": _family(wide_deep, wide_deep.WideDeep),
    "dlrm": _family(dlrm, dlrm.DLRM),
    "dcn_stacked": Family("dcn_stacked", Task.CTR, dcn.StackedConfig, dcn.fit_stacked, dcn.DCNStacked.load),
    "dcn_parallel": Family(
        "dcn_parallel", Task.CTR, dcn.ParallelConfig, dcn.fit_parallel, dcn.DCNParallel.load
    ),
    "din": _family(din, din.DIN),
    "bst": _family(bst, bst.BST),
    "mmoe": _family(mmoe, mmoe.MMoEModel),
    "user_knn": _family(user_knn, user_knn.UserKNN),
    "user_knn_topk": Family(
        "user_knn_topk", Task.TOPK, user_knn.TopKConfig, user_knn.fit_topk, user_knn.UserKNNTopK.load
    ),
    "emb_knn": _family(emb_knn, emb_knn.EmbKNN, upstream=emb_knn.SOURCES),
}


def select_families(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """The families to build, in registry order: ``names`` plus the upstream families they build on.

    ``None`` or empty selects every family. An unknown name raises ``ValueError`` with the
    closest registered name and the full list.
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
