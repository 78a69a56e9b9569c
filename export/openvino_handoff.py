"""Handoff proof with a second, independent runtime: OpenVINO scores every registry model's golden batch.

OpenVINO (Intel's serving runtime) reads ONNX with its own frontend and CPU kernels, so a
model it scores like Python onnxruntime is standard ONNX, not something only onnxruntime
accepts. Different kernels round differently (fused multiply-adds, other summation orders,
approximate exp/sigmoid), so outputs are compared with a stated tolerance:

    |openvino - onnxruntime| <= ATOL + RTOL * |onnxruntime|   (float outputs)
    integer outputs (top-K indices) equal

    python -m export.openvino_handoff $RECSYS_HOME/registry

prints one JSON line per family (``{family, version, max_abs_diff, passed}`` or
``{family, error}``) and exits 1 if any family failed or could not be loaded: a family is
never skipped silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ATOL = 1e-4
RTOL = 1e-4
# OpenVINO's CPU plugin runs in bf16 by default on CPUs with bf16 units (this machine's do):
# logits then differ by ~1e-2, which is a precision choice, not a graph problem. Serving teams
# that need onnxruntime's numbers ask for f32 explicitly, as here.
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def _current(registry: Path, family: str) -> Path:
    pointer = registry / family / "CURRENT"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} is missing: {family} has no blessed version in {registry}")
    return registry / family / pointer.read_text().strip()


def score_golden(model_dir: Path, core=None) -> dict[str, Any]:
    """Run ``model_dir/model.onnx`` in OpenVINO on ``golden.json``'s inputs and compare the outputs."""
    import openvino as ov

    core = core or ov.Core()
    golden = json.loads((model_dir / "golden.json").read_text())
    compiled = core.compile_model(core.read_model(str(model_dir / "model.onnx")), "CPU", COMPILE_CONFIG)
    feeds = {}
    for port in compiled.inputs:
        name = port.get_any_name()
        if name not in golden["inputs"]:
            raise KeyError(f"{model_dir / 'golden.json'} has no input {name!r}")
        spec = golden["inputs"][name]
        feeds[name] = np.asarray(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"])
    result = compiled(feeds)
    worst, passed, details = 0.0, True, []
    for port in compiled.outputs:
        name = port.get_any_name()
        want_spec = golden["outputs"].get(name)
        if want_spec is None:
            raise KeyError(f"{model_dir / 'golden.json'} has no output {name!r}")
        got = np.asarray(result[port])
        want = np.asarray(want_spec["data"], dtype=want_spec["dtype"]).reshape(want_spec["shape"])
        if got.shape != want.shape:
            passed = False
            details.append(f"{name}: shape {got.shape} vs {want.shape}")
            continue
        if np.issubdtype(want.dtype, np.integer):
            ok = bool(np.array_equal(got.astype(np.int64), want.astype(np.int64)))
            diff = 0.0 if ok else float(np.abs(got.astype(np.int64) - want.astype(np.int64)).max())
        else:
            g, w = got.astype(np.float64), want.astype(np.float64)
            diff = float(np.abs(g - w).max()) if g.size else 0.0
            ok = bool(np.all(np.abs(g - w) <= ATOL + RTOL * np.abs(w)))
        worst = max(worst, diff)
        if not ok:
            passed = False
            details.append(f"{name}: max |diff| {diff:.3g} beyond tolerance")
    return {"max_abs_diff": worst, "passed": passed, "detail": "; ".join(details)}


def score_registry(registry: Path | str) -> list[dict[str, Any]]:
    """One result per family folder of the registry (a folder with a CURRENT pointer or none)."""
    import openvino as ov

    registry = Path(registry)
    core = ov.Core()
    results = []
    for folder in sorted(p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")):
        family = folder.name
        try:
            version_dir = _current(registry, family)
            results.append({"family": family, "version": version_dir.name, **score_golden(version_dir, core)})
        except Exception as exc:  # report any load/compile/run failure by family, never skip
            results.append({"family": family, "passed": False, "error": f"{type(exc).__name__}: {exc}"})
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m export.openvino_handoff <registry-dir>", file=sys.stderr)
        return 2
    results = score_registry(args[0])
    for line in results:
        print(json.dumps(line))
    return 0 if results and all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
