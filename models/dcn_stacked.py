"""DCN-v2, stacked structure (Wang et al. 2021), task ``ctr``:
``logit = head(deep(cross(x_0)))``, the deep network on top of the cross network's output.
Fields, parts and training: ``models/dcn.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models.ctr import Log, fit_ctr
from models.data import Snapshot
from models.dcn import DCNConfig, DCNModel


@dataclass(frozen=True)
class Config(DCNConfig):
    PARALLEL: ClassVar[bool] = False


class DCNStacked(DCNModel):
    family = "dcn_stacked"
    config_cls = Config


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> DCNStacked:
    return fit_ctr(snapshot, config, DCNStacked, log)
