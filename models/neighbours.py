"""Neighbour rows of the train interaction matrix, gathered inside an exportable graph.

Neighbourhood scorers (user_knn, emb_knn) need, for each request, a few rows of the train
users x items matrix R: the rows of the user's k neighbours. ``NeighbourRows`` keeps R as
CSR buffers and reads those rows with Gather/ScatterElements only, so the ONNX graph is
self-contained and nothing ever densifies users x items:

- ``forward(nbr_idx [B, k], nbr_weight [B, k]) -> [B, n_items]``: the weighted sum of the
  neighbours' rows, ``sum_j w[b, j] * R[nbr_idx[b, j], :]`` (top-K scoring). In the graph
  the stored cells of ``s = slots_per_step`` neighbours' rows at a time (all k when None) are
  read as one ragged range, whose length the graph learns when it runs, and scatter-added
  into the output: memory and work ~ 50 bytes per stored cell read, not per
  ``B * s * max_row`` padded slot (the graph's size estimate, ``export.runtime``, cannot see
  this data-dependent part). Eager calls on CPU (fit's validation, benchmarks) take a
  sparse @ sparse product instead, the same sums up to addition order.
- ``lookup(nbr_idx [B, k], item_idx [B]) -> (R[nbr, item] [B, k], found [B, k])``: one cell
  per neighbour (rating prediction), by a binary search (additions only) in each neighbour's
  sorted row, unrolled ``max_row.bit_length()`` times; memory ~ ``B * k`` per step, whatever
  max_row is.
  Eager calls on CPU run the same search compiled (numba), the same cells bit for bit.

Neighbour index 0 (and weight 0) is padding: index 0 reads as an empty row even when R's
row 0 has entries, so padded slots never contribute.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


def exporting() -> bool:
    """Whether the module is being traced for export: eager shortcuts must not run then."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


