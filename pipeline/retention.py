"""Storage retention: keep what the registry and the next run need, delete the rest.

Every run adds a snapshot (when the data changed), a run folder per family under
``artifacts/`` and, when blessed, a registry version. :func:`plan_retention` decides, and says
why, for each of them:

* **registry versions** (``registry/<family>/<version>/``): the last ``RECSYS_KEEP_VERSIONS``
  of each family are kept, and whatever ``CURRENT`` names even when it is older (a rollback);
  the rest are deleted. A family whose ``CURRENT`` is damaged keeps every version.
* **snapshots** (``snapshots/<fingerprint>/``): kept when a kept version's ``lineage.json``
  names it (``snapshot_fingerprint``), or when it is the newest one (the folder the next
  training step reads; ``write_snapshot`` touches a snapshot it reuses, so newest means last
  written or reused).
* **run folders** (``artifacts/<family>/<run_id>/``): kept when a kept version was exported
  there (``lineage.json`` ``version``), trained there (the onnx reuse pointer's ``model_dir``)
  or built on a model there (``upstream`` ``model_dir=``), or when it holds the newest model,
  ONNX export or evaluation of the reuse cache (what a run on unchanged inputs reuses).
* **reuse pointers** (``artifacts/<family>/by_key/*.json``) naming a deleted or missing run
  folder are deleted too; one that survives a crash only misses (``StepCache.lookup`` checks
  the files) and is removed the next time.

The caller adds what else must stay (``protect``: the Dagster job passes the folders named by
each asset's latest materialisation, which a partial run loads as its inputs).

**In use.** A running step holds shared locks on what it reads and writes
(``pipeline.steps.in_use``: its family's artifacts folder, the families it reads from, the
snapshot; ``write_snapshot`` while it reuses a folder). :func:`prune` takes each lock
exclusively *without waiting* before it moves a folder, and skips and reports what is held.
An OS lock rather than an age rule: a step may run for hours on an old snapshot, and the
kernel drops the lock of a killed step, so nothing stays pinned by a dead run. The gap
*between* two steps of one run holds no lock; the Dagster job covers it by skipping while
another run is in flight, and by protecting the latest materialisations.

**Crash safety.** Registry versions are deleted under the registry lock, which the whole
plan-and-move holds, so no promotion interleaves. A folder is first renamed to a hidden
``.trash-*`` name (atomic; no reader lists hidden names), then removed; trash an interrupted
prune left is removed by the next one. A snapshot touched after the plan was made is spared.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common.io import folder_lock, fsync_dir
from export.registry import RegistryError, current_version, registry_lock
from pipeline.settings import Settings

TRASH = ".trash-"
STAGES = ("model", "onnx", "eval")  # the reuse cache's stages (pipeline/steps.py)
_STAMP = re.compile(r"^(\d{8}T\d{6}Z)-")  # promote_blessed names versions <UTC stamp>-<sha>
BUSY = "in use: a running step holds it"


@dataclass(frozen=True)
class Entry:
    """One folder (or pointer file) and why it is kept or deleted."""

    kind: str  # version | snapshot | run | pointer
    path: Path
    reason: str
    bytes: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True)
class Plan:
    home: Path
    keep_versions: int
    keep: tuple[Entry, ...]
    delete: tuple[Entry, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What :func:`prune` did (or, with ``dry_run``, would do)."""

    plan: Plan
    dry_run: bool
    deleted: tuple[Entry, ...] = ()
    skipped: tuple[tuple[Entry, str], ...] = ()
    swept: tuple[str, ...] = field(default_factory=tuple)  # trash of an interrupted prune

    @property
    def bytes_freed(self) -> int:
        """Bytes deleted; on a dry run, the bytes the plan would free."""
        return sum(e.bytes for e in (self.plan.delete if self.dry_run else self.deleted))

    def counts(self) -> dict[str, int]:
        deleted = self.plan.delete if self.dry_run else self.deleted
        return {"kept": len(self.plan.keep), "deleted": len(deleted), "skipped": len(self.skipped)}

    def summary(self) -> str:
        c = self.counts()
        verb = "would delete" if self.dry_run else "deleted"
        return f"kept {c['kept']}, {verb} {c['deleted']} ({self.bytes_freed} bytes), skipped {c['skipped']}"


