"""Freeze the marts a training run reads into parquet files plus ``meta.json``.

Training and evaluation then read files, not the warehouse: DuckDB admits one process at
a time, so a snapshot lets families train in parallel while the next ingest waits for
nobody, and it pins exactly which rows trained a model (its data version is the hash of
the marts it holds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb

from common.io import folder_lock

SPARSE_FIELDS = ("user_idx", "item_idx", "gender_idx", "age_idx", "occupation_idx", "genre_idx",
                 "year_idx", "hour_idx", "weekday_idx")  # fmt: skip
DENSE_FIELDS = ("dense_user_activity", "dense_item_popularity", "dense_item_age")
TABLES = {
    "fct_ratings": "SELECT event_id, user_idx, item_idx, rating, ts, split FROM main.fct_ratings "
    "ORDER BY event_id",
    "fct_ctr_samples": "SELECT event_id, split, ts, label_like, label_love, "
    + ", ".join(SPARSE_FIELDS + DENSE_FIELDS)
    + ", history_item_idx, history_len FROM main.fct_ctr_samples ORDER BY event_id",
    "dim_users": "SELECT * FROM main.dim_users ORDER BY user_idx",
    "dim_items": "SELECT * FROM main.dim_items ORDER BY item_idx",
    "user_stats": "SELECT * FROM main.user_stats ORDER BY user_idx",
    "item_stats": "SELECT * FROM main.item_stats ORDER BY item_idx",
}
# Rows per parquet row group: the unit the streaming loader (models/stream.py) reads, shuffles as a
# block and shards by rank, so it bounds training's memory (~65 MB of rows with 50-item histories).
# 2^17 keeps the default data (100k events) in one group, where streaming equals in-memory training.
ROW_GROUP_ROWS = 1 << 17
# The dbt vars the marts were built with (one row). Read into meta.json, never hashed into
# the fingerprint: the fingerprint is the marts' content, the leaderboard's data version.
BUILD_INFO = "mart_build_info"
BUILD_INFO_COLUMNS = ("split", "valid_frac", "test_frac", "split_seed", "history_len")


def marts_fingerprint(con: duckdb.DuckDBPyConnection) -> str:
    """Order-independent content hash of the marts a snapshot holds."""
    parts = []
    for table in TABLES:
        n, h = con.execute(
            f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM main.{table} t"
        ).fetchone()
        parts.append(f"{table}:{n}:{h}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class MissingMartError(LookupError):
    """A mart the snapshot needs is not in the warehouse."""


def _main_relations(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Tables and views of schema main: on Spark the marts are views over its parquet folders."""
    sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
    return {r[0] for r in con.execute(sql).fetchall()}


def require_marts(con: duckdb.DuckDBPyConnection) -> None:
    present = _main_relations(con)
    missing = [t for t in (*TABLES, BUILD_INFO) if t not in present]
    if missing:
        raise MissingMartError(
            f"The warehouse has no mart {', '.join(missing)} (schema main): materialise the dbt "
            "assets (the `marts` group, or the whole graph with `recsys run`) before training."
        )


def read_build_info(con: duckdb.DuckDBPyConnection) -> dict[str, object] | None:
    """The one row of ``main.mart_build_info`` as a dict, or None when dbt has not built it."""
    if BUILD_INFO not in _main_relations(con):
        return None
    rows = con.execute(f"SELECT {', '.join(BUILD_INFO_COLUMNS)} FROM main.{BUILD_INFO}").fetchall()
    if len(rows) != 1:
        raise ValueError(f"main.{BUILD_INFO} must hold one row, it holds {len(rows)}: rebuild it with dbt.")
    return dict(zip(BUILD_INFO_COLUMNS, rows[0], strict=True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_dead_temp_folders(root: Path) -> list[Path]:
    """Remove ``.<fingerprint>.<pid>.tmp`` folders whose writer process is gone (a killed run).

    A live writer's folder is left alone; so is anything not named like a snapshot temp folder.
    """
    removed = []
    if not root.is_dir():
        return removed
    for folder in root.glob(".*.tmp"):
        parts = folder.name.split(".")  # ["", fingerprint, pid, "tmp"]
        if len(parts) != 4 or not parts[2].isdigit() or not folder.is_dir():
            continue
        if not _pid_alive(int(parts[2])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _add_build_info(meta_path: Path, build_info: dict[str, object]) -> None:
    """Give a snapshot written before ``build_info`` existed the build's vars (same marts)."""
    meta = json.loads(meta_path.read_text())
    if "build_info" in meta:
        return
    meta.update(build_info=build_info, split=build_info["split"], history_len=build_info["history_len"])
    tmp = meta_path.with_name(f".meta.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)


def write_snapshot(con: duckdb.DuckDBPyConnection, root: Path, extra_meta: dict | None = None) -> Path:
    """Write ``root/<fingerprint>/`` atomically (temp folder, then rename); reuse it if present.

    Temp folders left by a writer that was killed are removed first. ``meta.json`` records
    the dbt vars of the build as ``build_info`` (from ``main.mart_build_info``) and its
    ``split`` and ``history_len`` at the top level; they win over ``extra_meta``.
    """
    require_marts(con)
    build_info = read_build_info(con)
    if build_info is None:  # require_marts has checked; a concurrent drop is all that is left
        raise MissingMartError(f"The warehouse has no mart {BUILD_INFO}: rebuild the dbt assets.")
    sweep_dead_temp_folders(root)
    fingerprint = marts_fingerprint(con)
    final = root / fingerprint
    with folder_lock(final) as held:  # storage retention cannot move it away while we look
        if held and (final / "meta.json").exists():
            _add_build_info(final / "meta.json", build_info)
            with contextlib.suppress(OSError):  # a read-only home still reads its snapshot
                os.utime(final)  # the newest snapshot is the one retention always keeps: reuse is use
            return final
    tmp = root / f".{fingerprint}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for table, sql in TABLES.items():
        path = str(tmp / f"{table}.parquet").replace("'", "''")
        con.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
    cardinality = {
        field: int(
            con.execute(f"SELECT coalesce(max({field}), 0) + 1 FROM main.fct_ctr_samples").fetchone()[0]
        )
        for field in SPARSE_FIELDS
    }
    # Train-fitted vocabularies set the embedding sizes; facts can only hold indices <= these.
    cardinality["user_idx"] = int(con.execute("SELECT count(*) + 1 FROM main.dim_users").fetchone()[0])
    cardinality["item_idx"] = int(con.execute("SELECT count(*) + 1 FROM main.dim_items").fetchone()[0])
    splits = dict(con.execute("SELECT split, count(*) FROM main.fct_ratings GROUP BY 1").fetchall())
    rating_min, rating_max = con.execute("SELECT min(rating), max(rating) FROM main.fct_ratings").fetchone()
    history_len = con.execute("SELECT max(history_len) FROM main.fct_ctr_samples").fetchone()[0]
    meta = {
        "fingerprint": fingerprint,
        "n_users": cardinality["user_idx"],  # embedding rows, index 0 = unknown
        "n_items": cardinality["item_idx"],
        "sparse_fields": list(SPARSE_FIELDS),
        "sparse_cardinality": cardinality,
        "dense_fields": list(DENSE_FIELDS),
        "split_rows": splits,
        "rating_range": [float(rating_min), float(rating_max)],
        "max_history_len": int(history_len or 0),
        **(extra_meta or {}),
        "build_info": build_info,
        "split": build_info["split"],
        "history_len": build_info["history_len"],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "meta.json").exists():  # lost a race to a writer that failed
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final
