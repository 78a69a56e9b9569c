"""Which files an ingest may read, and how their names reach DuckDB.

* **Names, not patterns.** DuckDB expands ``*``, ``?`` and ``[...]`` in every path it reads,
  and 2.0 has no option to turn that off: a file named ``*.csv`` would pull in its
  neighbours, ``[x].parquet`` would load ``x.parquet``. :func:`duckdb_pattern` writes a
  path as the pattern that matches that file only, and :func:`read_pattern` checks, before
  the read, that it matches exactly one file.
* **Links stay inside.** A symbolic link in a data folder may point anywhere, and the first
  line of what it points to would be quoted in a header error. :func:`refuse_links_out`
  refuses a file that a link (the file itself, or a folder on the way) takes outside the
  folder, naming the link and its target, before anything is read.
* **Settled files.** The landing sensor lists the files it saw quiet, with size and mtime
  (:class:`FileStat`); the run reads exactly those (:func:`settled_members`) and refuses
  one that changed since, or while it was read (:func:`check_unchanged`).

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from ingest.guards import SourceError

GLOB_CHARS = "*?["


def absolute(path: Path) -> Path:
    """``path`` joined to the working folder when relative, not normalised (``..`` through a
    link is not the same folder as ``..`` collapsed)."""
    return path if path.is_absolute() else Path.cwd() / path


def duckdb_pattern(path: Path) -> str:
    """The DuckDB file pattern that matches ``path`` and nothing else.

    Each glob character is written as a one-character class (``*`` -> ``[*]``), which
    matches only itself; ``]`` alone is literal. The path is made absolute because DuckDB
    also expands a leading ``~``. The result still needs quoting for a SQL string."""
    return "".join(f"[{c}]" if c in GLOB_CHARS else c for c in str(absolute(path)))


def read_pattern(con: duckdb.DuckDBPyConnection, path: Path) -> str:
    """:func:`duckdb_pattern` of ``path``, after checking that DuckDB expands it to exactly
    that one file, so one read per planned file reads that file.

    Raises:
        SourceError: the file is gone, or the name matches other files.
    """
    pattern = duckdb_pattern(path)
    found = [row[0] for row in con.execute("SELECT file FROM glob(?)", [pattern]).fetchall()]
    if len(found) == 1 and Path(found[0]).name == path.name:
        return pattern
    if not found:
        raise SourceError(f"{path} is no longer there: it was moved or deleted while the ingest ran.")
    raise SourceError(
        f"{path}: DuckDB reads this name as a pattern that matches {len(found)} files "
        f"({found[:5]}), not the one file planned. Rename it without the characters * ? [ ]."
    )


def check_read(planned: Iterable[Path], read: Iterable[str], table: str) -> None:
    """Refuse a read that took rows from a file that was not planned (``read``: the file
    names DuckDB reports, e.g. parquet's ``filename`` column)."""
    extra = sorted(set(read) - {str(absolute(p)) for p in planned})
    if extra:
        raise SourceError(
            f"The {table} read took rows from {extra[:5]}, which were not among the planned files "
            f"{[str(p) for p in planned][:5]}: a name was read as a pattern. Rename the files "
            "without the characters * ? [ ]."
        )


def _first_link(path: Path, root: Path) -> Path:
    """The first symbolic link on the way from ``root`` down to ``path`` (``path`` if none)."""
    step = root
    for part in path.relative_to(root).parts:
        step = step / part
        if step.is_symlink():
            return step
    return path


def refuse_links_out(paths: Iterable[Path], root: Path) -> None:
    """Refuse any of ``paths`` (files under the folder ``root``) that resolves outside
    ``root``: a symbolic link, the file's own or a folder's on the way, takes it there.
    Called before any of them is read, so no content from outside reaches a message.
    Links that stay inside ``root`` are followed.

    Raises:
        SourceError: naming the link, its target and the folder.
    """
    top = root.resolve()
    for path in paths:
        target = path.resolve()
        if target.is_relative_to(top):
            continue
        link = _first_link(path, root)
        pointed = os.readlink(link) if link.is_symlink() else target
        raise SourceError(
            f"{link} is a symbolic link to {pointed} ({target}), outside the data folder {root}; "
            "the ingest reads only files inside it. Copy the file into the folder instead of "
            "linking it (links that stay inside the folder are followed)."
        )


@dataclass(frozen=True)
class FileStat:
    """A file's size and modification time, as the landing sensor saw it."""

    size: int
    mtime: float  # seconds since the epoch, as os.stat's st_mtime

    @classmethod
    def of(cls, path: Path) -> FileStat:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime)


def _when(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, UTC).isoformat(timespec="microseconds")


def check_unchanged(path: Path, expected: FileStat, while_reading: bool = False) -> None:
    """Refuse ``path`` when it vanished or its size or mtime differ from ``expected``.

    Raises:
        SourceError: naming the file, what differs, and that the next sensor tick picks it up.
    """
    when = "while the ingest read it" if while_reading else "since the landing sensor's tick listed it"
    after = "The previous raw tables are kept; the next sensor tick picks the file up again once it settles."
    try:
        now = FileStat.of(path)
    except FileNotFoundError:
        raise SourceError(f"{path} vanished {when}. {after}") from None
    if now != expected:
        raise SourceError(
            f"{path} changed {when} (size {expected.size} -> {now.size} bytes, modified "
            f"{_when(expected.mtime)} -> {_when(now.mtime)}); the run reads only files as they "
            f"were when they settled. {after}"
        )


def folder_members(
    folder: Path, suffixes: tuple[str, ...], settled: Mapping[str, FileStat] | None = None
) -> list[Path]:
    """The data files of ``folder`` (names ending in one of ``suffixes``), sorted.

    Without ``settled``: every such file but dot-names (files still being copied in). With
    it: exactly the files it names, each checked unchanged since it was listed. Either way,
    a file that a link takes outside ``folder`` is refused.

    Raises:
        SourceError: ``folder`` is not a folder, a listed name is not a plain data-file name
            of it (a path, a dot-name, another suffix), a link leads out, or a listed file
            vanished or changed.
    """
    if settled is None:
        members = sorted(
            p for p in folder.iterdir()
            if not p.name.startswith(".") and p.is_file() and p.name.lower().endswith(suffixes)
        )  # fmt: skip
        refuse_links_out(members, folder)
        return members
    if not folder.is_dir():
        raise SourceError(
            f"{folder} is not a folder: a list of settled files names files of the landing folder."
        )
    for name in settled:
        plain = Path(name).name == name and "\\" not in name and not name.startswith(".")
        if not plain or not name.lower().endswith(suffixes):
            raise SourceError(
                f"{name!r} in the run config's list of settled files is not a file name in {folder} "
                f"(no folders, no dot-names; one of {', '.join(suffixes)}); list the files by name, "
                "or leave the list out to read the whole folder."
            )
    members = [folder / name for name in sorted(settled)]
    refuse_links_out(members, folder)
    for path in members:
        check_unchanged(path, settled[path.name])
    return members
