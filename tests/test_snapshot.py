"""The training snapshot: a clear error without marts, atomic and content-addressed with them."""

from __future__ import annotations

import duckdb
import pytest

from models.data import Snapshot, SnapshotError
from orchestration.snapshot import MissingMartError, write_snapshot


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


def test_every_family_has_one_config_entry():
    import tomllib

    from models.registry import FAMILIES
    from orchestration.assets.training import FAMILY_CONFIG_FILE

    assert set(tomllib.loads(FAMILY_CONFIG_FILE.read_text())) == set(FAMILIES)


def test_model_config_section_for_unknown_family_is_refused(tmp_path, monkeypatch):
    import dagster as dg

    from orchestration.assets.training import family_configs
    from orchestration.settings import load_settings

    bad = tmp_path / "models.toml"
    bad.write_text("[deep_fm]\nepochs = 3\n")
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(bad))
    with pytest.raises(dg.Failure, match=r"\[deep_fm\].*Did you mean \[deepfm\]\?.*known families: .*deepfm"):
        family_configs(load_settings())
