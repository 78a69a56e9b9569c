"""Handoff: decide whether a model may ship (blessing) and copy it into the registry.

Layout under ``registry_root`` (``$RECSYS_HOME/registry``)::

    <family>/<version>/   model.onnx, signature.json, metrics.json, lineage.json (+ any
                          other file of the export folder, e.g. model_topk.onnx, golden.json)
    <family>/CURRENT      the blessed version's name, one line
    index.json            every family's current version, signature, metrics, lineage summary

Visibility is all-or-nothing: a version folder is assembled under a hidden temp name
(``.<version>.<random>.tmp``), fsynced, and renamed into place; ``CURRENT`` and
``index.json`` are replaced atomically. A crash leaves at most a hidden temp folder, which
no reader lists. The registry assumes one writer per family at a time (one Dagster asset
per family); every write (``promote``, ``write_index``, ``promote_blessed``) holds the
registry lock (``<registry_root>/.lock``, an OS lock the kernel releases if the process dies),
so two runs never write the registry at the same time, whoever calls these functions.

``metrics.json`` is read as either a flat ``{metric: value}`` dict or
``{"metrics": {metric: value}, "data_version": ..., ...}``; its ``data_version`` (else
``lineage.json``'s ``data_version`` or ``data_fingerprint``) identifies the data it was
evaluated on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.io import (
    StorageError,
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    fsync_dir,
    is_storage_failure,
    publishable_mode,
    storage_error,
)
from common.metrics import MAIN_METRIC
from export.lineage import file_sha256

REQUIRED_FILES = ("model.onnx", "signature.json", "metrics.json", "lineage.json")
# Relative slack against the last blessed version: nightly retrains on fresh data wobble by
# a percent or so; 2% lets that pass and still stops a real regression.
DEFAULT_TOLERANCE = 0.02
LOCK_FILE = ".lock"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class RegistryError(RuntimeError):
    """The registry on disk is inconsistent (e.g. CURRENT names a missing folder)."""


@dataclass(frozen=True)
class Blessing:
    """The verdict of ``bless``; ``reasons`` has one human-readable line per check."""

    blessed: bool
    reasons: list[str]
    main_metric: str
    value: float
    baseline_value: float
    previous_version: str | None
    previous_value: float | None
    # True/False when both data versions are known, None otherwise.
    data_version_match: bool | None = field(default=None)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name) or name == "CURRENT":
        raise ValueError(
            f"{kind} {name!r} is not a valid registry name: use letters, digits and _ . + - "
            "(not starting with a dot or dash, not 'CURRENT')."
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path} is not valid JSON ({e}); re-promote this version.") from e


def _flat_metrics(obj: Any) -> dict[str, float]:
    inner = obj.get("metrics") if isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) else obj
    return {k: float(v) for k, v in inner.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def current_version(family: str, registry_root: Path | str) -> str | None:
    """The blessed version of ``family`` (content of ``CURRENT``), or None if there is none yet."""
    pointer = Path(registry_root) / family / "CURRENT"
    if not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    if not (pointer.parent / version).is_dir():
        raise RegistryError(f"{pointer} names {version!r}, which has no folder; the registry is damaged.")
    return version


def load_current_metrics(family: str, registry_root: Path | str) -> dict[str, float] | None:
    """The flat metrics of the current version of ``family``, or None if there is none."""
    version = current_version(family, registry_root)
    if version is None:
        return None
    return _flat_metrics(_read_json(Path(registry_root) / family / version / "metrics.json"))


def _data_version(version_dir: Path) -> str | None:
    metrics = _read_json(version_dir / "metrics.json")
    if isinstance(metrics, dict) and metrics.get("data_version") is not None:
        return str(metrics["data_version"])
    lineage_path = version_dir / "lineage.json"
    lineage = _read_json(lineage_path) if lineage_path.is_file() else {}
    for key in ("data_version", "data_fingerprint"):
        if isinstance(lineage, dict) and lineage.get(key) is not None:
            return str(lineage[key])
    return None


def _better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "min" else a > b


def bless(
    family: str,
    task: str,
    metrics: dict[str, float],
    baseline_metrics: dict[str, float],
    registry_root: Path | str,
    tolerance: float = DEFAULT_TOLERANCE,
    data_version: str | None = None,
) -> Blessing:
    """Decide whether a model may be promoted, on its task's main metric (``MAIN_METRIC``).

    Two checks, both required:

    1. *Beats popularity*: strictly better than ``baseline_metrics`` (the popularity
       baseline's metrics on the same split). Equal is not better.
    2. *No regression*: if ``family`` has a blessed version holding the same metric, the
       new value may be worse than the previous one ``p`` by at most ``tolerance * |p|``
       (relative): for a "max" metric ``value >= p - tolerance*|p|``, for "min"
       ``value <= p + tolerance*|p|``.

    The regression check runs even when the data versions differ: a pipeline whose new data
    makes every model worse should be noticed, not waved through. Whether they match is
    recorded in ``data_version_match`` and in ``reasons``, so a human can judge.

    Raises:
        ValueError: unknown task, or the main metric is missing from either dict (a caller
            bug, not a model verdict).
    """
    if task not in MAIN_METRIC:
        raise ValueError(f"task {task!r} has no main metric; known: {sorted(MAIN_METRIC)}.")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance is relative and must be in [0, 1); got {tolerance}.")
    main, direction = MAIN_METRIC[task]
    for name, d in (("metrics", metrics), ("baseline_metrics", baseline_metrics)):
        if main not in d:
            raise ValueError(f"{name} lacks {main!r}, the main metric of task {task!r}; it has {sorted(d)}.")
    value, base = float(metrics[main]), float(baseline_metrics[main])
    reasons: list[str] = []
    ok = True

    if not math.isfinite(value):
        ok = False
        reasons.append(f"{main} is {value}: the evaluation is broken.")
    elif _better(value, base, direction):
        reasons.append(f"beats popularity: {main} {value:.6g} vs {base:.6g}.")
    else:
        ok = False
        reasons.append(f"does not beat popularity: {main} {value:.6g} vs {base:.6g} ({direction} is better).")

    root = Path(registry_root)
    previous = current_version(family, root)
    previous_value: float | None = None
    match: bool | None = None
    if previous is None:
        reasons.append("no blessed version yet: regression check skipped.")
    else:
        previous_value = (load_current_metrics(family, root) or {}).get(main)
        previous_data = _data_version(root / family / previous)
        if data_version is not None and previous_data is not None:
            match = data_version == previous_data
        data_note = {
            True: "same data version",
            False: f"different data versions ({data_version} vs {previous_data})",
            None: "data versions unknown",
        }[match]
        if previous_value is None:
            reasons.append(f"blessed version {previous} has no {main}: regression check skipped.")
        else:
            limit = previous_value + (tolerance if direction == "min" else -tolerance) * abs(previous_value)
            if _better(limit, value, direction):
                ok = False
                reasons.append(
                    f"regresses past {tolerance:.0%} against {previous}: {main} {value:.6g} vs "
                    f"{previous_value:.6g} (limit {limit:.6g}; {data_note})."
                )
            else:
                reasons.append(
                    f"within {tolerance:.0%} of {previous}: {main} {value:.6g} vs "
                    f"{previous_value:.6g} ({data_note})."
                )
    return Blessing(ok, reasons, main, value, base, previous, previous_value, match)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def promote(family: str, source_dir: Path | str, registry_root: Path | str, version: str) -> Path:
    """Copy every file of ``source_dir`` into ``<root>/<family>/<version>/`` and point
    ``CURRENT`` at it; returns the version folder.

    Steps: copy into a hidden ``.<version>.<random>.tmp`` folder beside the target, fsync
    each file and folder, rename the folder to ``<version>`` (atomic on one filesystem),
    fsync the family folder, then replace ``CURRENT`` atomically. On any error the temp
    folder is removed and ``CURRENT`` still names the previous version.

    Raises:
        FileNotFoundError: a file of ``REQUIRED_FILES`` is missing from ``source_dir``.
        FileExistsError: the version is already in the registry (versions are immutable).
        ValueError: ``family`` or ``version`` is not a safe folder name.
        StorageError: the registry's disk is full, read-only or not writable; the message
            names the path and the fix, and the previous version stays current and intact
            (a partly copied or never-current version folder is removed, so a rerun works).
    """
    with registry_lock(registry_root):
        return _promote(family, Path(source_dir), Path(registry_root), version)


def _promote(family: str, source: Path, registry_root: Path, version: str) -> Path:
    _check_name("family", family)
    _check_name("version", version)
    missing = [f for f in REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {missing}; export and evaluate {family} before promoting.")
    family_dir = Path(registry_root) / family
    final = family_dir / version
    if final.exists():
        raise FileExistsError(f"{final} already exists; registry versions are immutable, pick a new version.")

    previous = current_version(family, registry_root)
    kept = (
        f"{family_dir / 'CURRENT'} still names {previous}, whose files are untouched."
        if previous
        else f"No version of {family} is current yet."
    )
    tmp: Path | None = None
    try:
        family_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=family_dir))
        publishable_mode(tmp, directory=True)
        for src in sorted(p for p in source.rglob("*") if p.is_file()):
            dst = tmp / src.relative_to(source)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            _fsync_file(dst)
        for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            fsync_dir(folder)
        os.rename(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_storage_failure(exc):
            raise storage_error(exc, final, kept=f"Nothing was promoted; {kept}") from exc
        raise
    fsync_dir(family_dir)
    try:
        atomic_write_text(family_dir / "CURRENT", version + "\n")
    except BaseException as exc:
        # CURRENT still names the previous version. Take the new folder back out, so the
        # registry holds no version that was never current and a rerun can promote it again.
        pointer = family_dir / "CURRENT"
        if not (pointer.is_file() and pointer.read_text().strip() == version):
            shutil.rmtree(final, ignore_errors=True)
        if isinstance(exc, StorageError):
            raise StorageError(
                f"{exc} {version} was not promoted (its folder was removed); {kept}", exc.errno, exc.path
            ) from exc
        raise
    return final


def _lineage_summary(lineage: Any) -> dict[str, Any]:
    """The scalar top-level fields of lineage.json (nested detail stays in the file)."""
    if not isinstance(lineage, dict):
        return {}
    return {k: v for k, v in lineage.items() if v is None or isinstance(v, str | int | float | bool)}


def write_index(registry_root: Path | str) -> Path:
    """Write ``<root>/index.json`` atomically: for each family with a ``CURRENT``, its
    version, path (relative to the root), files, signature, metrics (as stored) and
    lineage summary. Families are sorted; hidden folders are ignored."""
    with registry_lock(registry_root):
        return _write_index(Path(registry_root))


def _write_index(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; promote a model before writing the index.")
    families: dict[str, Any] = {}
    for family_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        version = current_version(family_dir.name, root)
        if version is None:
            continue
        vdir = family_dir / version
        families[family_dir.name] = {
            "version": version,
            "path": f"{family_dir.name}/{version}",
            "files": sorted(str(p.relative_to(vdir)) for p in vdir.rglob("*") if p.is_file()),
            "signature": _read_json(vdir / "signature.json"),
            "metrics": _read_json(vdir / "metrics.json"),
            "lineage": _lineage_summary(_read_json(vdir / "lineage.json")),
        }
    return atomic_write_json(root / "index.json", {"families": families})


def registry_lock(registry_root: Path | str, on_wait: Callable[[str], object] | None = None):
    """The registry's exclusive lock (``<registry_root>/.lock``; re-entrant in one thread)."""
    return exclusive_lock(Path(registry_root) / LOCK_FILE, on_wait)


def sweep_dead_promotions(family_dir: Path) -> list[str]:
    """Remove hidden ``.*.tmp`` leftovers of promotions whose process died (killed mid-copy).
    Called under :func:`registry_lock`, so no live promotion owns them."""
    removed = []
    if not family_dir.is_dir():
        return removed
    for path in family_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote_blessed` did: ``promoted`` is False when the model was already current."""

    promoted: bool
    version: str
    version_dir: Path
    previous_version: str | None
    model_sha256: str
    note: str
    swept: list[str] = field(default_factory=list)
    # the blessing decided again under the lock (None when the caller asked for no recheck)
    blessing: Blessing | None = None


def promote_blessed(
    family: str,
    onnx_dir: Path | str,
    metrics_path: Path | str,
    registry_root: Path | str,
    staging_dir: Path | str,
    on_wait: Callable[[str], object] | None = None,
    recheck: Callable[[], Blessing] | None = None,
) -> Promotion:
    """Promote an evaluated export folder (plus its ``metrics.json``) as a new version of
    ``family``, under the registry lock. The version is ``<UTC stamp>-<model sha256[:8]>``.

    Idempotent: a ``model.onnx`` identical to the current version's is not promoted again (a
    re-run on unchanged inputs); a second version holding identical bytes would only add noise.
    Leftovers of promotions killed mid-copy are removed first. ``staging_dir`` is where the
    release is assembled (replaced if present) before :func:`promote` copies it in.

    ``recheck`` decides the blessing again once the lock is held, against whatever version is
    current at that moment: a run evaluated against V0 while another run promoted V1 must beat
    V1's tolerance, not V0's. When it says no, nothing is promoted.
    """
    root = Path(registry_root)
    onnx_dir = Path(onnx_dir)
    digest = file_sha256(onnx_dir / "model.onnx")
    with registry_lock(root, on_wait):
        swept = sweep_dead_promotions(root / family)
        current = current_version(family, root)
        if current is not None and file_sha256(root / family / current / "model.onnx") == digest:
            note = f"model.onnx is identical to current version {current}: nothing promoted"
            return Promotion(False, current, root / family / current, current, digest, note, swept)
        blessing = recheck() if recheck is not None else None
        if blessing is not None and not blessing.blessed:
            note = f"not blessed against current version {current}: {' '.join(blessing.reasons)}"
            where = root / family / current if current else root / family
            return Promotion(False, current or "", where, current, digest, note, swept, blessing)
        staging = Path(staging_dir)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(onnx_dir, staging)
        shutil.copy2(metrics_path, staging / "metrics.json")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        version_dir = promote(family, staging, root, f"{stamp}-{digest[:8]}")
        write_index(root)
    note = f"promoted {version_dir.name}" + (f" over {current}" if current else " (first version)")
    return Promotion(True, version_dir.name, version_dir, current, digest, note, swept, blessing)
