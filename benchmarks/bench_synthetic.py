"""Wall time and peak memory of the synthetic source.

    python benchmarks/bench_synthetic.py                      # MovieLens-100K size
    python benchmarks/bench_synthetic.py 70000 10000 10000000 # users items events

Peak RSS is the whole process (interpreter, numpy and pyarrow included), so it is what a
Dagster step running the generator would need.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.synthetic import SyntheticConfig, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_users", type=int, nargs="?", default=943)
    parser.add_argument("n_items", type=int, nargs="?", default=1682)
    parser.add_argument("n_events", type=int, nargs="?", default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    config = SyntheticConfig(args.n_users, args.n_items, args.n_events, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = generate(config, Path(tmp))
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.interactions)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        f"{out.n_events:,} events ({config.n_users:,} users x {config.n_items:,} items) "
        f"in {wall:.1f} s, {len(out.interactions)} parts, {size / 2**20:.0f} MiB parquet, "
        f"peak RSS {peak_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
