"""``signature.json``: what a serving team needs to call an exported graph correctly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.io import atomic_write_json
from export.onnx_export import (
    MASKED_SCORE,
    OPSET,
    TOPK_INPUTS,
    TOPK_OUTPUTS,
    USER_ITEMS_INPUT,
    ExportSpecLike,
    TensorSpecLike,
    dtype_name,
)


def _tensor_signature(specs: Sequence[TensorSpecLike]) -> list[dict[str, Any]]:
    return [{"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for t in specs]


def graph_signature(spec: ExportSpecLike, file: str) -> dict[str, Any]:
    """How to call an extra graph exported beside model.onnx (``signature.json`` ``graphs``)."""
    return {
        "file": file,
        "opset": OPSET,
        "inputs": _tensor_signature(spec.inputs),
        "outputs": _tensor_signature(spec.outputs),
        "k": _resolve_k(spec, None),
        "notes": spec.notes,
    }


def _resolve_k(spec: ExportSpecLike, topk_k: int | None) -> int | None:
    if topk_k is not None:
        return topk_k
    return spec.topk if isinstance(spec.topk, int) and not isinstance(spec.topk, bool) else None


def write_signature(
    spec: ExportSpecLike,
    path: Path | str,
    extra: Mapping[str, Any],
    *,
    topk_k: int | None = None,
    model_file: str = "model.onnx",
    topk_file: str = "model_topk.onnx",
) -> Path:
    """Write ``signature.json``: what a serving team needs to call the graph correctly.

    ``extra`` must carry ``task`` and ``family`` (they live on TrainedModel, not on the spec) and
    may add anything else JSON-able (e.g. ``n_items``, ``sparse_fields``). Symbolic dims are
    strings. For task ``topk`` with a known K the top-K graph is described too.
    """
    missing = {"task", "family"} - set(extra)
    if missing:
        raise ValueError(f"write_signature: extra lacks {sorted(missing)}")
    k = _resolve_k(spec, topk_k)
    signature: dict[str, Any] = {
        "file": model_file,
        "opset": OPSET,
        "inputs": _tensor_signature(spec.inputs),
        "outputs": _tensor_signature(spec.outputs),
        "index_conventions": {
            "unknown_or_padding_index": 0,
            "vocabularies_fitted_on": "train rows only",
            "note": "Map an id absent from the training vocabulary to 0; histories are right-padded with 0.",
        },
        "fallback_rules": spec.notes,
        "topk_k": k,
        **extra,
    }
    if extra["task"] == "topk" and k is not None:
        n_items = spec.outputs[0].shape[-1]
        signature["topk"] = {
            "file": topk_file,
            "k": k,
            "inputs": [
                {"name": TOPK_INPUTS[0], "dtype": "int64", "shape": ["batch"]},
                {"name": TOPK_INPUTS[1], "dtype": "bool", "shape": ["batch", n_items]},
            ],
            "outputs": [
                {"name": TOPK_OUTPUTS[0], "dtype": "int64", "shape": ["batch", k]},
                {"name": TOPK_OUTPUTS[1], "dtype": "float32", "shape": ["batch", k]},
            ],
            "masked_score": MASKED_SCORE,
            "note": "seen_mask True = exclude. Seen items and index 0 score masked_score; drop such "
            "entries (they appear only when k exceeds the user's unseen items).",
        }
        if USER_ITEMS_INPUT in [t.name for t in spec.inputs]:
            signature["topk"]["user_items_from"] = TOPK_INPUTS[1]
            signature["topk"]["note"] += (
                f" The scorer also takes the user's item vector ({USER_ITEMS_INPUT}); this graph feeds "
                "it seen_mask, so seen_mask must hold the user's interactions (a new user's too: "
                "an unknown user_idx with a non-empty seen_mask is scored from those items)."
            )
    return atomic_write_json(path, signature)
