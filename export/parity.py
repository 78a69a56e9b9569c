"""Parity gate: the ONNX file must score like the torch scorer before anyone evaluates or ships it.

Evaluation runs onnxruntime only, so a graph that drifted from torch (a wrong trace, a
specialised axis, a weight changed after export) would be measured and handed off silently.
The gate runs both on cases that hit the edges the contract names (batch 1, a large batch,
unknown ids, empty/full/longer-than-example histories) and ``require_parity`` raises on any
failure; the orchestration calls it before the evaluate and promote steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import USER_ITEMS_INPUT, ExportSpecLike, TensorSpecLike, dtype_name

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
HISTORY_AXIS = "history"
# The batch case's rows: 257 (odd, not a power of two, so a dynamic batch axis is proven), fewer
# where each row's output is wide. A user's scores over a 59k-item catalogue through an MLP tower
# made the 257-row case hold ~19 GiB across torch and onnxruntime at ML-25M shape; rows x output
# cells stay within PARITY_CELLS (257 rows up to 8,160 items, so the default data keeps 257).
PARITY_BATCH = 257
PARITY_CELLS = 1 << 21

Cases = Mapping[str, tuple[np.ndarray, ...]]


class ParityError(RuntimeError):
    """onnxruntime and torch disagree beyond the stated tolerance: do not evaluate or ship."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    batch: int
    max_abs_diff: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    cases: list[CaseResult]
    atol: float
    rtol: float
    onnx_path: str
    rule: str = field(default="|ort - torch| <= atol + rtol * |torch| elementwise; integer outputs exact")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torch_outputs(scorer: torch.nn.Module, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = scorer(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def _compare(ort_out: np.ndarray, torch_out: np.ndarray, atol: float, rtol: float) -> tuple[float, bool, str]:
    """Max |diff| and the verdict for one output; NaN anywhere is a failure (a scorer bug)."""
    if ort_out.shape != torch_out.shape:
        return float("inf"), False, f"shape {ort_out.shape} vs torch {torch_out.shape}"
    if ort_out.size == 0:
        return 0.0, True, ""
    if np.issubdtype(torch_out.dtype, np.integer) or torch_out.dtype == np.bool_:
        diff = np.abs(ort_out.astype(np.int64) - torch_out.astype(np.int64))
        worst = float(diff.max())
        return worst, worst == 0, "" if worst == 0 else "integer outputs differ"
    a, b = ort_out.astype(np.float64), torch_out.astype(np.float64)
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan"), False, "NaN in output"
    same = a == b  # covers equal infinities, where a - b would be NaN
    diff = np.where(same, 0.0, np.abs(a - b))
    ok = bool(np.all(same | (diff <= atol + rtol * np.abs(b))))
    return float(diff.max()), ok, ""


def _compare_topk_items(
    ort_items: np.ndarray, torch_items: np.ndarray, torch_scores: np.ndarray, atol: float, rtol: float
) -> tuple[float, bool, str]:
    """Top-K indices may differ only inside runs of tied scores: TopK's order among equal
    scores is a runtime detail (torch and onnxruntime break ties differently), while the
    scores themselves are compared exactly like any float output. The last position counts
    as tied too: its run of equal scores may continue past K, where neither runtime shows it."""
    if ort_items.shape != torch_items.shape:
        return float("inf"), False, f"shape {ort_items.shape} vs torch {torch_items.shape}"
    differ = ort_items != torch_items
    if not differ.any():
        return 0.0, True, ""
    s = torch_scores.astype(np.float64)
    tol = atol + rtol * np.abs(s)
    tied_prev = np.zeros_like(differ)
    tied_next = np.zeros_like(differ)
    tied_prev[:, 1:] = np.abs(s[:, 1:] - s[:, :-1]) <= tol[:, 1:]
    tied_next[:, :-1] = np.abs(s[:, :-1] - s[:, 1:]) <= tol[:, :-1]
    tied_next[:, -1] = True
    untied = differ & ~(tied_prev | tied_next)
    worst = float(np.abs(ort_items.astype(np.int64) - torch_items.astype(np.int64))[untied].max(initial=0))
    if untied.any():
        return worst, False, "top_items differ where scores are not tied"
    return 0.0, True, f"{int(differ.sum())} positions differ only among tied scores"


def parity_gate(
    scorer: torch.nn.Module,
    onnx_path: Path | str,
    cases: Cases,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ParityReport:
    """Run every case through onnxruntime (CPU) and torch; inputs are in the graph's input order."""
    scorer.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = []
    for case, arrays in cases.items():
        if len(arrays) != len(names):
            raise ValueError(f"parity case {case!r} has {len(arrays)} arrays; the graph takes {names}")
        ort_outs = session.run(None, dict(zip(names, arrays)))
        torch_outs = _torch_outputs(scorer, arrays)
        worst, ok, details = 0.0, len(ort_outs) == len(torch_outs), []
        out_names = [o.name for o in session.get_outputs()]
        for out_name, o, t in zip(out_names, ort_outs, torch_outs):
            if out_name == "top_items" and "top_scores" in out_names:
                scores = torch_outs[out_names.index("top_scores")]
                diff, good, detail = _compare_topk_items(o, t, scores, atol, rtol)
            else:
                diff, good, detail = _compare(o, t, atol, rtol)
            worst = diff if np.isnan(diff) else max(worst, diff)
            ok = ok and good
            if not good:
                details.append(f"{out_name}: {detail or 'beyond tolerance'}")
        batch = int(arrays[0].shape[0]) if arrays else 0
        results.append(CaseResult(case, batch, worst, ok, "; ".join(details)))
    return ParityReport(
        passed=all(r.passed for r in results) and bool(results),
        cases=results,
        atol=atol,
        rtol=rtol,
        onnx_path=str(onnx_path),
    )


def require_parity(report: ParityReport) -> ParityReport:
    """Raise ``ParityError`` listing the failing cases; return the report when it passed."""
    if report.passed:
        return report
    failing = [c for c in report.cases if not c.passed]
    lines = "\n".join(
        f"  - {c.name} (batch {c.batch}): max |diff| {c.max_abs_diff:.3g} {c.detail}".rstrip()
        for c in failing
    )
    raise ParityError(
        f"ONNX parity failed for {report.onnx_path} (atol={report.atol:g}, rtol={report.rtol:g}):\n"
        f"{lines or '  no cases were run'}\n"
        "The file does not score like the trained scorer: do not evaluate or promote it; re-export "
        "from the current weights and fix the scorer if it keeps failing."
    )


# --- standard cases -------------------------------------------------------------------------


def _default_cardinality(name: str, n_items: int, n_users: int) -> int:
    """Item-like inputs (item_idx, history, hist_item_idx) index items; user_idx indexes users."""
    if name.startswith("user"):
        return n_users
    if "item" in name or name == HISTORY_AXIS:
        return n_items
    raise ValueError(f"no cardinality for index input {name!r}: pass cardinalities={{{name!r}: ...}}")


def _example_length(spec: ExportSpecLike, axis_name: str, default: int = 8) -> int:
    for t, x in zip(spec.inputs, spec.example_inputs):
        if axis_name in t.shape:
            return int(np.asarray(x).shape[list(t.shape).index(axis_name)])
    return default


@dataclass(frozen=True)
class _CaseShape:
    batch: int
    history: int  # length of the "history" axis
    history_fill: str  # "random" (random lengths, right-padded), "empty", "full"
    unknown: bool  # every index input 0


def _index_array(
    t: TensorSpecLike, shape: tuple[int, ...], card: int | Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    if isinstance(card, int):
        return rng.integers(1, max(card, 2), size=shape, dtype=np.int64)
    cards = np.asarray(card, dtype=np.int64)  # per-column cardinalities, e.g. sparse [B, F]
    if shape[-1] != len(cards):
        raise ValueError(f"{t.name}: {len(cards)} cardinalities for {shape[-1]} columns")
    return (rng.integers(0, 2**62, size=shape, dtype=np.int64) % np.maximum(cards - 1, 1)) + 1


def _history_mask(batch: int, length: int, fill: str, rng: np.random.Generator) -> np.ndarray:
    """True where a history slot holds an event; right-padded like Snapshot.ctr()."""
    if fill == "empty":
        lengths = np.zeros(batch, dtype=np.int64)
    elif fill == "full":
        lengths = np.full(batch, length, dtype=np.int64)
    else:
        lengths = rng.integers(0, length + 1, size=batch)
    return np.arange(length)[None, :] < lengths[:, None]


def _build_case(
    spec: ExportSpecLike,
    fixed: Mapping[str, int],
    cardinalities: Mapping[str, int | Sequence[int]],
    case: _CaseShape,
    rng: np.random.Generator,
) -> tuple[np.ndarray, ...]:
    sizes = {"batch": case.batch, HISTORY_AXIS: case.history, **fixed}
    mask = _history_mask(case.batch, case.history, case.history_fill, rng)
    arrays = []
    for t in spec.inputs:
        try:
            shape = tuple(d if isinstance(d, int) else sizes[d] for d in t.shape)
        except KeyError as e:
            raise ValueError(f"input {t.name!r}: no size for axis {e}; pass it in fixed_dims") from e
        kind = dtype_name(t.dtype)
        if kind == "int64":
            x = (
                np.zeros(shape, np.int64)
                if case.unknown
                else _index_array(t, shape, cardinalities[t.name], rng)
            )
        elif kind == "bool":  # seen_mask: about one item in ten already seen
            x = rng.random(shape) < 0.1
        elif t.name == USER_ITEMS_INPUT:  # a user's item vector: binary like seen_mask, item 0 never seen
            x = (rng.random(shape) < 0.1).astype(dtype_name(t.dtype))
            x[:, 0] = 0
            if case.unknown:  # even rows empty (the popularity fallback), odd rows a new user's items
                x[::2] = 0
        else:
            x = rng.normal(size=shape).astype(dtype_name(t.dtype))
        if tuple(t.shape)[1:] == (HISTORY_AXIS,):
            x = np.where(mask, x, np.zeros((), x.dtype))  # padding slots are 0, values too
        arrays.append(x)
    return tuple(arrays)


def parity_batch(spec: ExportSpecLike, cells: int = PARITY_CELLS) -> int:
    """Rows of the batch case: PARITY_BATCH, or the largest odd count whose outputs (the static
    dimensions after the batch, summed over outputs) stay within ``cells``; at least 3."""
    width = 0
    for out in spec.outputs:
        size = 1
        for dim in out.shape[1:]:
            size *= dim if isinstance(dim, int) else 1
        width += size
    rows = min(PARITY_BATCH, max(3, cells // max(width, 1)))
    return rows if rows % 2 else rows - 1


def standard_cases(
    spec: ExportSpecLike,
    n_items: int,
    n_users: int,
    rng: np.random.Generator,
    cardinalities: Mapping[str, int | Sequence[int]] | None = None,
    *,
    batch_n: int = PARITY_BATCH,
    fixed_dims: Mapping[str, int] | None = None,
) -> dict[str, tuple[np.ndarray, ...]]:
    """The cases the export contract requires, built from the spec's inputs.

    Valid ids are drawn from ``[1, cardinality)``: ``cardinalities[name]`` (an int, or for a
    ``[B, F]`` input such as ``sparse`` one int per column), defaulting to ``n_users`` for
    ``user*`` inputs and ``n_items`` for item-like ones. Float inputs are standard normal,
    bool inputs (``seen_mask``) true one time in ten, and ``user_items`` (an item-vector
    scorer's float input) is 0/1 the same way; in the unknown-ids case its even rows are empty
    (an unknown user with no items) and its odd rows are not (a new user scored from items).
    Inputs with a ``history`` axis (``[B, L]``) are right-padded with 0; they add an empty, a
    full, and a longer-than-example history case (the last proves the dynamic sequence axis).
    ``fixed_dims`` sizes any other symbolic axis.
    """
    cards: dict[str, int | Sequence[int]] = {}
    for t in spec.inputs:
        if dtype_name(t.dtype) == "int64":
            cards[t.name] = (cardinalities or {}).get(t.name) or _default_cardinality(
                t.name, n_items, n_users
            )
    length = _example_length(spec, HISTORY_AXIS)
    shapes = {
        "batch_1": _CaseShape(1, length, "random", False),
        f"batch_{batch_n}": _CaseShape(batch_n, length, "random", False),
        "unknown_ids": _CaseShape(16, length, "random", True),
    }
    if any(HISTORY_AXIS in t.shape for t in spec.inputs):
        shapes["empty_history"] = _CaseShape(16, length, "empty", False)
        shapes["full_history"] = _CaseShape(16, length, "full", False)
        shapes["long_history"] = _CaseShape(16, 3 * length + 5, "random", False)
    fixed = dict(fixed_dims or {})
    return {name: _build_case(spec, fixed, cards, shape, rng) for name, shape in shapes.items()}