def _children(folder: Path) -> list[Path]:
    """The visible sub-folders (hidden names are temp folders, trash and locks)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _size(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def _entry(kind: str, path: Path, reason: str) -> Entry:
    try:
        stat = path.stat()
    except OSError:
        return Entry(kind, path, reason)
    return Entry(kind, path, reason, _size(path) if path.is_dir() else stat.st_size, stat.st_mtime_ns)


def _version_order(version_dir: Path) -> tuple[float, str]:
    stamp = _STAMP.match(version_dir.name)
    if stamp:
        when = datetime.strptime(stamp.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    else:
        when = version_dir.stat().st_mtime
    return when, version_dir.name


def _run_of(path: Path | str, artifacts: Path) -> tuple[str, str] | None:
    """``(family, run_id)`` of a path inside ``artifacts/<family>/<run_id>/``, else None."""
    try:
        parts = Path(path).resolve().relative_to(artifacts).parts
    except ValueError:
        return None
    if len(parts) < 2 or parts[1] == "by_key" or parts[1].startswith("."):
        return None
    return parts[0], parts[1]


@dataclass(frozen=True)
class _Pointer:
    file: Path
    stage: str
    run: tuple[str, str] | None  # the run folder it names
    exists: bool
    model_dir: str | None
    mtime_ns: int


def _pointers(family_dir: Path, artifacts: Path) -> list[_Pointer]:
    found = []
    for file in sorted((family_dir / "by_key").glob("*.json")):
        try:
            record = json.loads(file.read_text())
            path = Path(record["path"])
            mtime = file.stat().st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: the cache already ignores it, and it names nothing we could check
        stage = str(record.get("stage") or file.name.split("-", 1)[0])
        model_dir = record.get("model_dir") if isinstance(record.get("model_dir"), str) else None
        found.append(_Pointer(file, stage, _run_of(path, artifacts), path.is_dir(), model_dir, mtime))
    return found


def _lineage_needs(version_dir: Path, family: str, artifacts: Path, pointers: list[_Pointer]):
    """The snapshot and run folders a registry version's ``lineage.json`` names.

    Raises:
        OSError, ValueError: the lineage is unreadable (the caller then keeps everything it
            could have named).
    """
    lineage = json.loads((version_dir / "lineage.json").read_text())
    if not isinstance(lineage, dict):
        raise ValueError(f"{version_dir / 'lineage.json'} is not a JSON object")
    runs: set[tuple[str, str]] = set()
    run_id = lineage.get("version")  # the run that exported it
    if isinstance(run_id, str) and run_id and "/" not in run_id:
        runs.add((family, run_id))
        for p in pointers:  # the checkpoint it was exported from, when an earlier run trained it
            if p.stage == "onnx" and p.model_dir and p.run == (family, run_id):
                runs.add(_run_of(p.model_dir, artifacts) or (family, run_id))
    for value in (lineage.get("upstream") or {}).values():  # models it was built on (emb_knn)
        if isinstance(value, str) and "model_dir=" in value:
            run = _run_of(value.split("model_dir=", 1)[1].strip(), artifacts)
            if run:
                runs.add(run)
    snapshot = lineage.get("snapshot_fingerprint")
    return (str(snapshot) if snapshot else None), runs


def _protected(protect: Mapping[str | Path, str], home: Path) -> dict[Path, str]:
    """Each protected path mapped to the top folder retention would delete (its snapshot, run
    folder or registry version)."""
    out: dict[Path, str] = {}
    for path, reason in protect.items():
        try:
            parts = Path(path).resolve().relative_to(home).parts
        except ValueError:
            continue
        depth = {"snapshots": 2, "artifacts": 3, "registry": 3}.get(parts[0] if parts else "", 0)
        if depth and len(parts) >= depth:
            top = home.joinpath(*parts[:depth])
            out[top] = "; ".join(filter(None, (out.get(top), reason)))
    return out


def plan_retention(settings: Settings, protect: Mapping[str | Path, str] | None = None) -> Plan:
    """What to keep and delete, with a reason for each (see the module docstring); changes nothing."""
    home = settings.home.resolve()
    artifacts = settings.artifacts_dir.resolve()
    plan = _Planner(settings.keep_versions, _protected(protect or {}, home),
                    {d.name: _pointers(d, artifacts) for d in _children(artifacts)})  # fmt: skip
    plan.versions(settings.registry_dir.resolve(), artifacts)
    plan.snapshots((settings.home / "snapshots").resolve())
    plan.runs(artifacts)
    return Plan(home, settings.keep_versions, tuple(plan.keep), tuple(plan.delete), tuple(plan.notes))


@dataclass
class _Planner:
    keep_n: int
    protected: dict[Path, str]
    pointers: dict[str, list[_Pointer]]
    keep: list[Entry] = field(default_factory=list)
    delete: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snap_needs: dict[str, list[str]] = field(default_factory=dict)  # what kept versions name
    run_needs: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    blind: set[str] = field(default_factory=set)  # families with a kept version of unreadable lineage

    def decide(self, kind: str, path: Path, why: list[str], otherwise: str) -> bool:
        why = [*why, self.protected[path]] if path in self.protected else why
        (self.keep if why else self.delete).append(_entry(kind, path, "; ".join(why) or otherwise))
        return bool(why)

    def versions(self, registry: Path, artifacts: Path) -> None:
        for family_dir in _children(registry):
            family, versions = family_dir.name, sorted(_children(family_dir), key=_version_order)
            try:
                current, damaged = current_version(family, registry), False
            except RegistryError as exc:
                current, damaged = None, True
                self.notes.append(f"{exc} Every version of {family} is kept until CURRENT is repaired.")
            last = {v.name for v in versions[-self.keep_n :]}
            for v in versions:
                why = [f"CURRENT of {family}"] if v.name == current else []
                why += [f"one of the last {self.keep_n} versions"] if v.name in last else []
                why += ["CURRENT is damaged"] if damaged else []
                otherwise = f"older than the last {self.keep_n} versions and not CURRENT"
                if self.decide("version", v, why, otherwise):
                    self.trace(v, family, artifacts)

    def trace(self, version_dir: Path, family: str, artifacts: Path) -> None:
        """Record what a kept version's lineage names."""
        try:
            snapshot, runs = _lineage_needs(version_dir, family, artifacts, self.pointers.get(family, []))
        except (OSError, ValueError) as exc:
            self.blind.add(family)
            self.notes.append(f"{version_dir}/lineage.json is unreadable ({exc}): every snapshot and "
                              f"run folder of {family} is kept, as it could name any.")  # fmt: skip
            return
        label = f"lineage of registry {family}/{version_dir.name}"
        if snapshot:
            self.snap_needs.setdefault(snapshot, []).append(label)
        for run in runs:
            self.run_needs.setdefault(run, []).append(label)

    def snapshots(self, root: Path) -> None:
        snapshots = _children(root)
        newest = max(snapshots, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)
        for snap in snapshots:
            why = [*self.snap_needs.get(snap.name, [])]
            why += [f"a kept version of {', '.join(sorted(self.blind))} has no lineage"] if self.blind else []
            why += ["newest snapshot (what the next training step reads)"] if snap == newest else []
            self.decide("snapshot", snap, why, "no kept registry version was trained on it, not the newest")

    def runs(self, artifacts: Path) -> None:
        for family_dir in _children(artifacts):
            family, pointers = family_dir.name, self.pointers.get(family_dir.name, [])
            newest: dict[tuple[str, str], list[str]] = {}
            for stage in STAGES:
                live = [p for p in pointers if p.stage == stage and p.exists and p.run]
                if live:
                    latest = max(live, key=lambda p: p.mtime_ns).run
                    newest.setdefault(latest, []).append(f"newest {stage} of the reuse cache")
            doomed = set()
            for run_dir in (d for d in _children(family_dir) if d.name != "by_key"):
                run = (family, run_dir.name)
                why = [*self.run_needs.get(run, []), *newest.get(run, [])]
                why += ["a kept version of this family has no lineage"] if family in self.blind else []
                if not self.decide("run", run_dir, why, "no kept registry version needs it, not the newest"):
                    doomed.add(run)
            for p in pointers:
                if p.run in doomed:
                    self.delete.append(_entry("pointer", p.file, f"names {p.run[1]}, which is deleted"))
                elif not p.exists and (p.run is None or p.run[0] == family):
                    self.delete.append(_entry("pointer", p.file, "names a folder that no longer exists"))


