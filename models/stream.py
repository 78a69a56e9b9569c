"""Training rows streamed from a snapshot's parquet file in row-group batches.

``ParquetRows`` reads the rows of one split (the file's ``split`` column) one row group at a
time and never holds more than its shuffle buffer, one row group and one batch, whatever the
file's size. Per epoch:

1. the row groups that may hold the split (by their ``split`` min/max statistics) are shuffled
   as blocks with an RNG seeded by ``(seed, epoch)``, the same order in every process;
2. with ``world_size`` > 1, each block in that order goes to the rank holding the fewest of the
   split's rows so far (ties: the lowest rank): disjoint shares that together cover the file, their
   row counts within one row group of each other (the cut a ``torchrun`` data-parallel run needs;
   ``models.distributed`` evens out the step counts);
3. the blocks are read in that order, their rows of the split converted to arrays
   (``convert(table)``) and gathered into a buffer; once it holds ``buffer_rows`` rows (or the
   blocks run out) it is permuted with the loader's row RNG (seeded once, with ``seed``), cut
   into batches, and the last incomplete batch is carried into the next buffer.

With one row group and ``buffer_rows`` >= the split's rows, an epoch's order is
``default_rng(seed).permutation(rows)``, epoch after epoch: exactly the in-memory loop's
(``models.train.ArrayRows``), so the two paths train bit-identical models on such data.
Otherwise the order is a block-then-buffer shuffle (as ``tf.data``/WebDataset shuffle), and the
model agrees with the in-memory one within the tolerance tests/test_streaming.py states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

Arrays = tuple[np.ndarray, ...]
SPLIT_COLUMN = "split"


class UnreadableRowGroup(OSError):
    """A row group of a snapshot file does not decode; the message names the file, the group and
    the rank that read it."""


def _concat(parts: Sequence[Arrays]) -> Arrays:
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def _take(arrays: Arrays, index) -> Arrays:
    return tuple(a[index] for a in arrays)


class ParquetRows:
    """The rows of ``split`` in the parquet file ``path``, as row-aligned arrays, in batches.

    Args:
        path: the parquet file (a snapshot's ``fct_ctr_samples.parquet``, ...).
        split: the value of the ``split`` column to keep (``train``, ``valid``, ``test``).
        columns: the columns ``convert`` reads (``split`` is added).
        convert: ``convert(table) -> tuple of row-aligned numpy arrays`` (features..., target).
        seed: seeds the block order (with the epoch) and the row RNG.
        buffer_rows: rows shuffled together; memory is this many rows plus one row group.
        rank, world_size: this process's share of the row groups (0 and 1: all of them).
    """

    def __init__(
        self,
        path: Path | str,
        split: str,
        columns: Sequence[str],
        convert: Callable[[pa.Table], Arrays],
        *,
        seed: int = 0,
        buffer_rows: int = 1 << 18,
        rank: int = 0,
        world_size: int = 1,
    ):
        if buffer_rows < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need buffer_rows >= 1 and 0 <= rank < world_size, got {buffer_rows}, {rank}")
        self.path, self.split, self.convert = Path(path), split, convert
        self.columns = list(dict.fromkeys([*columns, SPLIT_COLUMN]))
        self.seed, self.buffer_rows, self.rank, self.world_size = seed, buffer_rows, rank, world_size
        self.rng = np.random.default_rng(seed if rank == 0 else (seed, rank))
        meta = pq.ParquetFile(self.path).metadata
        self.groups = [g for g in range(meta.num_row_groups) if self._may_hold(meta.row_group(g))]
        self._group_rows: dict[int, int] | None = None
        self.peak_rows = 0  # most rows held at once (buffer + carried rows + the group read last)

    def _may_hold(self, group) -> bool:
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema == SPLIT_COLUMN:
                stats = col.statistics
                if stats is not None and stats.has_min_max:
                    return stats.min <= self.split <= stats.max
        return True

    @property
    def group_rows(self) -> dict[int, int]:
        """Rows of the split per row group (one pass over the ``split`` column, then cached)."""
        if self._group_rows is None:
            f = pq.ParquetFile(self.path)
            counts = {}
            for g in self.groups:
                column = f.read_row_group(g, columns=[SPLIT_COLUMN])[SPLIT_COLUMN]
                counts[g] = int(pc.sum(pc.equal(column, self.split)).as_py() or 0)
            self._group_rows = counts
        return self._group_rows

    @property
    def rows(self) -> int:
        """Rows of the split in the whole file (every rank's share)."""
        return sum(self.group_rows.values())

    def shares(self, epoch: int) -> list[list[int]]:
        """Every rank's row groups in epoch ``epoch``'s block order (one process: all of them, with
        no read of the row counts)."""
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.groups))
        blocks = [self.groups[i] for i in order]
        if self.world_size == 1:
            return [blocks]
        shares: list[list[int]] = [[] for _ in range(self.world_size)]
        held = [0] * self.world_size
        for g in blocks:  # to the rank with the fewest rows: no two ranks differ by more than a group
            r = held.index(min(held))
            shares[r].append(g)
            held[r] += self.group_rows[g]
        return shares

    def groups_for(self, epoch: int) -> list[int]:
        """This rank's row groups in epoch ``epoch``'s block order."""
        return self.shares(epoch)[self.rank]

    def rows_for(self, epoch: int, rank: int | None = None) -> int:
        """Rows rank ``rank`` (default: this one) sees in epoch ``epoch`` (ranks differ by at most
        the largest group)."""
        return sum(self.group_rows[g] for g in self.shares(epoch)[self.rank if rank is None else rank])

    def whole(self) -> ParquetRows:
        """The same rows read as one process reads them (rank 0 of 1, the same seeds): the order
        every rank shares when ``models.distributed`` cuts global batches instead of row groups."""
        rows = ParquetRows(self.path, self.split, self.columns, self.convert, seed=self.seed,
                           buffer_rows=self.buffer_rows)  # fmt: skip
        rows._group_rows = self._group_rows
        return rows

    def _read(self, file: pq.ParquetFile, group: int) -> Arrays:
        try:
            table = file.read_row_group(group, columns=self.columns)
        except (OSError, pa.ArrowException) as exc:
            raise UnreadableRowGroup(
                f"{self.path}: row group {group} (columns {self.columns}) cannot be read ({exc}); "
                f"rank {self.rank} of {self.world_size} read it. The file is damaged: delete the "
                "snapshot folder and materialise `training_snapshot` again."
            ) from exc
        table = table.filter(pc.equal(table[SPLIT_COLUMN], self.split))
        return tuple(self.convert(table))

    def _chunks(self, groups: Sequence[int]) -> Iterator[Arrays]:
        file = pq.ParquetFile(self.path)
        for g in groups:
            arrays = self._read(file, g)
            if len(arrays[0]):
                yield arrays

    def _fill(self, chunks: Iterator[Arrays], carry: Arrays | None) -> tuple[Arrays | None, int]:
        """The next buffer (the carried rows, then row groups until it holds ``buffer_rows`` rows
        or the groups run out) and how many rows it read from the file."""
        parts = [carry] if carry is not None else []
        size, fresh = (0 if carry is None else len(carry[0])), 0
        for arrays in chunks:
            parts.append(arrays)
            size += len(arrays[0])
            fresh += len(arrays[0])
            self.peak_rows = max(self.peak_rows, size)
            if size >= self.buffer_rows:
                break
        return (_concat(parts) if parts else None), fresh

    def epoch(self, epoch: int, batch_size: int) -> Iterator[list[torch.Tensor]]:
        """Shuffled batches of ``batch_size`` rows (the epoch's last one may be smaller), as tensors."""
        chunks = self._chunks(self.groups_for(epoch))
        carry: Arrays | None = None
        while True:
            buffer, fresh = self._fill(chunks, carry)
            if not fresh:  # the file is done: the carried rows are the last, smaller batch
                if carry is not None:
                    yield [torch.from_numpy(a) for a in carry]
                return
            perm = self.rng.permutation(len(buffer[0]))
            columns = list(buffer)
            del buffer  # permute column by column: the buffer is held once, plus one column
            for j, a in enumerate(columns):
                columns[j] = a[perm]
            n = len(perm)
            full = n - n % batch_size
            for lo in range(0, full, batch_size):
                yield [torch.from_numpy(a[lo : lo + batch_size]) for a in columns]
            carry = tuple(a[full:].copy() for a in columns) if full < n else None
            del columns

    def ordered(self, batch_size: int) -> Iterator[Arrays]:
        """Every row of the split in file order (all ranks' groups), in batches of ``batch_size``
        rows (the last may be smaller), as numpy arrays: for evaluation."""
        pending: list[Arrays] = []
        size = 0
        for arrays in self._chunks(self.groups):
            pending.append(arrays)
            size += len(arrays[0])
            if size >= batch_size:
                merged = _concat(pending)
                full = size - size % batch_size
                for lo in range(0, full, batch_size):
                    yield _take(merged, slice(lo, lo + batch_size))
                pending = [_take(merged, slice(full, size))] if full < size else []
                size -= full
        if size:
            yield _concat(pending)
