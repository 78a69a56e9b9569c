"""Read a mart snapshot (parquet files + meta.json written by the orchestration) as arrays.

Everything a family trains or is evaluated on comes through here, so index conventions
live in one place: indices are fitted on train rows only, 0 = unknown/padding, and the
``n_users``/``n_items`` of ``meta.json`` are embedding sizes (max index + 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from models.stream import ParquetRows

SPLITS = ("train", "valid", "test")


class SnapshotError(FileNotFoundError):
    """A snapshot file is missing or unreadable; the message names it and the fix."""


@dataclass(frozen=True)
class RatingArrays:
    user_idx: np.ndarray  # int64 [N]
    item_idx: np.ndarray  # int64 [N]
    rating: np.ndarray  # float32 [N]
    ts: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.rating)


@dataclass(frozen=True)
class CtrArrays:
    sparse: np.ndarray  # int64 [N, F], columns in meta["sparse_fields"] order
    dense: np.ndarray  # float32 [N, D], columns in meta["dense_fields"] order
    label_like: np.ndarray  # float32 [N]
    label_love: np.ndarray  # float32 [N]
    history: np.ndarray  # int64 [N, L], oldest first, right-padded with 0
    history_len: np.ndarray  # int64 [N]
    user_idx: np.ndarray  # int64 [N] (= sparse[:, 0]), for per-user metrics

    def __len__(self) -> int:
        return len(self.label_like)


class Snapshot:
    """One frozen copy of the marts. ``Snapshot(path)`` fails at once if a file is missing."""

    FILES = ("fct_ratings", "fct_ctr_samples", "dim_users", "dim_items", "user_stats", "item_stats")

    def __init__(self, path: Path | str):
        self.path = Path(path)
        meta = self.path / "meta.json"
        if not meta.is_file():
            raise SnapshotError(
                f"{meta} is missing: {self.path} is not a mart snapshot. Materialise the "
                "`training_snapshot` asset (it needs the dbt marts) first."
            )
        self.meta: dict = json.loads(meta.read_text())
        for name in self.FILES:
            if not (self.path / f"{name}.parquet").is_file():
                raise SnapshotError(
                    f"{self.path / name}.parquet is missing: the snapshot is incomplete; "
                    "delete the folder and materialise `training_snapshot` again."
                )

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def table(self, name: str):
        return pq.read_table(self.path / f"{name}.parquet")

    @cached_property
    def _ratings(self):
        return self.table("fct_ratings")

    def ratings(self, split: str) -> RatingArrays:
        t = self._ratings
        mask = np.asarray(t.column("split").to_numpy(zero_copy_only=False) == split)
        return RatingArrays(
            user_idx=t.column("user_idx").to_numpy()[mask].astype(np.int64),
            item_idx=t.column("item_idx").to_numpy()[mask].astype(np.int64),
            rating=t.column("rating").to_numpy()[mask].astype(np.float32),
            ts=t.column("ts").to_numpy()[mask].astype(np.int64),
        )

    def ctr(self, split: str, max_history: int | None = None) -> CtrArrays:
        # Only the columns ctr_arrays reads: with max_history=1 the 50-long history lists are
        # not decoded at all (at 25M rows they alone took the CTR baselines past 14 GiB).
        rows = self._split_rows("fct_ctr_samples", split, self.ctr_columns(max_history))
        return ctr_arrays(rows, self.meta, max_history)

    def _split_rows(self, name: str, split: str, columns: list[str]) -> pa.Table:
        """Only ``columns`` of ``<name>.parquet``, the rows of ``split``, in file order."""
        t = pq.read_table(self.path / f"{name}.parquet", columns=[*columns, "split"])
        return t.filter(np.asarray(t.column("split").to_numpy(zero_copy_only=False) == split))

    def split_columns(self, name: str, split: str, columns: list[str]) -> dict[str, np.ndarray]:
        """Only ``columns`` of ``<name>.parquet``'s ``split`` rows, as numpy arrays in file order."""
        t = self._split_rows(name, split, columns)
        return {c: t.column(c).to_numpy() for c in columns}

    def ctr_columns(self, max_history: int | None = None) -> list[str]:
        """The fct_ctr_samples columns ``ctr_arrays`` reads; the histories only when
        ``max_history`` > 1 (the plain CTR families train with ``max_history=1`` and ignore them)."""
        labels = ["label_like", "label_love"]
        history = ["history_item_idx", "history_len"] if (max_history or 2) > 1 else []
        return [*self.meta["sparse_fields"], *self.meta["dense_fields"], *labels, *history]

    def stream(self, name: str, split: str, columns, convert, **kwargs) -> ParquetRows:
        """The rows of ``split`` in ``<name>.parquet``, read in row-group batches
        (``models.stream.ParquetRows``; ``kwargs``: seed, buffer_rows, rank, world_size)."""
        return ParquetRows(self.path / f"{name}.parquet", split, columns, convert, **kwargs)

    def ctr_stream(self, split: str, max_history: int | None, convert, **kwargs) -> ParquetRows:
        """``stream`` of fct_ctr_samples, each row group as ``convert(CtrArrays)``."""
        columns = self.ctr_columns(max_history)
        return self.stream(
            "fct_ctr_samples",
            split,
            columns,
            lambda t: convert(ctr_arrays(t, self.meta, max_history)),
            **kwargs,
        )

    def train_matrix(self, values: str = "rating") -> sp.csr_matrix:
        """Users x items CSR of train rows (``values``: 'rating' or 'ones'); row/col 0 stay empty."""
        r = self.ratings("train")
        data = r.rating if values == "rating" else np.ones(len(r), dtype=np.float32)
        return sp.csr_matrix(
            (data, (r.user_idx, r.item_idx)), shape=(self.n_users, self.n_items), dtype=np.float32
        )

    def item_popularity(self) -> np.ndarray:
        """Train interaction count per item index (index 0 = 0)."""
        r = self.ratings("train")
        return np.bincount(r.item_idx, minlength=self.n_items).astype(np.float32)


