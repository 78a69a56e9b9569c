"""What every family hands back: a fitted model that scores, exports, saves and loads.

A family's fitted state lives in one ``torch.nn.Module`` (parameters for neural families,
buffers for memory-based ones), so saving, loading and ONNX export are the same code for
all of them. Anything needed to rebuild that module's shapes goes into ``meta`` (JSON).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from common.io import atomic_write_with
from models.config import parse_config


class Task(StrEnum):
    RATING = "rating"  # user_idx, item_idx -> rating
    TOPK = "topk"  # user_idx -> scores over all items
    CTR = "ctr"  # sparse, dense -> logit
    MULTITASK = "multitask"  # sparse, dense -> logits [batch, n_tasks]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" | "bool"
    shape: tuple[str | int, ...]  # strings are symbolic (dynamic) dims such as "batch"


@dataclass(frozen=True)
class ExportSpec:
    """What ``export/onnx_export.py`` needs to write a scorer: every string dim of ``inputs``
    and ``outputs`` becomes a dynamic axis there (the one place that derives them)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: tuple[torch.Tensor, ...]  # in `inputs` order
    topk: int | None = None  # K of the extra top-K graph (topk task only)
    notes: str = ""


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


class TrainedModel(ABC):
    """Base of every family's fitted model. Subclasses set the class attributes and
    implement ``build_module`` (rebuild the empty scorer from config + meta) and ``export_spec``.

    Class attributes:
        family: the family's name, also the name of its module ``models/<family>.py``.
        task: what the scorer computes (``Task``).
        config_cls: the family's ``Config`` dataclass.
        upstream: families whose fitted models ``fit`` may build on (``fit(snapshot, config,
            log, upstream)``); empty for most. ``reads_upstream(config)`` says which of them a
            given config reads, and ``upstream_note`` how (the model asset's description).
        loss: gradient-trained families only (``None`` for memory-based ones): a staticmethod
            ``loss(module, batch, config) -> scalar tensor``, the objective ``fit`` minimises.
        training_batch: with ``loss``: a staticmethod ``training_batch(snapshot, config, rows)``
            giving a batch of the first ``rows`` training examples in ``loss``'s layout.
    """

    family: ClassVar[str]
    task: ClassVar[Task]
    config_cls: ClassVar[type]
    upstream: ClassVar[tuple[str, ...]] = ()
    upstream_note: ClassVar[str] = ""
    loss: ClassVar[Callable[..., torch.Tensor] | None] = None
    training_batch: ClassVar[Callable[..., tuple[torch.Tensor, ...]] | None] = None

    @classmethod
    def reads_upstream(cls, config: Any) -> tuple[str, ...]:
        """The upstream families ``fit`` reads under ``config`` (default: every one declared)."""
        return cls.upstream

    def __init__(self, config: Any, module: nn.Module, meta: dict, history: list[dict] | None = None):
        self.config = config
        self.module = module.eval()
        self.meta = dict(meta)
        self.history: list[dict] = list(history or [])

    # --- to implement -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build_module(cls, config: Any, meta: dict) -> nn.Module:
        """Rebuild the empty scorer module from config + meta (weights are loaded after)."""

    @abstractmethod
    def export_spec(self) -> ExportSpec:
        """Input/output names, dtypes, symbolic shapes and example inputs of ``scorer()``."""

    # --- shared ---------------------------------------------------------------------------
    def scorer(self) -> nn.Module:
        """The module in eval mode; ``forward(*export_spec().inputs)`` gives the task output."""
        return self.module.eval()

    @torch.no_grad()
    def score(self, *inputs) -> torch.Tensor:
        """Convenience: run the scorer on numpy arrays or tensors without autograd."""
        return self.scorer()(*(torch.as_tensor(x) for x in inputs))

    def save(self, directory: Path | str) -> Path:
        """Write ``model.pt`` (state dict) then ``config.json`` (family, config, meta, history).

        Each file is replaced atomically; config.json is written last, so a folder with a
        config.json always has the matching weights.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        atomic_write_with(directory / WEIGHTS_FILE, lambda fh: torch.save(state, fh))
        doc = {
            "family": self.family,
            "task": self.task.value,
            "config": asdict(self.config),
            "meta": self.meta,
            "history": self.history,
        }
        # allow_nan=False: config.json must stay strict JSON for whatever reads it next
        payload = json.dumps(doc, indent=2, default=_json_default, allow_nan=False).encode()
        atomic_write_with(directory / CONFIG_FILE, lambda fh: fh.write(payload))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> TrainedModel:
        directory = Path(directory)
        doc = json.loads((directory / CONFIG_FILE).read_text())
        if doc.get("family") != cls.family:
            raise ValueError(
                f"{directory / CONFIG_FILE} holds family {doc.get('family')!r}, not {cls.family!r}; "
                f"load it through models.catalogue.FAMILIES[{doc.get('family')!r}].load"
            )
        config = parse_config(cls.config_cls, doc["config"])
        module = cls.build_module(config, doc["meta"])
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        return cls(config, module, doc["meta"], doc.get("history"))


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, tuple | list):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# K of the exported top-K graph: covers NDCG@10 / Recall@20 / Recall@50.
TOPK = 100
TOPK_NOTES = (
    "column 0 = -1e9; unknown user (0) -> train popularity count/max (in [0,1]); train items "
    "are NOT masked here (the top-K graph takes seen_mask)"
)


def user_topk_spec(meta: dict, notes: str) -> ExportSpec:
    """The export spec of a ``topk`` scorer: ``user_idx [batch] -> scores [batch, n_items]``."""
    users = torch.randint(1, meta["n_users"], (4,), generator=torch.Generator().manual_seed(0))
    users[0] = 0  # an unknown user in every example batch
    return ExportSpec(
        inputs=(TensorSpec("user_idx", "int64", ("batch",)),),
        outputs=(TensorSpec("scores", "float32", ("batch", meta["n_items"])),),
        example_inputs=(users,),
        topk=TOPK,
        notes=f"{notes}; {TOPK_NOTES}",
    )
