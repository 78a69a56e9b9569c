"""Export a family's scorer to a self-contained, checked ONNX file, plus its top-K graph and signature.

The contract is ``docs/MODEL_API.md``: a scorer is a ``torch.nn.Module`` in eval mode whose
``forward(*inputs)`` takes the inputs of ``export_spec().inputs`` in order. Specs are duck-typed
(anything with ``inputs``/``outputs`` of ``TensorSpec``-like objects with ``name``/``dtype``/
``shape``, ``example_inputs``, ``topk`` and ``notes``), so this module does not depend on
``models/`` and works with ``models.base.ExportSpec`` as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import torch
from torch.export import Dim

from common.io import fsync_dir, publishable_mode
from export import torch_registry

# Pinned so a torch upgrade cannot silently change the operator set the serving runtimes must
# support (torch 2.13 defaults to 20). 18 is torch 2.13's TORCHLIB_OPSET: the lowest opset the
# dynamo exporter builds graphs at directly; asking for less runs the version converter, which may
# fail or silently keep 18. The lowest native opset is the widest reach: every onnxruntime the
# handoff targets (>= 1.14, Python and Node) implements all of it, TopK with a dynamic batch included.
OPSET = 18

# ONNX protobufs cannot exceed 2 GiB; beyond that torch would spill weights into external data
# files, which breaks the "one self-contained model.onnx" handoff. A margin leaves room for the
# graph itself next to the weights.
MAX_INLINE_BYTES = 2**31 - 64 * 2**20

# Score given to items the top-K graph must never return (seen items, the padding column).
# The finite float32 minimum rather than -inf: it sorts below the padding column's -1e9, so
# ties between masked and padding entries cannot reorder results across runtimes, and it
# survives JSON (golden files, the Node handoff), which has no Infinity. A consumer drops
# entries whose score equals it (they only appear when K exceeds the unseen items).
MASKED_SCORE = float(np.finfo(np.float32).min)

TOPK_INPUTS = ("user_idx", "seen_mask")
TOPK_OUTPUTS = ("top_items", "top_scores")
# The second input of an item-vector topk scorer (cdae): the user's train items, float32
# [batch, n_items], 1 = seen. Its top-K graph feeds it ``seen_mask`` (see TopKScorer).
USER_ITEMS_INPUT = "user_items"

Exporter = Literal["dynamo", "legacy"]

_ONNX_ELEM_TYPES = {
    "int64": onnx.TensorProto.INT64,
    "float32": onnx.TensorProto.FLOAT,
    "bool": onnx.TensorProto.BOOL,
}


class ExportError(RuntimeError):
    """The scorer could not be turned into an ONNX file that honours its spec."""


class TensorSpecLike(Protocol):
    name: str
    dtype: Any
    shape: Sequence[int | str]


class ExportSpecLike(Protocol):
    inputs: Sequence[TensorSpecLike]
    outputs: Sequence[TensorSpecLike]
    example_inputs: Sequence[Any]
    topk: Any
    notes: Any


@dataclass(frozen=True)
class SimpleTensorSpec:
    """A TensorSpec for graphs this module builds itself (the top-K wrapper)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class SimpleExportSpec:
    inputs: tuple[SimpleTensorSpec, ...]
    outputs: tuple[SimpleTensorSpec, ...]
    example_inputs: tuple[torch.Tensor, ...]
    topk: int | None = None
    notes: Any = None


def dtype_name(dtype: Any) -> str:
    """``torch.int64`` / ``np.int64`` / ``"int64"`` -> ``"int64"``: specs may use any of them."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def _example_tensors(spec: ExportSpecLike) -> tuple[torch.Tensor, ...]:
    return tuple(
        x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in spec.example_inputs
    )


def _dynamic_axes(spec: ExportSpecLike) -> dict[str, dict[int, str]]:
    """``{tensor name: {axis: symbolic name}}`` for every string dim of the inputs and outputs
    (the legacy exporter's form of ``_dynamic_shapes``)."""
    return {
        t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)}
        for t in [*spec.inputs, *spec.outputs]
    }


def _dynamic_shapes(spec: ExportSpecLike) -> dict[str, dict[int, Dim]]:
    """One ``Dim`` per symbolic name, shared across inputs, so "batch" is one symbol everywhere.

    Any string dimension in the spec is dynamic; a dimension the model really fixes (n_items,
    n_fields) must be an int in the spec, otherwise torch.export reports a constraint violation.
    """
    dims: dict[str, Dim] = {}
    shapes: dict[str, dict[int, Dim]] = {}
    for t in spec.inputs:
        shapes[t.name] = {
            axis: dims.setdefault(d, Dim(d)) for axis, d in enumerate(t.shape) if isinstance(d, str)
        }
    return shapes


def _check_weights_fit(scorer: torch.nn.Module) -> None:
    size = sum(t.numel() * t.element_size() for t in [*scorer.parameters(), *scorer.buffers()])
    if size > MAX_INLINE_BYTES:
        raise ExportError(
            f"scorer holds {size / 2**30:.2f} GiB of weights; a self-contained ONNX file is limited to "
            "2 GiB (protobuf). Shrink the embeddings (fewer rows, smaller dim, float16) or extend the "
            "handoff to ship external data explicitly."
        )


