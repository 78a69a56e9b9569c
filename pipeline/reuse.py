"""The reuse cache: re-running on unchanged inputs costs nothing.

Each of the model, ONNX and evaluation steps of a family computes a *reuse key*: a hash of
everything its output depends on (what the training snapshot was built from, the family's and
the shared code's source hashes, the parsed config, the library versions, the upstream
folder). When an earlier run already produced that key (a pointer
``$RECSYS_HOME/artifacts/<family>/by_key/<stage>-<key>.json`` written only after the output
was complete), the step returns that output instead of recomputing it. The key is also the
step's Dagster data version, so the UI shows downstream assets as up to date. Any change of
data, config or code gives a new key, and the step recomputes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path

from common.io import atomic_write_json
from export.lineage import file_sha256
from pipeline.settings import REPO_ROOT, load_settings


def source_version(obj) -> str:
    """Code version of a family = hash of its source file, so the UI marks it stale on edits."""
    source = Path(inspect.getsourcefile(obj)).read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


# Bump to invalidate every reuse pointer at once (e.g. when the pointer layout changes).
REUSE_FORMAT = 2
# Libraries whose version changes what a step produces.
_PACKAGES = ("torch", "numpy", "scipy", "onnx", "onnxruntime", "onnxscript")


@functools.cache
def code_digest(*paths: str) -> str:
    """Hash of these repository files, and of every ``*.py`` in these repository folders: shared
    code a family's file imports (``models/base.py``, ``common/metrics.py``, ``export/*.py``)
    changes outputs too."""
    digest = hashlib.sha256()
    for name in paths:
        path = REPO_ROOT / name
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def reuse_key(stage: str, parts: Mapping[str, object]) -> str:
    """The reuse key of one step: a hash of ``stage`` and everything its output depends on."""
    payload = json.dumps({"stage": stage, "format": REUSE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def model_key_parts(
    family: str, code_version: str, config: Mapping, snapshot: str, upstream: Mapping[str, str]
) -> dict[str, object]:
    """What a trained model depends on; equal parts = the same checkpoint (training is seeded)."""
    return {
        "family": family,
        "code_version": code_version,
        "model_code": code_digest("models", "common"),
        "packages": package_versions(),
        "config": dict(config),
        "snapshot": snapshot,
        "upstream": dict(sorted(upstream.items())),
    }


# What a snapshot was built from, exactly (its meta.json). The content fingerprint is not
# used: the marts' float features (means and deviations from parallel DuckDB aggregates)
# differ in the last bits from one dbt build to the next, so unchanged inputs would get a new
# fingerprint every run. Raw data versions (content hashes), the dbt mart versions Dagster
# records, the dbt manifest and variables, and the integer shape of the snapshot are exact.
SNAPSHOT_INPUT_FIELDS = ("upstream", "dbt_manifest_sha256", "split", "history_len", "split_rows", "n_users",
                         "n_items", "sparse_cardinality", "rating_range", "max_history_len")  # fmt: skip


def snapshot_key(snapshot: str) -> str:
    """The part of a reuse key that stands for the training snapshot (see above); a snapshot
    written without upstream data versions falls back to its content fingerprint."""
    try:
        meta = json.loads((Path(snapshot) / "meta.json").read_text())
    except (OSError, ValueError):
        return f"content:{Path(snapshot).name}"
    if not meta.get("upstream"):
        return f"content:{meta.get('fingerprint') or Path(snapshot).name}"
    inputs = {name: meta.get(name) for name in SNAPSHOT_INPUT_FIELDS}
    # the dbt variables the marts were built with, as dbt recorded them (mart_build_info);
    # snapshots written before that was recorded fall back to today's settings
    inputs["dbt_vars"] = meta.get("build_info") or load_settings().dbt_vars(meta.get("split"))
    inputs["snapshot_code"] = code_digest("pipeline/snapshot.py")
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return f"inputs:{digest[:16]}"


class StepCache:
    """Pointers from a reuse key to the folder an earlier run wrote for it:
    ``<artifacts>/<family>/by_key/<stage>-<key>.json``. A pointer is written after the folder is
    complete, so a run killed midway leaves none. It is trusted only while it still describes
    what is on disk: its folder must lie under ``<artifacts>`` and every file it recorded must
    still have the sha256 it had then (a file replaced or truncated in place, or a pointer
    edited to name another folder, means recompute)."""

    def __init__(self, artifacts_dir: Path, family: str, stage: str, required: tuple[str, ...]):
        self.root = Path(artifacts_dir).resolve()
        self.folder = Path(artifacts_dir) / family / "by_key"
        self.stage = stage
        self.required = required

    def pointer(self, key: str) -> Path:
        return self.folder / f"{self.stage}-{key}.json"

    def lookup(self, key: str, log) -> dict | None:
        pointer = self.pointer(key)
        if not pointer.is_file():
            return None
        try:
            record = json.loads(pointer.read_text())
            folder = Path(record["path"])
            recorded = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(f"ignoring unreadable or outdated reuse pointer {pointer} ({exc!r}); recomputing")
            return None
        if not folder.resolve().is_relative_to(self.root):
            log.warning(f"reuse pointer {pointer} names {folder}, outside {self.root}; recomputing")
            return None
        missing = [name for name in self.required if not (folder / name).is_file()]
        if missing:
            log.warning(f"reuse pointer {pointer} names {folder}, which lacks {missing}; recomputing")
            return None
        changed = [name for name, digest in recorded.items() if _sha256(folder / name) != digest]
        if changed:
            log.warning(
                f"{changed} in {folder} changed since run {record.get('run_id')} wrote them; recomputing"
            )
            return None
        return record

    def record(self, key: str, path: Path, run_id: str, extra: Mapping[str, object] | None = None) -> None:
        files = {name: _sha256(path / name) for name in self.required if (path / name).is_file()}
        atomic_write_json(
            self.pointer(key),
            {"key": key, "stage": self.stage, "path": str(path), "run_id": run_id, "files": files,
             "created": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {})},
        )  # fmt: skip


def _sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def content_digest(path: Path | str) -> str:
    """sha256 of a file a step reads, for its reuse key: the same path with other bytes (a model
    re-exported in place) is another input."""
    return _sha256(Path(path)) or "absent"
