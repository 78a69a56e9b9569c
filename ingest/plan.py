"""Pick the source named by the settings and describe what one ingest reads."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.io import wrapped_storage_error
from ingest.guards import MAX_LINE_BYTES, MAX_UNPACKED_BYTES, MAX_ZIP_MEMBERS, SourceError
from ingest.layouts import (
    INTERACTION_FIELDS,
    ITEM_FIELDS,
    USER_FIELDS,
    SourcePlan,
    TableSource,
    files_plan,
    movielens_plan,
)
from ingest.paths import FileStat


def _parquet_table(table: str, files: list[Path], fields: tuple[str, ...]) -> TableSource:
    return TableSource(table, tuple(files), "parquet", {c: f'"{c}"' for c in fields})


def synthetic_plan(scratch: Path, n_users: int, n_items: int, n_events: int, seed: int) -> SourcePlan:
    """Generate the embedded data set into ``scratch`` and read it like user parquet files."""
    from ingest.synthetic import SyntheticConfig, generate

    try:
        config = SyntheticConfig(n_users=n_users, n_items=n_items, n_events=n_events, seed=seed)
    except ValueError as exc:
        raise SourceError(
            f"{exc}. Adjust RECSYS_SYNTH_USERS / RECSYS_SYNTH_ITEMS / RECSYS_SYNTH_EVENTS."
        ) from exc
    out = scratch / "synthetic"
    try:
        if out.exists():
            shutil.rmtree(out)
        result = generate(config, out)
    except Exception as exc:
        # pyarrow reports a full disk as its own error; name the folder and the fix.
        storage = wrapped_storage_error(exc, out, kept="The previous raw tables are kept.")
        if storage is not None:
            raise storage from exc
        raise
    return SourcePlan(
        layout="synthetic",
        interactions=_parquet_table("interactions", list(result.interactions), INTERACTION_FIELDS),
        users=_parquet_table("users", [result.users], USER_FIELDS),
        items=_parquet_table("items", [result.items], ITEM_FIELDS),
        notes=[f"synthetic: {config}"],
    )


def build_plan(
    source: str,
    data_path: Path | None,
    scratch: Path,
    column_map: dict[str, str] | None = None,
    synthetic: dict[str, int] | None = None,
    encoding: str = "utf-8",
    max_line_bytes: int = MAX_LINE_BYTES,
    max_unpack_bytes: int = MAX_UNPACKED_BYTES,
    max_zip_members: int = MAX_ZIP_MEMBERS,
    settled: dict[str, FileStat] | None = None,
) -> SourcePlan:
    """The plan of ``source``. ``encoding`` is the ``files`` source's csv/tsv encoding,
    ``max_line_bytes`` the longest text line accepted, ``max_unpack_bytes`` and
    ``max_zip_members`` the zip-bomb guards of a MovieLens archive (RECSYS_FILES_ENCODING,
    RECSYS_MAX_LINE_BYTES, RECSYS_MAX_UNPACK_BYTES, RECSYS_MAX_ZIP_MEMBERS). ``settled``
    (``files`` only: the landing sensor's list of file name -> size and mtime) names exactly
    the files of the folder to read."""
    if settled is not None and source != "files":
        raise SourceError(
            f"A list of settled files applies to the files source only, not {source!r}: leave the "
            "list out of the run config, or set source to files."
        )
    if source == "synthetic":
        return synthetic_plan(scratch, **(synthetic or {}))
    if data_path is None:
        raise SourceError(f"source {source!r} needs a data path (RECSYS_DATA_PATH).")
    if source == "movielens":
        return movielens_plan(
            data_path, scratch, max_unpack_bytes=max_unpack_bytes, max_line_bytes=max_line_bytes,
            max_zip_members=max_zip_members,
        )  # fmt: skip
    if source == "files":
        return files_plan(
            data_path, column_map, encoding=encoding, max_line_bytes=max_line_bytes, settled=settled
        )
    raise SourceError(f"Unknown source {source!r}: use synthetic, movielens or files.")
