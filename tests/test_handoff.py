"""Handoff proof: onnxruntime-node scores every registry model like Python onnxruntime.

Nothing here is skipped: a machine without node/npm fails with a message saying what to install,
because this test is the evidence the serving teams rely on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import _tool
from test_export import N_ITEMS, N_USERS, TOYS, K

from export.golden import write_golden
from export.onnx_export import export_onnx, export_topk_onnx, topk_spec
from export.parity import standard_cases

TOLERANCE = 1e-5


def _publish(registry: Path, family: str, onnx_source: Path, inputs: dict[str, np.ndarray]) -> None:
    version_dir = registry / family / "v1"
    version_dir.mkdir(parents=True)
    shutil.copy(onnx_source, version_dir / "model.onnx")
    write_golden(version_dir / "model.onnx", inputs, version_dir / "golden.json")
    (registry / family / "CURRENT").write_text("v1\n")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported toy per task (and the top-K graph), each with a golden.json beside it."""
    root = tmp_path_factory.mktemp("registry_build")
    registry = root / "registry"
    rng = np.random.default_rng(3)
    for name, toy in TOYS.items():
        path = export_onnx(toy.scorer, toy.spec, root / name / "model.onnx")
        cases = standard_cases(toy.spec, N_ITEMS, N_USERS, rng, toy.cardinalities, batch_n=33)
        inputs = dict(zip([t.name for t in toy.spec.inputs], cases["batch_33"]))
        if name == "topk":  # column 0 is -1e9: JSON-safe, and part of what must match
            inputs["user_idx"][:3] = 0  # unknown users score by popularity
        _publish(registry, f"toy_{name}", path, inputs)
    toy = TOYS["topk"]
    spec = topk_spec(toy.scorer, toy.spec, K)
    path = export_topk_onnx(toy.scorer, toy.spec, K, root / "topk" / "model_topk.onnx")
    cases = standard_cases(spec, N_ITEMS, N_USERS, rng, batch_n=33)
    _publish(registry, "toy_topk_graph", path, dict(zip(["user_idx", "seen_mask"], cases["batch_33"])))
    return registry


def _score(handoff_dir: Path, registry: Path) -> tuple[int, list[dict]]:
    result = subprocess.run(
        [_tool("node"), "score.mjs", str(registry)],
        cwd=handoff_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines or result.returncode == 0, result.stderr
    return result.returncode, lines


def test_node_scores_match_python(handoff_dir: Path, registry: Path) -> None:
    code, lines = _score(handoff_dir, registry)
    by_family = {line["family"]: line for line in lines}
    families = sorted(p.name for p in registry.iterdir())
    assert sorted(by_family) == families and len(families) == 5
    assert code == 0, [line for line in lines if "error" in line]
    for family, line in by_family.items():
        golden = json.loads((registry / family / "v1" / "golden.json").read_text())
        assert set(line["outputs"]) == set(golden["outputs"]), family
        for name, want in golden["outputs"].items():
            got = line["outputs"][name]
            assert got["shape"] == want["shape"], (family, name)
            diff = np.abs(np.asarray(got["data"], np.float64) - np.asarray(want["data"], np.float64)).max()
            assert diff < TOLERANCE, f"{family}/{name}: node vs python max |diff| {diff}"
            if want["dtype"] == "int64":  # ids must be identical, not merely close
                assert got["data"] == want["data"], (family, name)


def test_unloadable_model_is_reported_not_skipped(handoff_dir: Path, registry: Path, tmp_path: Path) -> None:
    broken = tmp_path / "registry"
    shutil.copytree(registry / "toy_rating", broken / "toy_rating")
    shutil.copytree(registry / "toy_ctr", broken / "toy_ctr")
    model = broken / "toy_ctr" / "v1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    (broken / "toy_orphan").mkdir()  # a family folder without CURRENT
    code, lines = _score(handoff_dir, broken)
    by_family = {line["family"]: line for line in lines}
    assert code == 1
    assert "outputs" in by_family["toy_rating"]
    assert "error" in by_family["toy_ctr"] and "error" in by_family["toy_orphan"]
    assert "CURRENT" in by_family["toy_orphan"]["error"]


# --- OpenVINO: an independent runtime with its own ONNX frontend and kernels ----------------------
def test_openvino_scores_match_python(registry: Path) -> None:
    from export.openvino_handoff import ATOL, RTOL, main, score_registry

    results = {r["family"]: r for r in score_registry(registry)}
    assert sorted(results) == sorted(p.name for p in registry.iterdir()) and len(results) == 5
    for family, r in results.items():
        assert r["passed"], (family, r)
        golden = json.loads((registry / family / "v1" / "golden.json").read_text())
        scale = max(np.abs(np.asarray(o["data"], np.float64)).max() for o in golden["outputs"].values())
        assert r["max_abs_diff"] <= ATOL + RTOL * scale, (family, r)
    assert main([str(registry)]) == 0


def test_openvino_unloadable_model_is_reported_not_skipped(registry: Path, tmp_path: Path, capsys) -> None:
    from export.openvino_handoff import main, score_registry

    broken = tmp_path / "registry"
    shutil.copytree(registry / "toy_rating", broken / "toy_rating")
    shutil.copytree(registry / "toy_ctr", broken / "toy_ctr")
    model = broken / "toy_ctr" / "v1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    (broken / "toy_orphan").mkdir()
    results = {r["family"]: r for r in score_registry(broken)}
    assert results["toy_rating"]["passed"]
    assert not results["toy_ctr"]["passed"] and "error" in results["toy_ctr"]
    assert "CURRENT" in results["toy_orphan"]["error"]
    assert main([str(broken)]) == 1
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["family"] for line in printed} == {"toy_rating", "toy_ctr", "toy_orphan"}
