"""Lineage carried by the artifact itself, so a model.onnx found on disk leads back to its rows.

Dagster's asset graph shows the chain while the instance exists; these stamps survive a copy to
another team: ``metadata_props`` inside the ONNX file (keys ``recsys.<field>``, string values,
readable by every runtime's metadata API) and a ``lineage.json`` beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from export.io import atomic_write_bytes, atomic_write_json

PREFIX = "recsys."
PACKAGE = "recsys-pipeline"
# Fields that are not strings are stored as JSON text (metadata_props only holds strings).
_JSON_FIELDS = {"config", "upstream", "trained_rows"}


@dataclass(frozen=True)
class Lineage:
    family: str
    version: str
    data_fingerprint: str  # raw data version (the ingest asset's data version)
    snapshot_fingerprint: str
    dbt_manifest_sha256: str
    split: str
    config_sha256: str
    config: dict[str, Any]
    code_version: str
    trained_rows: int
    upstream: dict[str, str] = field(default_factory=dict)  # asset key -> data version
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_sha256(config: Any) -> str:
    """Hash of a config dataclass as key-sorted JSON: equal configs hash equal across runs."""
    return hashlib.sha256(_stable_json(dataclasses.asdict(config)).encode()).hexdigest()


def code_version(family_source: Path | str | None = None, repo_dir: Path | str | None = None) -> str:
    """The checkout's git commit (``+dirty`` when tracked files changed), else package version + source hash.

    The fallback covers an installed wheel or a copied tree without ``.git``: the hash of the
    family's own file still tells two builds of the same package version apart.
    """
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = f"+src:{file_sha256(family_source)[:16]}" if family_source else ""
    return f"pkg:{PACKAGE}=={version}{source}"


def _to_props(lineage: Lineage) -> dict[str, str]:
    return {
        PREFIX + k: (_stable_json(v) if k in _JSON_FIELDS else str(v)) for k, v in asdict(lineage).items()
    }


def stamp_onnx(path: Path | str, lineage: Lineage) -> Path:
    """Replace the file's ``recsys.*`` metadata_props with ``lineage``, atomically.

    Other props (the exporter's own) are kept; earlier ``recsys.*`` ones are dropped so a
    re-stamp never leaves a mix of two runs.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *_to_props(lineage).items()]:
        model.metadata_props.add(key=key, value=value)
    return atomic_write_bytes(path, model.SerializeToString())


def read_onnx_lineage(path: Path | str) -> dict[str, Any]:
    """The ``recsys.*`` stamps of an ONNX file as a dict shaped like ``asdict(Lineage)``."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(PREFIX):
            key = p.key.removeprefix(PREFIX)
            out[key] = json.loads(p.value) if key in _JSON_FIELDS else p.value
    return out


def write_lineage_json(directory: Path | str, lineage: Lineage) -> Path:
    return atomic_write_json(Path(directory) / "lineage.json", asdict(lineage))
