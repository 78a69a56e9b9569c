"""Per-epoch valid NDCG@10 of a top-K family on a pipeline snapshot, beside popularity's on the
valid users the family validates on: how many epochs a family needs to beat popularity at a given data size.

One torch thread. The family runs at its project defaults (``models/families.toml``) plus the
JSON fields of ``--config``. ``--users-below N`` keeps only users with index below N and every
item: a cheap stand-in for the full snapshot whose per-step costs (the whole user and item
tables, the catalogue size) are the full snapshot's, with fewer steps per epoch.

    python benchmarks/bench_topk_epochs.py --snapshot <home>/snapshots/<id> --family mf_implicit \\
        --config '{"epochs": 3, "unobserved": "sampled"}' --users-below 16000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from functools import cache

import numpy as np
import torch

from common.metrics import ranking_metrics
from models.catalogue import FAMILIES
from models.config import parse_config
from models.data import RatingArrays, Snapshot
from models.runtime import DEFAULT_SPARSE_MIN_ROWS, Runtime, use_runtime
from models.topk import ValidNDCG
from pipeline.family_config import family_configs
from pipeline.settings import load_settings


class UsersBelow(Snapshot):
    """The snapshot's rows of users with index below ``cut`` (the vocabularies stay whole)."""

    def __init__(self, path, cut: int):
        super().__init__(path)
        self.cut = cut

    @cache  # noqa: B019 - one instance per run
    def ratings(self, split: str) -> RatingArrays:
        r = super().ratings(split)
        keep = r.user_idx < self.cut
        return RatingArrays(r.user_idx[keep], r.item_idx[keep], r.rating[keep], r.ts[keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot", required=True, help="a pipeline snapshot directory")
    parser.add_argument("--family", required=True, help="a top-K family (mf_implicit, cdae, gmf, ...)")
    parser.add_argument("--config", default="{}", help="JSON fields over the project defaults")
    parser.add_argument("--users-below", type=int, default=None)
    parser.add_argument("--sparse-min-rows", type=int, default=DEFAULT_SPARSE_MIN_ROWS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cut = args.users_below
    snap = Snapshot(args.snapshot) if cut is None else UsersBelow(args.snapshot, cut)
    family = FAMILIES[args.family]
    fields = {**family_configs(load_settings({})).get(args.family, {}), **json.loads(args.config)}
    config = parse_config(family.config_cls, fields)
    train_rows = len(snap.ratings("train").user_idx)
    print(f"{args.family} {fields}: {train_rows:,} train rows, {snap.n_users:,} x {snap.n_items:,}")

    valid = ValidNDCG(snap, config.eval_users, config.seed)  # the users the family validates on
    popular = np.tile(snap.item_popularity().astype(np.float64), (len(valid.users), 1))
    pop = ranking_metrics(popular, valid.train, valid.users, valid.relevant)["ndcg@10"]
    print(f"popularity valid ndcg@10 {pop:.4f} ({len(valid.users)} valid users)", flush=True)

    start = time.perf_counter()
    with use_runtime(Runtime(sparse_min_rows=args.sparse_min_rows)) as loops:
        family.fit(snap, config, lambda line: print(line, flush=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tables = sorted({t for loop in loops for t in loop.get("sparse_tables", [])})
    print(f"fit {time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GiB, sparse tables {tables}")


if __name__ == "__main__":
    main()
