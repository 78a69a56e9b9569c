"""Land one source (synthetic, MovieLens, files) in the warehouse's ``raw`` schema."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from ingest.loader import IngestReport, ingest
from ingest.paths import FileStat
from ingest.plan import build_plan
from pipeline.settings import SOURCES, Settings, SettingsError


@dataclass(frozen=True)
class Landed:
    source: str
    data_path: Path | None
    report: IngestReport
    # distinct users and items, first and last timestamp, mean rating of raw.interactions
    n_users: int
    n_items: int
    first_ts: int
    last_ts: int
    mean_rating: float


def resolve_source(settings: Settings, source: str | None, data_path: str | None) -> tuple[str, Path | None]:
    """The run config's source and path where given, else the settings'."""
    source = source or settings.source
    if source not in SOURCES:
        raise SettingsError(f"run config source={source!r} is not one of {', '.join(SOURCES)}.")
    return source, Path(data_path).expanduser() if data_path else settings.data_path


def land(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    source: str,
    data_path: Path | None,
    column_map: dict[str, str] | None,
    scratch: Path,
    log: Callable[[str], object],
    settled: dict[str, FileStat] | None = None,
) -> Landed:
    """Read the source into ``raw.*`` (validated; bad rows to ``raw.rejected_*``).

    ``settled`` (the landing sensor's list: file name -> size and mtime) makes a ``files``
    folder read exactly those files, refusing any that changed since the list was made or
    while it was read; without it the folder's files are read as they are.

    ``scratch`` holds generated parts and unpacked archives; it is removed afterwards, also on
    failure. Raises ``ingest.layouts.SourceError`` for input that cannot be read and
    ``common.io.StorageError`` for a full or read-only disk; the previous raw tables stay."""
    try:
        plan = build_plan(
            source,
            data_path,
            scratch,
            column_map=column_map if column_map is not None else settings.column_map,
            synthetic={
                "n_users": settings.synth_users,
                "n_items": settings.synth_items,
                "n_events": settings.synth_events,
                "seed": settings.synth_seed,
            },
            encoding=settings.files_encoding,
            max_line_bytes=settings.max_line_bytes,
            max_unpack_bytes=settings.max_unpack_bytes,
            max_zip_members=settings.max_zip_members,
            settled=settled,
        )
        log(f"ingesting layout {plan.layout} ({'; '.join(plan.notes) or 'no notes'})")
        report = ingest(
            con, plan, max_unpack_bytes=settings.max_unpack_bytes,
            max_rejected_per_reason=settings.max_rejected_per_reason,
        )  # fmt: skip
        stats = con.execute(
            "SELECT count(DISTINCT user_id), count(DISTINCT item_id), min(ts), max(ts), avg(rating) "
            "FROM raw.interactions"
        ).fetchall()[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Landed(source, data_path, report, stats[0], stats[1], stats[2], stats[3], float(stats[4]))
