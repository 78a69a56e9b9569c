"""The training snapshot: a clear error without marts, atomic and content-addressed with them."""

from __future__ import annotations

import duckdb
import pytest

from models.data import Snapshot, SnapshotError
from pipeline.snapshot import MissingMartError, write_snapshot


def test_missing_mart_names_it_and_the_fix(tmp_path):
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE TABLE main.fct_ratings (event_id BIGINT)")
    with pytest.raises(MissingMartError, match=r"fct_ctr_samples.*materialise the dbt"):
        write_snapshot(con, tmp_path / "snapshots")
    assert not (tmp_path / "snapshots").exists() or not any((tmp_path / "snapshots").iterdir())


def test_incomplete_snapshot_folder_is_refused(tmp_path):
    with pytest.raises(SnapshotError, match="meta.json is missing"):
        Snapshot(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(SnapshotError, match=r"fct_ratings\.parquet is missing"):
        Snapshot(tmp_path)


def test_family_config_file_names_only_families():
    """models/families.toml holds only non-default values, so it may omit a family, never invent one."""
    import tomllib

    from models.catalogue import FAMILIES
    from pipeline.family_config import FAMILY_CONFIG_FILE

    assert set(tomllib.loads(FAMILY_CONFIG_FILE.read_text())) <= set(FAMILIES)


def test_model_config_section_for_unknown_family_is_refused(tmp_path, monkeypatch):
    from pipeline.family_config import FamilyConfigError, family_configs
    from pipeline.settings import load_settings

    bad = tmp_path / "models.toml"
    bad.write_text("[deep_fm]\nepochs = 3\n")
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(bad))
    hint = r"\[deep_fm\].*Did you mean \[deepfm\]\?.*known families: .*deepfm"
    with pytest.raises(FamilyConfigError, match=hint):
        family_configs(load_settings())


def test_family_selection_adds_upstream_and_names_typos():
    from models.catalogue import FAMILIES, select_families

    assert select_families(None) == list(FAMILIES)
    chosen = select_families(["emb_knn", "deepfm"])
    assert {"emb_knn", "deepfm", *FAMILIES["emb_knn"].upstream} == set(chosen)
    assert chosen == [n for n in FAMILIES if n in chosen]  # registry order
    with pytest.raises(ValueError, match=r"'deep_fm': did you mean 'deepfm'"):
        select_families(["deep_fm"])


def test_recsys_families_limits_the_asset_graph(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "from orchestration.definitions import defs; "
        "print(sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()))"
    )
    env = {**os.environ, "RECSYS_HOME": str(tmp_path), "RECSYS_FAMILIES": "wals, deepfm"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = eval(done.stdout.strip().splitlines()[-1])
    models = {k for k in keys if k.startswith("model_")}
    assert models == {"model_wals", "model_deepfm"} and "leaderboard" in keys
    env["RECSYS_FAMILIES"] = "wals,nope"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "RECSYS_FAMILIES" in done.stderr and "nope" in done.stderr


def test_temp_folders_of_killed_writers_are_swept(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.snapshot import sweep_dead_temp_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".abc123.{dead}.tmp"
    live = tmp_path / f".abc123.{os.getpid()}.tmp"
    other = tmp_path / ".not-a-snapshot.tmp"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "fct_ratings.parquet").write_bytes(b"half")
    assert sweep_dead_temp_folders(tmp_path) == [stale]
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_build_info_is_the_one_row_dbt_wrote(tmp_path):
    from pipeline.snapshot import read_build_info

    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    assert read_build_info(con) is None
    con.execute(
        "CREATE TABLE main.mart_build_info AS SELECT 'leave_last_out' AS split, 0.1::DOUBLE AS valid_frac, "
        "0.2::DOUBLE AS test_frac, 7::BIGINT AS split_seed, 30 AS history_len"
    )
    assert read_build_info(con) == {
        "split": "leave_last_out", "valid_frac": 0.1, "test_frac": 0.2, "split_seed": 7, "history_len": 30,
    }  # fmt: skip
    con.execute("INSERT INTO main.mart_build_info SELECT * FROM main.mart_build_info")
    with pytest.raises(ValueError, match="one row"):
        read_build_info(con)


def test_snapshot_needs_the_build_info(tmp_path):
    from pipeline.snapshot import TABLES

    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    for table in TABLES:
        con.execute(f"CREATE TABLE main.{table} (event_id BIGINT)")
    with pytest.raises(MissingMartError, match=r"mart_build_info.*materialise the dbt"):
        write_snapshot(con, tmp_path / "snapshots")


def test_a_snapshot_from_before_build_info_gains_it(tmp_path):
    import json

    from pipeline.snapshot import _add_build_info

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"fingerprint": "f", "split": "temporal", "history_len": 50}))
    info = {"split": "stratified", "valid_frac": 0.1, "test_frac": 0.1, "split_seed": 3, "history_len": 20}
    _add_build_info(meta, info)
    written = json.loads(meta.read_text())
    assert written["build_info"] == info and written["split"] == "stratified" and written["history_len"] == 20
    _add_build_info(meta, {**info, "split": "temporal"})  # content-addressed: the first label stays
    assert json.loads(meta.read_text())["split"] == "stratified"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