def sweep_trash(settings: Settings) -> list[str]:
    """Remove the ``.trash-*`` folders an interrupted prune left (snapshots, registry, artifacts)."""
    areas = [settings.home / "snapshots", *_children(settings.registry_dir)]
    areas += _children(settings.artifacts_dir)
    swept = []
    for area in areas:
        for path in sorted(area.glob(f"{TRASH}*")) if area.is_dir() else []:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            swept.append(str(path.relative_to(settings.home)))
    return swept


def prune(settings: Settings, dry_run: bool = False, protect: Mapping[str | Path, str] | None = None,
          log=None) -> Outcome:  # fmt: skip
    """Plan (:func:`plan_retention`) and delete, under the registry lock; ``dry_run`` only plans.

    Folders a running step holds (see the module docstring) are skipped and reported in
    ``Outcome.skipped``; a later prune deletes them once they are free.
    """
    trash: list[Path] = []
    deleted: list[Entry] = []
    skipped: list[tuple[Entry, str]] = []
    on_wait = log.info if log is not None else None
    with registry_lock(settings.registry_dir, on_wait=on_wait):
        swept = [] if dry_run else sweep_trash(settings)
        plan = plan_retention(settings, protect)
        if dry_run:
            return Outcome(plan, True)
        by_kind = {kind: [e for e in plan.delete if e.kind == kind] for kind in ("version", "snapshot")}
        for entry in by_kind["version"]:  # the registry lock is held: no promotion interleaves
            _move(entry, trash, deleted, skipped)
        for entry in by_kind["snapshot"]:
            with folder_lock(entry.path, shared=False, wait=False) as held:
                if not held:
                    skipped.append((entry, BUSY))
                elif entry.path.stat().st_mtime_ns != entry.mtime_ns:
                    skipped.append((entry, "used since the plan was made"))
                else:
                    _move(entry, trash, deleted, skipped)
        _prune_artifacts(settings, [e for e in plan.delete if e.kind in ("run", "pointer")],
                         trash, deleted, skipped)  # fmt: skip
    for path in trash:  # outside the lock: promotions need not wait for the disk
        shutil.rmtree(path, ignore_errors=True)
    outcome = Outcome(plan, False, tuple(deleted), tuple(skipped), tuple(swept))
    if log is not None:
        log.info(f"storage retention: {outcome.summary()}")
    return outcome


