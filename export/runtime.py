"""onnxruntime scoring for evaluation: the same runtime and file the serving teams get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

# What onnxruntime raises for an unreadable model: a truncated protobuf is InvalidProtobuf,
# garbage bytes may surface as Fail or InvalidGraph depending on where parsing stops.
_LOAD_ERRORS = (
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.NoSuchFile,
    ort_errors.RuntimeException,
)

_ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(bool)": np.bool_}


class ModelFileError(RuntimeError):
    """A model file is missing, corrupt, or does not match its signature.json."""


def _per_row_factor(dim: onnx.TensorShapeProto.Dimension, row_axis: str, per_axes: tuple[str, ...]):
    """``(factor, holds the row axis)`` of one dimension, or None when its size is unknown.
    Symbolic sizes may be products (``batch*history``, ``1678*batch``) after a flatten."""
    if dim.HasField("dim_value"):
        return dim.dim_value, False
    factor, has_row = 1, False
    for token in (dim.dim_param or "?").replace(" ", "").split("*"):
        if token.isdigit():
            factor *= int(token)
        elif token == row_axis:
            has_row = True
        elif token not in per_axes:
            return None
    return factor, has_row


def _row_bytes(value: onnx.ValueInfoProto, row_axis: str, per_axes: tuple[str, ...]) -> int:
    """Bytes of one row (and one unit of each of ``per_axes``) of the tensor ``value``; 0 when
    it does not grow with ``row_axis`` or its size is unknown (data-dependent)."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or tensor.elem_type == onnx.TensorProto.UNDEFINED:
        return 0
    count, has_row = 1, False
    for dim in tensor.shape.dim:
        factor = _per_row_factor(dim, row_axis, per_axes)
        if factor is None:
            return 0
        count, has_row = count * factor[0], has_row or factor[1]
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize if has_row else 0


def _names_read(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, with those its subgraphs (If, Loop, Scan) read from outside."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                names |= _names_read(inner)
    return names - {""}


def graph_bytes_per_row(
    model: onnx.ModelProto, row_axis: str = "batch", per_axes: tuple[str, ...] = ()
) -> int:
    """Peak bytes, for one row and one unit of each of ``per_axes`` (e.g. one history slot), of
    the tensors of ``model`` that grow with ``row_axis`` and are alive at once when its nodes run
    in file order (topological, as ONNX requires): the graph's inputs until their last reader,
    each node's outputs from that node to their last reader, the graph's outputs to the end.

    This is onnxruntime's own plan without its in-place reuse and fusions (which only lower it),
    so it bounds what a call needs from a memory budget without counting every intermediate
    as if all were alive at once: that sum was 58.6 MB a user for emb_knn's top-K graph at 59k
    items, where the live peak is a few score rows. Tensors with a size onnx cannot infer
    (data-dependent) are left out.
    """
    if len(model.graph.value_info) == 0:
        model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    size = {v.name: _row_bytes(v, row_axis, per_axes) for v in values}
    kept = {v.name for v in graph.output}
    reads = [_names_read(node) for node in graph.node]
    last_read: dict[str, int] = {}
    for step, names in enumerate(reads):
        for name in names:
            last_read[name] = step
    live = sum(size.get(v.name, 0) for v in graph.input)
    peak = live
    for step, node in enumerate(graph.node):
        made = [name for name in node.output if name]
        live += sum(size.get(name, 0) for name in made)
        peak = max(peak, live)
        dead = {name for name in reads[step] if last_read[name] == step}
        dead |= {name for name in made if name not in last_read}  # never read: freed at once
        live -= sum(size.get(name, 0) for name in dead - kept)
    return peak


def _producer(path: Path) -> str:
    """Which run wrote the file, from lineage.json beside it (the ONNX itself may be unreadable)."""
    lineage = path.parent / "lineage.json"
    try:
        info = json.loads(lineage.read_text())
        return (
            f"family={info.get('family')} version={info.get('version')} created_at={info.get('created_at')} "
            f"(from {lineage})"
        )
    except (OSError, ValueError):
        return "unknown (no readable lineage.json beside it)"


def _signature_inputs(path: Path) -> list[str] | None:
    signature = path.parent / "signature.json"
    if not signature.exists():
        return None
    sig = json.loads(signature.read_text())
    topk = sig.get("topk") or {}
    block = topk if topk.get("file") == path.name else sig
    return [t["name"] for t in block["inputs"]]


class OrtScorer:
    """Loads ``path`` once (CPU provider) and scores dicts of numpy arrays in batches."""

    def __init__(self, path: Path | str, batch_size: int = 4096) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise ModelFileError(f"model file {self.path} does not exist; re-run the export that writes it")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except _LOAD_ERRORS as e:
            raise ModelFileError(
                f"model file {self.path} is corrupt or truncated and onnxruntime cannot load it ({e}). "
                f"Produced by: {_producer(self.path)}. Re-run that export (and promotion) to rewrite it."
            ) from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in self.session.get_inputs()}
        self._row_bytes: dict[tuple[str, ...], int] = {}
        expected = _signature_inputs(self.path)
        if expected is not None and expected != self.input_names:
            raise ModelFileError(
                f"model file {self.path} takes inputs {self.input_names} but signature.json beside it "
                f"declares {expected}: the folder mixes two exports; re-export it"
            )

    def _check(self, inputs: dict[str, np.ndarray]) -> int:
        missing = set(self.input_names) - set(inputs)
        extra = set(inputs) - set(self.input_names)
        if missing or extra:
            raise ValueError(
                f"{self.path.name}: missing inputs {sorted(missing)}, unexpected {sorted(extra)}"
            )
        rows = {name: len(x) for name, x in inputs.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"{self.path.name}: inputs have different batch sizes {rows}")
        for name, x in inputs.items():
            want = self._dtypes[name]
            if want is not None and x.dtype != want:
                # No silent casts: an int32 id or float64 feature is a bug upstream of scoring.
                raise ValueError(
                    f"{self.path.name}: input {name!r} is {x.dtype}, the graph takes {np.dtype(want)}"
                )
        return next(iter(rows.values()))

    def bytes_per_row(self, *per_axes: str) -> int:
        """What one row of a call costs in memory (``graph_bytes_per_row``), per unit of each of
        ``per_axes`` (e.g. ``"history"``: per history slot). Read from the file once."""
        key = tuple(per_axes)
        if key not in self._row_bytes:
            self._row_bytes[key] = graph_bytes_per_row(onnx.load(str(self.path)), "batch", key)
        return self._row_bytes[key]

    def run(self, **inputs: Any) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(x) for name, x in inputs.items()}
        n = self._check(arrays)
        starts = range(0, n, self.batch_size) if n else [0]
        parts = [
            self.session.run(None, {k: v[s : s + self.batch_size] for k, v in arrays.items()}) for s in starts
        ]
        if len(parts) == 1:  # no copy: a scorer's output may be most of a memory budget
            return dict(zip(self.output_names, parts[0]))
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(self.output_names)}
