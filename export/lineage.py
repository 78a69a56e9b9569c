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

from common.io import atomic_write_bytes, atomic_write_json

PREFIX = "recsys."
PACKAGE = "recsys-pipeline"
# Fields that are not strings are stored as JSON text (metadata_props only holds strings).
_JSON_FIELDS = {"config", "upstream", "trained_rows", "dbt_models"}


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
    # dbt mart -> the dbt models and sources it was built from (manifest parent_map, transitively)
    dbt_models: dict[str, list[str]] = field(default_factory=dict)
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


def dbt_lineage(manifest_path: Path | str, marts: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``{mart: [ancestor models and sources]}`` from a dbt ``manifest.json`` (``parent_map``).

    Names are dbt's short ones (``int_split``, ``source:raw.interactions``); tests are left out.
    An absent manifest gives ``{}``: the lineage then says so instead of guessing.
    """
    path = Path(manifest_path)
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    parents: dict[str, list[str]] = manifest.get("parent_map", {})
    names = {uid: node.get("name", uid) for uid, node in manifest.get("nodes", {}).items()}
    for uid, node in manifest.get("sources", {}).items():
        names[uid] = f"source:{node.get('source_name')}.{node.get('name')}"
    by_name = {n: uid for uid, n in names.items() if uid.startswith("model.")}
    out: dict[str, list[str]] = {}
    for mart in marts:
        uid = by_name.get(mart)
        if uid is None:
            continue
        seen: set[str] = set()
        stack = list(parents.get(uid, []))
        while stack:
            parent = stack.pop()
            if parent in seen or not parent.startswith(("model.", "source.", "seed.", "snapshot.")):
                continue
            seen.add(parent)
            stack.extend(parents.get(parent, []))
        out[mart] = sorted(names.get(p, p) for p in seen)
    return out


def describe(path: Path | str) -> str:
    """Human-readable lineage of one ONNX file: its stamps, checked against ``lineage.json`` beside it."""
    path = Path(path)
    stamps = read_onnx_lineage(path)
    lines = [f"{path}  (sha256 {file_sha256(path)[:16]})"]
    if not stamps:
        lines.append(
            "  no recsys lineage stamps: this file was not exported by this pipeline, or it failed its "
            "parity gate (only files that pass are stamped)."
        )
        return "\n".join(lines)
    lines += [
        f"  family            {stamps.get('family')}  version {stamps.get('version')}  "
        f"created {stamps.get('created_at')}",
        f"  raw data          {stamps.get('data_fingerprint')}  (raw_interactions data version)",
        f"  snapshot          {stamps.get('snapshot_fingerprint')}  split {stamps.get('split')}, "
        f"{stamps.get('trained_rows')} train rows",
        f"  dbt manifest      sha256 {stamps.get('dbt_manifest_sha256')}",
    ]
    upstream = stamps.get("upstream") or {}
    for key in sorted(upstream):
        lines.append(f"  upstream          {key} = {upstream[key]}")
    dbt = stamps.get("dbt_models") or {}
    if dbt:
        for mart in sorted(dbt):
            lines.append(f"  dbt {mart:<14}<- {', '.join(dbt[mart])}")
    else:
        lines.append("  dbt models        (not recorded: exported before dbt lineage was stamped)")
    lines += [
        f"  config            sha256 {stamps.get('config_sha256')}",
        f"  code              {stamps.get('code_version')}",
    ]
    beside = path.parent / "lineage.json"
    if beside.is_file():
        doc = json.loads(beside.read_text())
        differ = sorted(k for k in stamps if k in doc and doc[k] != stamps[k])
        lines.append(
            f"  lineage.json      {'agrees' if not differ else 'DIFFERS on ' + ', '.join(differ)}"
        )
    return "\n".join(lines)
