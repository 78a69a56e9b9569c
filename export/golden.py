"""Golden files: inputs and Python onnxruntime outputs, so another runtime can prove it scores the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_json
from export.runtime import OrtScorer


def _tensor_json(x: np.ndarray) -> dict[str, Any]:
    # tolist() turns float32 into the Python float with the same value, so the JSON round trip
    # is exact; non-finite values are rejected by atomic_write_json (JSON has no Infinity/NaN).
    return {"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tolist()}


def write_golden(onnx_path: Path | str, inputs: dict[str, np.ndarray], out_path: Path | str) -> Path:
    """Run ``onnx_path`` on ``inputs`` with Python onnxruntime and store both as ``out_path``."""
    outputs = OrtScorer(onnx_path).run(**inputs)
    return atomic_write_json(
        out_path,
        {
            "model": Path(onnx_path).name,
            "runtime": "onnxruntime (Python, CPUExecutionProvider)",
            "inputs": {name: _tensor_json(np.asarray(x)) for name, x in inputs.items()},
            "outputs": {name: _tensor_json(y) for name, y in outputs.items()},
        },
    )
