"""Dense Adam against sparse gradients + a lazy Adam (``RECSYS_SPARSE_MIN_ROWS``); for the SGD
families (mf_sgd) dense momentum SGD against ``models.lazy_sgd.LazySGD`` on the same tables.

Two parts, each alternating the two paths in one process (one torch thread):

* ``--rows``: one embedding table of that many rows (dim 32) and a linear head, batches of
  1,280 rows with two lookups each; milliseconds per optimiser step, dense then sparse, twice.
  This is where the dense step's cost (every row moves at every step) overtakes the sparse one.
* ``--snapshot``: each family of ``--families`` fitted on a pipeline snapshot at its project
  defaults plus ``max_minutes`` (``--minutes``), first with every table dense
  (``sparse_min_rows=0``), then with the project default (``--sparse-min-rows``); prints the
  rows/s of the last epoch (validation included), the valid metric and the peak RSS.

    python benchmarks/bench_sparse_embeddings.py --rows 2000 10000 25000 50000 100000
    python benchmarks/bench_sparse_embeddings.py --snapshot <home>/snapshots/<id> \\
        --families gmf deepfm --minutes 1.5
"""

from __future__ import annotations

import argparse
import resource
import time
import tomllib
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def step_ms(rows: int, sparse: bool, steps: int = 150, dim: int = 32, batch: int = 1280) -> float:
    torch.manual_seed(0)
    table, head = nn.Embedding(rows, dim, sparse=sparse), nn.Linear(dim, 1)
    if sparse:
        opts = [torch.optim.SparseAdam(table.parameters(), lr=1e-3),
                torch.optim.Adam(head.parameters(), lr=1e-3)]  # fmt: skip
    else:
        opts = [torch.optim.Adam([*table.parameters(), *head.parameters()], lr=1e-3)]
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randint(0, rows, (batch, 2), generator=gen)
        y = torch.rand(batch, generator=gen).round()
        loss = nn.functional.binary_cross_entropy_with_logits(head(table(x).prod(1)).squeeze(-1), y)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def tables(sizes: list[int]) -> None:
    print(f"{'rows':>8} {'dense ms/step':>16} {'sparse ms/step':>16} {'dense/sparse':>12}")
    for rows in sizes:
        dense, sparse = [], []
        for _ in range(2):
            dense.append(step_ms(rows, False))
            sparse.append(step_ms(rows, True))
        d, s = min(dense), min(sparse)
        print(f"{rows:>8,} {d:>16.2f} {s:>16.2f} {d / s:>12.2f}", flush=True)


def families(snapshot: Path, names: list[str], minutes: float, sparse_min_rows: int) -> None:
    from models.catalogue import FAMILIES
    from models.config import parse_config
    from models.runtime import Runtime
    from pipeline.fitting import fit_family

    defaults = tomllib.loads((ROOT / "models" / "families.toml").read_text())
    print(f"{'family':<10} {'sparse_min_rows':>15} {'sparse tables':<40} {'epochs':>6} {'rows/s':>9} "
          f"{'valid':>8} {'fit s':>7} {'peak RSS GiB':>12}")  # fmt: skip
    for name in names:
        family = FAMILIES[name]
        for rows in (0, sparse_min_rows):
            config = parse_config(family.config_cls, {**defaults.get(name, {}), "max_minutes": minutes})
            start = time.perf_counter()
            model = fit_family(family, str(snapshot), config, lambda _: None, Runtime(sparse_min_rows=rows))
            loop = model.meta["training"]["loops"][-1]
            last = model.history[-1]
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            seconds = time.perf_counter() - start
            print(f"{name:<10} {rows:>15} {','.join(loop['sparse_tables']) or '-':<40} {loop['epochs']:>6} "
                  f"{last['rows_per_s']:>9,.0f} {last['valid_metric']:>8.4f} {seconds:>7.1f} "
                  f"{rss:>12.2f}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="table sizes of the step benchmark")
    parser.add_argument("--snapshot", type=Path, help="a pipeline snapshot folder")
    parser.add_argument("--families", nargs="*", default=["gmf", "deepfm"])
    parser.add_argument("--minutes", type=float, default=1.5, help="max_minutes of each fit")
    parser.add_argument("--sparse-min-rows", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.rows and args.snapshot is None:
        parser.error("give --rows and/or --snapshot")
    if args.rows:
        tables(args.rows)
    if args.snapshot is not None:
        families(args.snapshot, args.families, args.minutes, args.sparse_min_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