def _prune_artifacts(settings: Settings, entries: Iterable[Entry], trash: list[Path], deleted: list[Entry],
                     skipped: list[tuple[Entry, str]]) -> None:  # fmt: skip
    """Run folders, then their pointers, one family at a time under that family's folder lock
    taken exclusively (a running step of the family holds it shared: the family is skipped)."""
    artifacts = settings.artifacts_dir.resolve()
    by_family: dict[str, list[Entry]] = {}
    for entry in entries:
        by_family.setdefault(entry.path.resolve().relative_to(artifacts).parts[0], []).append(entry)
    for family, family_entries in sorted(by_family.items()):
        with folder_lock(artifacts / family, shared=False, wait=False) as held:
            for entry in sorted(family_entries, key=lambda e: e.kind != "run"):  # folders first
                if not held:
                    skipped.append((entry, f"in use: a running step of {family} holds artifacts/{family}"))
                elif entry.kind == "run":
                    _move(entry, trash, deleted, skipped)
                else:
                    entry.path.unlink(missing_ok=True)
                    deleted.append(entry)


def _move(entry: Entry, trash: list[Path], deleted: list[Entry], skipped: list[tuple[Entry, str]]) -> None:
    """Rename ``entry``'s folder to a hidden ``.trash-*`` name beside it (atomic: a crash leaves it
    either in place or in the trash, which the next prune empties)."""
    target = entry.path.with_name(f"{TRASH}{entry.path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    try:
        os.rename(entry.path, target)
    except OSError as exc:
        skipped.append((entry, f"could not be moved to the trash ({exc.strerror or exc})"))
        return
    fsync_dir(entry.path.parent)
    trash.append(target)
    deleted.append(entry)
