"""Where the raw tables come from: MovieLens layouts and user files, described as data.

A :class:`TableSource` says which files hold one raw table, how to split them into fields
and which SQL expression yields each canonical column. The loader
(:mod:`ingest.loader`) turns that into validated DuckDB tables. Keeping the
description declarative means a new layout is a few lines here and the validation rules
(what gets rejected and why) are written once.

The input guards (zip bombs, binary or over-long text, bad headers) and :class:`SourceError`
live in :mod:`ingest.guards`; ``SourceError``, ``MAX_LINE_BYTES``, ``MAX_UNPACKED_BYTES``
and ``unpack_zip`` stay importable from here.

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from ingest.guards import (
    MAX_LINE_BYTES,
    MAX_UNPACKED_BYTES,
    MAX_ZIP_MEMBERS,
    SourceError,
    delimiter_hint,
    read_header,
    short_error,
    unpack_zip,
)
from ingest.paths import FileStat, folder_members, read_pattern, refuse_links_out

INTERACTION_FIELDS = ("user_id", "item_id", "rating", "timestamp")
USER_FIELDS = ("user_id", "gender", "age", "occupation", "zip_code")
ITEM_FIELDS = ("item_id", "title", "year", "genres")
MOVIELENS_FILES = ("u.data", "u.user", "u.item", "ratings.dat", "users.dat", "movies.dat", "ratings.csv",
                   "movies.csv")  # the files the layouts read: all an archive is unpacked for

# The 19 genre flags of ml-100k's u.item, in file order (u.genre lists the same).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class TableSource:
    """One raw table spread over one or more files of the same layout.

    reader:
      ``lines``   text split on ``delim`` without quoting (MovieLens ``.data``/``.dat``/
                  ``ratings.csv``); every physical line is kept, so a malformed line is
                  rejected with its exact line number. Fields are ``parts[1]``, ``parts[2]``...
      ``csv``     quoted CSV with a header (``movies.csv`` and user files); fields are
                  quoted column names.
      ``parquet`` fields are quoted column names.
    fields: canonical column -> SQL expression over the parsed fields (NULL when absent).
    """

    table: str
    files: tuple[Path, ...]
    reader: str
    fields: dict[str, str]
    delim: str = ","
    encoding: str = "utf-8"
    header: bool = False
    n_fields: int | None = None  # ``lines`` only: the exact field count of a good line
    header_names: tuple[str, ...] = ()  # ``lines`` with header: the expected header
    # Files the landing sensor listed: each must still have this size and mtime after its read.
    settled: dict[Path, FileStat] = field(default_factory=dict)


@dataclass(frozen=True)
class SourcePlan:
    """Everything one ingest reads. ``users``/``items`` are None when the layout has none."""

    layout: str
    interactions: TableSource
    users: TableSource | None = None
    items: TableSource | None = None
    notes: list[str] = field(default_factory=list)
    max_line_bytes: int = MAX_LINE_BYTES  # longer lines in a text file stop the ingest


def _year_from_title(expr: str) -> str:
    # MovieLens titles end in "(1995)"; some have trailing spaces or none at all.
    return f"TRY_CAST(regexp_extract({expr}, '\\((\\d{{4}})\\)\\s*$', 1) AS INTEGER)"


def _genres_pipe(expr: str) -> str:
    # ml-latest marks an item without genres with "(no genres listed)"; ml-1m never does.
    return f"NULLIF(NULLIF(trim({expr}), ''), '(no genres listed)')"


def _p(i: int) -> str:
    return f"parts[{i}]"


def _ml100k(root: Path) -> SourcePlan:
    genres = ", ".join(
        f"CASE WHEN {_p(6 + k)} = '1' THEN '{g.replace(chr(39), chr(39) * 2)}' END"
        for k, g in enumerate(ML100K_GENRES)
        if g != "unknown"
    )
    return SourcePlan(
        layout="ml-100k",
        interactions=TableSource(
            "interactions",
            (_require(root, "u.data", "ml-100k"),),
            "lines",
            dict(zip(INTERACTION_FIELDS, (_p(1), _p(2), _p(3), _p(4)))),
            delim="\t",
            n_fields=4,
        ),
        users=TableSource(
            "users",
            (_require(root, "u.user", "ml-100k"),),
            "lines",
            {
                "user_id": _p(1),
                "age": _p(2),
                "gender": _p(3),
                "occupation": _p(4),
                "zip_code": _p(5),
            },
            delim="|",
            n_fields=5,
        ),
        items=TableSource(
            "items",
            (_require(root, "u.item", "ml-100k"),),
            "lines",
            {
                "item_id": _p(1),
                "title": _p(2),
                # release date is "01-Jan-1995"; fall back to the title's "(1995)"
                "year": f"coalesce(TRY_CAST(right({_p(3)}, 4) AS INTEGER), {_year_from_title(_p(2))})",
                "genres": f"NULLIF(concat_ws('|', {genres}), '')",
            },
            delim="|",
            encoding="latin-1",
            n_fields=24,
        ),
    )


def _ml1m(root: Path) -> SourcePlan:
    users_dat = root / "users.dat"
    users = None
    notes = []
    if users_dat.is_file():
        users = TableSource(
            "users",
            (users_dat,),
            "lines",
            {
                "user_id": _p(1),
                "gender": _p(2),
                "age": _p(3),
                "occupation": _p(4),
                "zip_code": _p(5),
            },
            delim="::",
            n_fields=5,
        )
    else:
        notes.append("no users.dat (ml-10m layout): users get no demographics")
    return SourcePlan(
        layout="ml-1m" if users else "ml-10m",
        interactions=TableSource(
            "interactions",
            (_require(root, "ratings.dat", "ml-1m/ml-10m"),),
            "lines",
            dict(zip(INTERACTION_FIELDS, (_p(1), _p(2), _p(3), _p(4)))),
            delim="::",
            n_fields=4,
        ),
        users=users,
        items=TableSource(
            "items",
            (_require(root, "movies.dat", "ml-1m/ml-10m"),),
            "lines",
            {
                "item_id": _p(1),
                "title": _p(2),
                "year": _year_from_title(_p(2)),
                "genres": _genres_pipe(_p(3)),
            },
            delim="::",
            encoding="latin-1",
            n_fields=3,
        ),
        notes=notes,
    )


def _ml_latest(root: Path) -> SourcePlan:
    return SourcePlan(
        layout="ml-latest",
        interactions=TableSource(
            "interactions",
            (_require(root, "ratings.csv", "ml-latest/ml-20m/ml-25m/ml-32m"),),
            "lines",
            dict(zip(INTERACTION_FIELDS, (_p(1), _p(2), _p(3), _p(4)))),
            delim=",",
            header=True,
            n_fields=4,
            header_names=("userId", "movieId", "rating", "timestamp"),
        ),
        items=TableSource(
            "items",
            (_require(root, "movies.csv", "ml-latest/ml-20m/ml-25m/ml-32m"),),
            "csv",
            {
                "item_id": '"movieId"',
                "title": '"title"',
                "year": _year_from_title('"title"'),
                "genres": _genres_pipe('"genres"'),
            },
            header=True,
        ),
        notes=["no user table in this layout: users get no demographics"],
    )


def _require(root: Path, name: str, layout: str) -> Path:
    path = root / name
    if not path.is_file():
        raise SourceError(f"{path} is missing: the {layout} layout needs {name} in {root}.")
    return path


def _find_layout_root(folder: Path) -> Path:
    """The folder holding the MovieLens files: ``folder`` itself or its only sub-folder."""
    markers = ("u.data", "ratings.dat", "ratings.csv")
    if any((folder / m).is_file() for m in markers):
        return folder
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for sub in subdirs:
        if any((sub / m).is_file() for m in markers):
            return sub
    found = sorted(p.name for p in folder.iterdir())[:20]
    raise SourceError(
        f"No MovieLens layout recognised in {folder}: expected u.data (ml-100k), "
        "ratings.dat (ml-1m, ml-10m) or ratings.csv (ml-latest-small, ml-20m, ml-25m, ml-32m), "
        f"here or in one sub-folder. Found: {found}."
    )


def movielens_plan(
    path: Path, scratch: Path, max_unpack_bytes: int = MAX_UNPACKED_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES, max_zip_members: int = MAX_ZIP_MEMBERS,
) -> SourcePlan:  # fmt: skip
    """Detect the GroupLens layout of a folder or zip (only its MOVIELENS_FILES are unpacked)."""
    if not path.exists():
        raise SourceError(f"{path} does not exist: point RECSYS_DATA_PATH at a MovieLens folder or zip.")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            if path.suffix.lower() == ".zip":
                raise SourceError(
                    f"{path} is not a zip archive that can be read (truncated or corrupt: no zip directory "
                    "at its end); re-download or re-copy it."
                )
            raise SourceError(f"{path} is a file but not a zip: give the MovieLens folder or its .zip file.")
        path = unpack_zip(path, scratch / "unzipped", max_unpack_bytes, max_zip_members, MOVIELENS_FILES)
    root = _find_layout_root(path)
    if (root / "u.data").is_file():
        plan = _ml100k(root)
    elif (root / "ratings.dat").is_file():
        plan = _ml1m(root)
    else:
        plan = _ml_latest(root)
    refuse_links_out((f for t in (plan.interactions, plan.users, plan.items) if t for f in t.files), path)
    return dataclasses.replace(plan, max_line_bytes=max_line_bytes)


# ---------------------------------------------------------------- files source

FILE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".tsv")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), None)


def _columns_of(path: Path, encoding: str, max_line_bytes: int) -> list[str]:
    """The column names of a csv/tsv file (its header line) or a parquet file (its schema)."""
    suffix = _suffix(path)
    if suffix != ".parquet":
        return read_header(path, "\t" if suffix == ".tsv" else ",", encoding, max_line_bytes)
    con = duckdb.connect()
    try:
        pattern = read_pattern(con, path).replace("'", "''")
        return list(con.sql(f"SELECT * FROM read_parquet('{pattern}') LIMIT 0").columns)
    except duckdb.Error as exc:
        raise SourceError(
            f"{path} cannot be read as parquet ({short_error(exc)}); the file is truncated, corrupt "
            "or not parquet: re-export it, or give csv/tsv files their own suffix."
        ) from exc
    finally:
        con.close()


def _file_table(
    table: str,
    files: list[Path],
    canonical: tuple[str, ...],
    required: tuple[str, ...],
    column_map: dict[str, str],
    encoding: str = "utf-8",
    max_line_bytes: int = MAX_LINE_BYTES,
    settled: dict[str, FileStat] | None = None,
) -> TableSource:
    suffixes = {_suffix(f) for f in files}
    if len(suffixes) != 1:
        raise SourceError(
            f"The {table} files mix formats ({sorted(str(f) for f in files)}); use one format per table."
        )
    suffix = suffixes.pop()
    fields: dict[str, str] = {}
    for f in files:
        columns = _columns_of(f, encoding, max_line_bytes)
        missing = [c for c in required if column_map.get(c, c) not in columns]
        if missing:
            wanted = ", ".join(f"{c} (column {column_map.get(c, c)!r})" for c in missing)
            delim = "\t" if suffix == ".tsv" else ","
            hint = delimiter_hint(f, delim, columns) if suffix != ".parquet" else ""
            raise SourceError(
                f"{hint}{f} has no {wanted}. Columns found: {columns}. Rename them or map them with "
                "RECSYS_COLUMN_MAP, e.g. 'user_id=uid,item_id=sku,rating=stars,timestamp=ts'."
            )
        for c in canonical:
            source_col = column_map.get(c, c)
            fields[c] = (
                '"' + source_col.replace('"', '""') + '"' if source_col in columns else "NULL::VARCHAR"
            )
    if table == "items" and fields["year"] == "NULL::VARCHAR" and fields["title"] != "NULL::VARCHAR":
        fields["year"] = _year_from_title(fields["title"])
    reader = "parquet" if suffix == ".parquet" else "csv"
    return TableSource(
        table,
        tuple(files),
        reader,
        fields,
        delim="\t" if suffix == ".tsv" else ",",
        encoding=encoding,
        header=True,
        settled={f: settled[f.name] for f in files} if settled else {},
    )


def files_plan(
    path: Path,
    column_map: dict[str, str] | None = None,
    encoding: str = "utf-8",
    max_line_bytes: int = MAX_LINE_BYTES,
    settled: dict[str, FileStat] | None = None,
) -> SourcePlan:
    """Interactions (and optional users/items) from csv/tsv/parquet files.

    ``path`` is one interactions file, or a folder where ``users.*`` and ``items.*`` are the
    side tables and every other csv/tsv/parquet file holds interactions. Columns are the
    canonical names unless ``column_map`` maps them: ``user_id``, ``item_id``, ``rating``
    (0.5..5), ``timestamp`` (unix seconds or ISO-8601); users: ``user_id``, ``gender``,
    ``age``, ``occupation``, ``zip_code``; items: ``item_id``, ``title``, ``year``,
    ``genres`` ('|'-separated). Only the id columns (and rating, timestamp) are required.
    csv/tsv files are read as ``encoding`` (``utf-8`` or ``latin-1``). Dot-names (files being
    copied in) are skipped; ``settled`` (the landing sensor's list) names exactly the files to read.
    """
    column_map = column_map or {}
    opts = {"encoding": encoding, "max_line_bytes": max_line_bytes, "settled": settled}
    if not path.exists():
        raise SourceError(f"{path} does not exist: point RECSYS_DATA_PATH at a csv/parquet file or folder.")
    if path.is_file() and settled is None:
        if _suffix(path) is None:
            raise SourceError(f"{path} is not a .csv, .csv.gz, .tsv or .parquet file.")
        return SourcePlan(
            "files",
            _file_table("interactions", [path], INTERACTION_FIELDS, INTERACTION_FIELDS, column_map, **opts),
            max_line_bytes=max_line_bytes,
        )
    candidates = folder_members(path, FILE_SUFFIXES, settled)
    side = {"users": None, "items": None}
    interaction_files = []
    for p in candidates:
        stem = p.name[: -len(_suffix(p) or "")].lower()
        if stem in side:
            if side[stem] is not None:
                raise SourceError(
                    f"{path} holds two {stem} tables, {side[stem].name} and {p.name}: keep one (the "
                    f"other would be silently ignored), or move it out of the folder."
                )
            side[stem] = p
        else:
            interaction_files.append(p)
    if not interaction_files:
        raise SourceError(
            f"{path} holds no interaction file: expected at least one .csv/.tsv/.parquet file "
            "besides users.* and items.*."
        )
    return SourcePlan(
        "files",
        _file_table(
            "interactions", interaction_files, INTERACTION_FIELDS, INTERACTION_FIELDS, column_map, **opts
        ),
        users=_file_table("users", [side["users"]], USER_FIELDS, ("user_id",), column_map, **opts)
        if side["users"]
        else None,
        items=_file_table("items", [side["items"]], ITEM_FIELDS, ("item_id",), column_map, **opts)
        if side["items"]
        else None,
        max_line_bytes=max_line_bytes,
    )
