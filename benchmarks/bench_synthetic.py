"""Wall time and peak memory of the synthetic source.

    python benchmarks/bench_synthetic.py                      # MovieLens-100K size
    python benchmarks/bench_synthetic.py 69878 10677 10000000 # users items events (ML-10M shape)
    python benchmarks/bench_synthetic.py 162541 59047 25000000 --digest   # ML-25M shape
    python benchmarks/bench_synthetic.py 69878 10677 10000000 --checkout ../old  # another commit

Peak RSS is the whole process tree (interpreter, numpy and pyarrow included, and the worker
processes), so it is what a Dagster step running the generator would need. ``--digest`` prints a
SHA-256 of every row sorted by user and time (after the timing), so two commits can be shown
to write the same rows whatever their part files. ``--checkout`` imports the generator from
another working tree (a ``git worktree`` of an older commit) so both run under this script.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


class _TreePeak:
    """Largest sum of resident memory over this process and its children, sampled every 0.1 s
    (and this process's own kernel-kept peak, which sampling can miss)."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop_mib(self) -> float:
        self._done.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return max(self.peak, own) / 2**20


def _digest(parts: list[Path]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in parts)
    table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    digest = hashlib.sha256()
    for name in ("user_id", "item_id", "rating", "timestamp"):
        digest.update(table[name].to_numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_users", type=int, nargs="?", default=943)
    parser.add_argument("n_items", type=int, nargs="?", default=1682)
    parser.add_argument("n_events", type=int, nargs="?", default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the cores)")
    parser.add_argument("--digest", action="store_true", help="print a SHA-256 of the rows")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    paths = [str(args.checkout.resolve()), os.environ.get("PYTHONPATH")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))  # for worker processes
    from ingest.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(args.n_users, args.n_items, args.n_events, args.seed)
    kwargs = {"workers": args.workers} if "workers" in inspect.signature(generate).parameters else {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        peak = _TreePeak()
        start = time.perf_counter()
        out = generate(config, Path(tmp), **kwargs)
        wall = time.perf_counter() - start
        peak_mib = peak.stop_mib()
        size = sum(p.stat().st_size for p in out.interactions)
        digest = f", rows {_digest(out.interactions)}" if args.digest else ""
    print(
        f"{out.n_events:,} events ({config.n_users:,} users x {config.n_items:,} items) "
        f"in {wall:.1f} s, {len(out.interactions)} parts, {size / 2**20:.0f} MiB parquet, "
        f"peak RSS {peak_mib:.0f} MiB{digest} [{args.checkout.name}; load before "
        f"{load[0]:.1f}, after {os.getloadavg()[0]:.1f}]"
    )


if __name__ == "__main__":
    main()
