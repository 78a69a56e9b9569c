"""DCN-v2, parallel structure (Wang et al. 2021), task ``ctr``:
``logit = head([cross(x_0), deep(x_0)])``, the cross and deep networks read ``x_0`` side by
side. Fields, parts and training: ``models/dcn.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models.ctr import Log, fit_ctr
from models.data import Snapshot
from models.dcn import DCNConfig, DCNModel


@dataclass(frozen=True)
class Config(DCNConfig):
    PARALLEL: ClassVar[bool] = True


class DCNParallel(DCNModel):
    family = "dcn_parallel"
    config_cls = Config


def fit(snapshot: Snapshot, config: Config, log: Log = print) -> DCNParallel:
    return fit_ctr(snapshot, config, DCNParallel, log)
