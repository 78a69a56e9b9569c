"""Shared fixtures. Every test writes under its own tmp RECSYS_HOME and DAGSTER_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Telemetry off everywhere, before any of these libraries is imported.
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "recsys_home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    for var in ("RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_COLUMN_MAP", "RECSYS_SPLIT"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


HANDOFF = TESTS.parent / "export" / "handoff"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not on PATH: install Node.js >= 18 with npm to run the ONNX handoff proof")
    return found


@pytest.fixture(scope="session")
def handoff_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp copy of export/handoff with onnxruntime-node installed (offline: --ignore-scripts)."""
    work = tmp_path_factory.mktemp("handoff")
    for name in ("package.json", "score.mjs"):
        shutil.copy(HANDOFF / name, work / name)
    result = subprocess.run(
        [_tool("npm"), "install", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"npm install in {work} failed:\n{result.stdout}\n{result.stderr}")
    return work