@numba.njit(cache=True, nogil=True)
def _lookup_cells(indptr, indices, values, nbr_idx, item_idx, n_rows):  # pragma: no cover - compiled
    """Eager ``NeighbourRows.lookup``: the same lower-bound search per (row, neighbour), compiled."""
    b_rows, k = nbr_idx.shape
    out = np.zeros((b_rows, k), dtype=values.dtype)
    found = np.zeros((b_rows, k), dtype=np.bool_)
    for b in range(b_rows):
        target = item_idx[b]
        for j in range(k):
            v = nbr_idx[b, j]
            if v <= 0 or v >= n_rows:
                continue
            lo, hi = indptr[v], indptr[v + 1]
            end = hi
            while lo < hi:
                mid = (lo + hi) // 2
                if indices[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < end and indices[lo] == target:
                out[b, j] = values[lo]
                found[b, j] = True
    return out, found


class NeighbourRows(nn.Module):
    """The train matrix as persistent CSR buffers ``indptr [n_users + 1]``, ``indices [nnz]``
    (sorted within each row), ``values [nnz]``; build from meta ``(n_users, n_items, nnz,
    max_row)`` then ``load_state_dict``, or fill from a scipy matrix with ``from_csr``."""

    def __init__(self, n_users: int, n_items: int, nnz: int, max_row: int, slots_per_step: int | None = None):
        super().__init__()
        if slots_per_step is not None and slots_per_step < 1:
            raise ValueError(f"slots_per_step must be >= 1 or None, got {slots_per_step}")
        self.n_users, self.n_items, self.nnz, self.max_row = n_users, n_items, nnz, max_row
        # Neighbours read per scatter step: a static loop over the k axis that bounds the
        # gathered [B, s, max_row] block; None reads all k at once (k may then be dynamic).
        self.slots_per_step = slots_per_step
        self.register_buffer("indptr", torch.zeros(n_users + 1, dtype=torch.int64))
        # At least one slot, so a masked position 0 is always a valid Gather index.
        self.register_buffer("indices", torch.zeros(max(nnz, 1), dtype=torch.int64))
        self.register_buffer("values", torch.zeros(max(nnz, 1)))

    @classmethod
    def from_csr(cls, csr: sp.spmatrix, slots_per_step: int | None = None) -> NeighbourRows:
        """Copy a users x items scipy matrix (duplicates summed, columns sorted per row)."""
        m = sp.csr_matrix(csr, dtype=np.float32, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        lengths = np.diff(m.indptr)
        rows = cls(m.shape[0], m.shape[1], int(m.nnz), int(lengths.max(initial=0)), slots_per_step)
        rows.indptr.copy_(torch.from_numpy(m.indptr.astype(np.int64)))
        if m.nnz:
            rows.indices.copy_(torch.from_numpy(m.indices.astype(np.int64)))
            rows.values.copy_(torch.from_numpy(m.data.astype(np.float32)))
        return rows

    def meta(self) -> dict:
        """What ``__init__`` needs to rebuild the empty module before ``load_state_dict``."""
        return {"n_users": self.n_users, "n_items": self.n_items, "nnz": self.nnz, "max_row": self.max_row}

    def _rows(self, nbr_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start position and length of each neighbour's row; padding / out of range -> empty."""
        valid = (nbr_idx > 0) & (nbr_idx < self.n_users)
        v = torch.where(valid, nbr_idx, torch.zeros_like(nbr_idx))
        start = self.indptr[v]
        length = torch.where(valid, self.indptr[v + 1] - start, torch.zeros_like(start))
        return start, length

    def _scatter(self, out: torch.Tensor, nbr_idx: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        """``out [B, n_items]`` plus the weighted rows of the neighbours ``nbr_idx [B, s]``, reading
        only their stored cells: the rows laid end to end as one ragged range of ``n`` positions
        (``n`` = the rows' total length, known only when the graph runs), each position's
        neighbour found by a cumulative sum of the rows' start marks. Each cell is added in
        neighbour order, as a padded ``[B, s, max_row]`` block read it, so the sums are the
        same bit for bit; the work follows the cells read, not ``B * s * max_row`` (on a skewed
        catalogue, where the heaviest row is 100x the mean, that was 100x the cells)."""
        start, length = self._rows(nbr_idx)  # [B, s]
        width = nbr_idx.shape[1]
        length, start = length.reshape(-1), start.reshape(-1)
        ends = torch.cumsum(length, 0)
        begins = ends - length
        n = length.sum().item()  # 0 for an empty batch; a symbol when exporting (no int(): that
        # would ask the tracer for its value, failing torch.export's non-strict capture)
        torch._check_is_size(n)
        # marks[p]: how many rows begin at p (empty rows begin where the next one does), so the
        # cumulative count less one is the last row begun at or before p: the one p is in
        marks = torch.zeros(n + 1, dtype=torch.int64, device=begins.device)
        marks = marks.scatter_add(0, begins, torch.ones_like(begins))
        row = torch.cumsum(marks[:n], 0) - 1
        pos = torch.arange(n, dtype=torch.int64, device=begins.device) - begins[row] + start[row]
        cells = torch.div(row, width, rounding_mode="floor") * self.n_items + self.indices[pos]
        vals = self.values[pos] * nbr_weight.reshape(-1)[row]
        return out.reshape(-1).scatter_add(0, cells, vals).reshape(out.shape)

    def _sparse_product(self, nbr_idx: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        """Eager ``forward``: the neighbour weights as a sparse ``[B, n_users]`` matrix times R's
        CSR buffers (scipy, sharing their memory), so only stored cells are read; the same sums
        as the graph up to float addition order."""
        idx, w = nbr_idx.detach().cpu().numpy(), nbr_weight.detach().cpu().numpy()
        valid = (idx > 0) & (idx < self.n_users)
        rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
        weights = sp.csr_matrix((w[valid], (rows[valid], idx[valid])), shape=(idx.shape[0], self.n_users))
        r = sp.csr_matrix(
            (self.values.numpy()[: self.nnz], self.indices.numpy()[: self.nnz], self.indptr.numpy()),
            shape=(self.n_users, self.n_items),
        )
        return torch.from_numpy((weights @ r).toarray().astype(np.float32, copy=False)).to(nbr_weight.dtype)

    def forward(self, nbr_idx: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        if not exporting() and self.indptr.device.type == "cpu":
            return self._sparse_product(nbr_idx, nbr_weight)
        out = torch.zeros((nbr_idx.shape[0], self.n_items), dtype=nbr_weight.dtype)
        step = self.slots_per_step or max(nbr_idx.shape[1], 1)
        for lo in range(0, nbr_idx.shape[1], step):
            out = self._scatter(out, nbr_idx[:, lo : lo + step], nbr_weight[:, lo : lo + step])
        return out

    def lookup(self, nbr_idx: torch.Tensor, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``R[nbr_idx[b, j], item_idx[b]]`` and whether that cell is stored, both ``[B, k]``.

        Lower-bound search of the item in each neighbour's sorted row, unrolled a fixed
        ``max_row.bit_length()`` times. It is a uniform search (probe ``last + 2**s`` for s from
        high to low) with additions only: the exporter lowers integer floor division through
        float32, which rounds positions past 2**24 (at ML-25M shape, 20M stored cells, the
        halving search read wrong cells in onnxruntime and failed the parity gate). Eager calls
        on CPU run the same lower bound compiled (``_lookup_cells``: the same stored cells, so
        the same values bit for bit, ~20x faster than the unrolled tensor steps); exporting
        traces the unrolled graph."""
        if not exporting() and self.indptr.device.type == "cpu":
            values, found = _lookup_cells(
                self.indptr.numpy(), self.indices.numpy(), self.values.numpy(),
                nbr_idx.detach().numpy(), item_idx.detach().numpy(), self.n_users,
            )  # fmt: skip
            return torch.from_numpy(values), torch.from_numpy(found)
        start, length = self._rows(nbr_idx)
        end = start + length
        target = item_idx.unsqueeze(1)
        last_slot = self.indices.shape[0] - 1
        # ``last``: the last position known to hold an index below the target (start - 1: none);
        # 2**steps - 1 >= max_row, so any count of smaller indices in a row is reachable.
        last = start - 1
        for s in reversed(range(max(self.max_row, 1).bit_length())):
            probe = last + (1 << s)
            smaller = (probe < end) & (self.indices[probe.clamp(max=last_slot)] < target)
            last = torch.where(smaller, probe, last)
        pos = (last + 1).clamp(max=last_slot)
        found = (last + 1 < end) & (self.indices[pos] == target)
        return torch.where(found, self.values[pos], torch.zeros_like(self.values[pos])), found


def csr_cells(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``m[rows, cols]`` cell by cell (any equal shapes) and whether each cell is stored, by a
    binary search of the (row, column) keys of a CSR with sorted columns: ``log(nnz)`` per cell,
    whatever the row lengths. Out-of-range cells read as not stored."""
    m = sp.csr_matrix(m)
    if not m.has_sorted_indices:
        m = m.sorted_indices()
    n_rows, n_cols = m.shape
    keys = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(m.indptr)) * n_cols + m.indices
    inside = (rows >= 0) & (rows < n_rows) & (cols >= 0) & (cols < n_cols)
    query = np.where(inside, rows, 0).astype(np.int64) * n_cols + np.where(inside, cols, 0)
    if not len(keys):
        return np.zeros(query.shape, m.dtype), np.zeros(query.shape, bool)
    pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    found = inside & (keys[pos] == query)
    return np.where(found, m.data[pos], 0), found


def lower_bound(keys: torch.Tensor, target: torch.Tensor, max_width: int) -> tuple[torch.Tensor, ...]:
    """For each ``target [B, k]``, the first slot of its row of ``keys [B, L]`` (sorted
    ascending) holding a key ``>= target`` (``L`` when none), and that key (the int64 maximum
    when none). A binary search with GatherElements only, so that it exports to ONNX. The
    exported graph's width is dynamic, so it takes ``max_width.bit_length()`` steps, enough for
    rows of up to ``max_width`` keys; eager calls take the width's own."""
    width = keys.shape[1]
    steps = max(max_width if exporting() else int(width), 1).bit_length()
    # A sentinel above every key closes each row, so a probe past the end reads "not below".
    keys = torch.cat([keys, torch.full_like(keys[:, :1], torch.iinfo(keys.dtype).max)], dim=1)
    # Uniform search: ``last`` is the last slot known to hold a key below the target (-1: none);
    # probing ``last + 2**s`` for s = steps-1 .. 0 reaches any count of keys below it up to
    # ``2**steps - 1`` (five graph nodes per step).
    last = torch.full_like(target, -1)
    for s in reversed(range(steps)):
        probe = last + (1 << s)
        below = keys.gather(1, probe.clamp(max=width)) < target
        last = torch.where(below, probe, last)
    pos = (last + 1).clamp(max=width)
    return pos, keys.gather(1, pos)