def pad_history(lists, length: int) -> np.ndarray:
    """``[N, length]`` int64 of a list column: each row's last ``length`` items (the most recent,
    still oldest first), right-padded with 0; null or empty lists give a zero row."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    n = len(arr)
    out = np.zeros((n, length), dtype=np.int64)
    if n == 0:
        return out
    offsets = np.asarray(arr.offsets, dtype=np.int64)  # absolute positions in arr.values
    sizes = np.diff(offsets)
    if arr.null_count:
        sizes = np.where(np.asarray(arr.is_null()), 0, sizes)
    keep = np.minimum(sizes, length)
    rows = np.repeat(np.arange(n), keep)
    slot = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    source = np.repeat(offsets[1:] - keep, keep) + slot
    out[rows, slot] = np.asarray(arr.values)[source]
    return out


def ctr_arrays(t: pa.Table, meta: dict, max_history: int | None = None) -> CtrArrays:
    """``CtrArrays`` of fct_ctr_samples rows (a whole split or one row group's rows of it).
    Without the history columns (``Snapshot.ctr_columns(1)``) the histories are all padding."""
    n = t.num_rows
    sparse = np.stack([t.column(f).to_numpy().astype(np.int64) for f in meta["sparse_fields"]], axis=1)
    dense = np.stack([t.column(f).to_numpy().astype(np.float32) for f in meta["dense_fields"]], axis=1)
    length = max_history or int(meta.get("max_history_len", 0)) or 1
    if "history_item_idx" in t.column_names:
        history = pad_history(t.column("history_item_idx"), length)
        history_len = np.minimum(t.column("history_len").to_numpy().astype(np.int64), length)
    else:
        history, history_len = np.zeros((n, length), np.int64), np.zeros(n, np.int64)
    return CtrArrays(
        sparse=sparse,
        dense=dense,
        label_like=t.column("label_like").to_numpy().astype(np.float32),
        label_love=t.column("label_love").to_numpy().astype(np.float32),
        history=history,
        history_len=history_len,
        user_idx=sparse[:, 0].copy(),
    )