@contextlib.contextmanager
def _quiet_torch_onnx_logs() -> Iterator[None]:
    """The dynamo exporter logs a WARNING per missing torchvision op on every export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torch_export(
    scorer: torch.nn.Module,
    spec: ExportSpecLike,
    tmp: Path,
    exporter: Exporter,
) -> None:
    args = _example_tensors(spec)
    input_names = [t.name for t in spec.inputs]
    output_names = [t.name for t in spec.outputs]
    with warnings.catch_warnings(), _quiet_torch_onnx_logs():
        # Both exporters narrate (deprecation of the legacy path, axis renaming, torchvision
        # absent); the checks below are the real verdict, so keep test and asset logs readable.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            options = {"dynamo": True, "dynamic_shapes": _dynamic_shapes(spec), "external_data": False,
                       "verbose": False}  # fmt: skip
        else:
            # Legacy TorchScript tracing: only for a family whose forward uses an op that
            # torch.export cannot capture or onnxscript cannot translate, but that has a
            # TorchScript symbolic (or a torch.jit.ScriptModule scorer). Tracing records
            # one path through Python control flow, so such a forward must be branch-free on
            # data; the parity gate's unknown-id / history cases are what catch a wrong trace.
            options = {"dynamo": False, "dynamic_axes": _dynamic_axes(spec)}
        dynamo = exporter == "dynamo"
        with torch_registry.shared_torchlib_registry() if dynamo else contextlib.nullcontext():
            torch.onnx.export(scorer, args, str(tmp), input_names=input_names, output_names=output_names,
                              opset_version=OPSET, **options)  # fmt: skip


def _validate(model: onnx.ModelProto, spec: ExportSpecLike, path: Path) -> None:
    """The file must be what the spec promises: names, dtypes, symbolic axes, inline weights."""
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(
                f"{path}: initializer {init.name!r} uses external data; the handoff needs one file"
            )
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise ExportError(f"{path}: default-domain opset is {opsets}, expected {OPSET}")
    for kind, values, specs in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        got = [v.name for v in values]
        want = [t.name for t in specs]
        if got != want:
            raise ExportError(f"{path}: {kind} names {got} differ from the spec's {want}")
        for v, t in zip(values, specs):
            elem = _ONNX_ELEM_TYPES.get(dtype_name(t.dtype))
            if elem is not None and v.type.tensor_type.elem_type != elem:
                found = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
                raise ExportError(f"{path}: {kind} {t.name!r} is {found}, spec says {dtype_name(t.dtype)}")
            dims = v.type.tensor_type.shape.dim
            for axis, d in enumerate(t.shape):
                if isinstance(d, str) and axis < len(dims) and dims[axis].HasField("dim_value"):
                    raise ExportError(
                        f"{path}: {kind} {t.name!r} axis {axis} ({d!r}) was exported as the fixed size "
                        f"{dims[axis].dim_value}: the scorer's forward depends on that size (a Python "
                        "int from .shape/.item(), a loop over it, or a reshape with a literal). Use "
                        "shape-agnostic ops (reshape(-1, ...), sum over the axis, masks) instead."
                    )


def _constant_slopes_to_leaky_relu(model: onnx.ModelProto) -> int:
    """Rewrite ``PRelu(x, slope)`` whose slope is one constant number as ``LeakyRelu(x, alpha)``.

    A trained ``nn.PReLU()`` (one slope) is a LeakyReLU once frozen, and both compute
    ``x < 0 ? slope * x : x`` with the same float32 multiply, so the scores do not change.
    onnxruntime runs PRelu through its generic broadcasting kernel (DIN's activation unit spent
    more time there than in the Gemm before it), but runs LeakyRelu vectorised and fuses it into
    the preceding Gemm. Returns the number of nodes rewritten.
    """
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    slopes: set[str] = set()
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            continue
        slope = constants.get(node.input[1])
        if slope is None or slope.data_type != onnx.TensorProto.FLOAT or int(np.prod(slope.dims)) != 1:
            continue
        alpha = float(numpy_helper.to_array(slope).reshape(()))
        node.CopyFrom(onnx.helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name,
                                            alpha=alpha))  # fmt: skip
        slopes.add(slope.name)
        rewritten += 1
    # Drop the slopes nothing reads any more (onnxruntime warns about each unused initializer).
    used = {name for node in _all_nodes(model.graph) for name in node.input}
    unused = slopes - used - {o.name for o in model.graph.output}
    if unused:
        keep = [init for init in model.graph.initializer if init.name not in unused]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return rewritten


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs its If/Loop/Scan nodes hold."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def export_onnx(
    scorer: torch.nn.Module,
    spec: ExportSpecLike,
    path: Path | str,
    *,
    exporter: Exporter = "dynamo",
) -> Path:
    """Export ``scorer`` to ``path`` (atomically) and return it.

    Dynamic axes: every string dimension of ``spec.inputs`` ("batch", "history", ...). The file
    is checked with ``onnx.checker.check_model(full_check=True)`` (which also runs strict shape
    inference) and against the spec before it replaces ``path``; nothing half-written is ever
    visible at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_weights_fit(scorer)
    scorer.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    publishable_mode(fd)  # torch writes into this file in place: it keeps the mode
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _torch_export(scorer, spec, tmp, exporter)
        except Exception as e:  # torch raises many types; give the family one clear message
            raise ExportError(
                f"torch.onnx.export ({exporter}) failed for {type(scorer).__name__} -> {path}: {e}"
            ) from e
        model = onnx.load(str(tmp), load_external_data=False)
        if _constant_slopes_to_leaky_relu(model):
            onnx.save(model, str(tmp))
        _validate(model, spec, path)
        onnx.checker.check_model(model, full_check=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def takes_user_items(spec: ExportSpecLike) -> bool:
    """Which of the two ``topk`` scorer layouts ``spec`` has: ``(user_idx)`` -> False,
    ``(user_idx, user_items)`` (an item-vector scorer such as cdae) -> True."""
    names = tuple(t.name for t in spec.inputs)
    if names == TOPK_INPUTS[:1]:
        return False
    if names == (TOPK_INPUTS[0], USER_ITEMS_INPUT):
        return True
    raise ExportError(
        f"a topk scorer takes ({TOPK_INPUTS[0]}) or ({TOPK_INPUTS[0]}, {USER_ITEMS_INPUT}); this spec "
        f"has {list(names)}: rename its inputs or export it without a top-K graph (topk=None)"
    )


class TopKScorer(torch.nn.Module):
    """Wraps a top-K scorer: masks seen items and the padding column, returns the best ``k``.

    The masking lives in the graph so every runtime excludes the same items the evaluation
    excluded; the caller only supplies ``seen_mask`` (True = already interacted with in train).
    Pass the scorer's ``spec``: when it takes ``user_items`` as well, the graph feeds it
    ``seen_mask`` as float32 (the seen items are the user's item vector). That choice is made
    here, once, so the exported graph has no branch on data.
    """

    def __init__(self, scorer: torch.nn.Module, k: int, spec: ExportSpecLike | None = None) -> None:
        super().__init__()
        self.scorer = scorer
        self.k = k
        self.feeds_user_items = spec is not None and takes_user_items(spec)

    def forward(self, user_idx: torch.Tensor, seen_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feeds_user_items:
            scores = self.scorer(user_idx, seen_mask.to(torch.float32))
        else:
            scores = self.scorer(user_idx)
        # A row mask built from arange keeps the graph free of shape-dependent Python ints.
        padding = torch.arange(scores.shape[1], device=scores.device) == 0
        scores = scores.masked_fill(seen_mask | padding, MASKED_SCORE)
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return top_items, top_scores


def _n_items(scorer: torch.nn.Module, spec: ExportSpecLike) -> int:
    """Catalogue width: from the spec's output shape if it is fixed, else from one example run."""
    width = spec.outputs[0].shape[-1]
    if isinstance(width, int):
        return width
    with torch.no_grad():
        return int(scorer(*_example_tensors(spec)).shape[1])


def topk_spec(scorer: torch.nn.Module, spec: ExportSpecLike, k: int) -> SimpleExportSpec:
    """The spec of the top-K graph built on a ``topk`` scorer with this ``spec``."""
    n_items = _n_items(scorer, spec)
    if not 1 <= k <= n_items:
        raise ExportError(f"top-K k={k} must be in [1, n_items={n_items}]")
    examples = _example_tensors(spec)
    user_idx = examples[0]
    if takes_user_items(spec):  # the example item vectors double as the example seen items
        seen_mask = examples[1] > 0
        notes = f"{spec.notes}; top-K graph: seen_mask is also the scorer's {USER_ITEMS_INPUT}"
    else:
        seen_mask = torch.zeros((user_idx.shape[0], n_items), dtype=torch.bool)
        notes = spec.notes
    return SimpleExportSpec(
        inputs=(
            SimpleTensorSpec(TOPK_INPUTS[0], "int64", ("batch",)),
            SimpleTensorSpec(TOPK_INPUTS[1], "bool", ("batch", n_items)),
        ),
        outputs=(
            SimpleTensorSpec(TOPK_OUTPUTS[0], "int64", ("batch", k)),
            SimpleTensorSpec(TOPK_OUTPUTS[1], "float32", ("batch", k)),
        ),
        example_inputs=(user_idx, seen_mask),
        topk=k,
        notes=notes,
    )


def export_topk_onnx(
    scorer: torch.nn.Module,
    spec: ExportSpecLike,
    k: int,
    path: Path | str,
    *,
    exporter: Exporter = "dynamo",
) -> Path:
    """Export the top-K graph (``user_idx``, ``seen_mask`` -> ``top_items``, ``top_scores``)."""
    wrapped = TopKScorer(scorer, k, spec).eval()
    path = export_onnx(wrapped, topk_spec(scorer, spec, k), path, exporter=exporter)
    if not any(node.op_type == "TopK" for node in onnx.load(str(path)).graph.node):
        raise ExportError(f"{path}: top-K graph has no TopK node; the exporter rewrote torch.topk")
    return path
