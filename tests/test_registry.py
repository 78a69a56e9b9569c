"""Blessing, atomic promotion, the registry index and the leaderboard files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.io import atomic_write_json, atomic_write_text
from evaluation.leaderboard import leaderboard_markdown, leaderboard_png, write_leaderboard_json
from export.registry import (
    REQUIRED_FILES,
    bless,
    current_version,
    load_current_metrics,
    promote,
    write_index,
)


def release(tmp: Path, name: str, metrics: dict, data_fingerprint: str = "data-1") -> Path:
    """An export folder as the pipeline hands it over: the four required files and extras."""
    d = tmp / name
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx-bytes-" + name.encode())
    (d / "model_topk.onnx").write_bytes(b"topk")
    (d / "signature.json").write_text(json.dumps({"inputs": [{"name": "user_idx", "dtype": "int64"}]}))
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "lineage.json").write_text(
        json.dumps({"family": "mf", "data_fingerprint": data_fingerprint, "config": {"dim": 8}})
    )
    (d / "golden.json").write_text("{}")
    return d


def visible(family_dir: Path) -> list[str]:
    return sorted(p.name for p in family_dir.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------------------
# Blessing
# --------------------------------------------------------------------------------------
def test_bless_must_beat_popularity_strictly(tmp_path):
    root = tmp_path / "registry"
    ok = bless("mf", "topk", {"ndcg@10": 0.2}, {"ndcg@10": 0.1}, root)
    assert ok.blessed and ok.main_metric == "ndcg@10" and ok.previous_version is None
    tie = bless("mf", "topk", {"ndcg@10": 0.1}, {"ndcg@10": 0.1}, root)
    assert not tie.blessed and "does not beat popularity" in tie.reasons[0]
    # rating: lower RMSE is better
    assert bless("mf", "rating", {"rmse": 0.9}, {"rmse": 1.0}, root).blessed
    assert not bless("mf", "rating", {"rmse": 1.1}, {"rmse": 1.0}, root).blessed
    with pytest.raises(ValueError, match="lacks 'auc'"):
        bless("deepfm", "ctr", {"logloss": 0.4}, {"auc": 0.6}, root)


def test_bless_regression_against_current_version(tmp_path):
    root = tmp_path / "registry"
    promote("mf", release(tmp_path, "r1", {"ndcg@10": 0.30}), root, "v1")
    base = {"ndcg@10": 0.1}
    within = bless("mf", "topk", {"ndcg@10": 0.295}, base, root, tolerance=0.02, data_version="data-1")
    assert within.blessed and within.previous_version == "v1" and within.previous_value == 0.30
    assert within.data_version_match is True
    worse = bless("mf", "topk", {"ndcg@10": 0.29}, base, root, tolerance=0.02, data_version="data-2")
    assert not worse.blessed and worse.data_version_match is False
    assert "regresses" in worse.reasons[-1] and "different data versions" in worse.reasons[-1]


def test_bless_regression_lower_is_better(tmp_path):
    root = tmp_path / "registry"
    promote("mf", release(tmp_path, "r1", {"metrics": {"rmse": 1.0}, "data_version": "d"}), root, "v1")
    assert bless("mf", "rating", {"rmse": 1.019}, {"rmse": 1.2}, root).blessed
    assert not bless("mf", "rating", {"rmse": 1.021}, {"rmse": 1.2}, root).blessed
    assert load_current_metrics("mf", root) == {"rmse": 1.0}


# --------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------
def test_promote_copies_everything_and_moves_current(tmp_path):
    root = tmp_path / "registry"
    v1 = promote("mf", release(tmp_path, "r1", {"ndcg@10": 0.3}), root, "v1")
    assert v1 == root / "mf" / "v1"
    assert sorted(p.name for p in v1.iterdir()) == sorted([*REQUIRED_FILES, "model_topk.onnx", "golden.json"])
    assert (v1 / "model.onnx").read_bytes() == b"onnx-bytes-r1"
    assert (root / "mf" / "CURRENT").read_text() == "v1\n"
    promote("mf", release(tmp_path, "r2", {"ndcg@10": 0.31}), root, "v2")
    assert current_version("mf", root) == "v2"
    assert load_current_metrics("mf", root) == {"ndcg@10": 0.31}
    assert visible(root / "mf") == ["CURRENT", "v1", "v2"]
    assert current_version("other", root) is None and load_current_metrics("other", root) is None


def test_promote_refuses_missing_file_and_existing_version(tmp_path):
    root = tmp_path / "registry"
    src = release(tmp_path, "r1", {"ndcg@10": 0.3})
    promote("mf", src, root, "v1")
    with pytest.raises(FileExistsError, match="immutable"):
        promote("mf", src, root, "v1")
    (src / "lineage.json").unlink()
    with pytest.raises(FileNotFoundError, match="lineage.json"):
        promote("mf", src, root, "v2")
    with pytest.raises(ValueError, match="not a valid registry name"):
        promote("mf", src, root, "../escape")
    assert visible(root / "mf") == ["CURRENT", "v1"] and current_version("mf", root) == "v1"


def test_promote_crash_midway_leaves_previous_version(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    promote("mf", release(tmp_path, "r1", {"ndcg@10": 0.3}), root, "v1")
    real_copy = shutil.copy2
    calls = []

    def failing_copy(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="simulated"):
        promote("mf", release(tmp_path, "r2", {"ndcg@10": 0.31}), root, "v2")
    assert len(calls) == 3
    assert current_version("mf", root) == "v1"
    assert visible(root / "mf") == ["CURRENT", "v1"]
    assert list((root / "mf").glob(".*")) == []  # the temp folder was cleaned up too


def test_write_index(tmp_path):
    root = tmp_path / "registry"
    promote("mf", release(tmp_path, "r1", {"ndcg@10": 0.3}), root, "v1")
    promote("mf", release(tmp_path, "r2", {"ndcg@10": 0.31}, "data-2"), root, "v2")
    promote("deepfm", release(tmp_path, "r3", {"auc": 0.7}), root, "a")
    (root / ".scratch").mkdir()  # hidden folders are not families
    index = json.loads(write_index(root).read_text())
    assert sorted(index["families"]) == ["deepfm", "mf"]
    mf = index["families"]["mf"]
    assert mf["version"] == "v2" and mf["path"] == "mf/v2"
    assert mf["metrics"] == {"ndcg@10": 0.31}
    assert mf["signature"]["inputs"][0]["name"] == "user_idx"
    assert mf["lineage"] == {"family": "mf", "data_fingerprint": "data-2"}  # scalars only
    assert "model_topk.onnx" in mf["files"]


def test_atomic_writes(tmp_path):
    target = atomic_write_text(tmp_path / "a" / "b.txt", "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "a" / "c.json", {"x": float("nan")})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.txt"]  # no temp left behind


# --------------------------------------------------------------------------------------
# Leaderboard
# --------------------------------------------------------------------------------------
def rec(model, task, metric, value, baseline=False, split="test"):
    return {
        "model": model, "family_or_baseline": "baseline" if baseline else model, "task": task,
        "metric": metric, "value": value, "split": split, "data_version": "d1",
        "version": None if baseline else "v1", "is_baseline": baseline,
    }  # fmt: skip


RECORDS = [
    rec("mf", "topk", "ndcg@10", 0.30),
    rec("mf", "topk", "recall@20", 0.20),
    rec("mf", "topk", "n_users", 500),
    rec("popularity", "topk", "ndcg@10", 0.10, baseline=True),
    rec("popularity", "topk", "recall@20", 0.25, baseline=True),
    rec("popularity", "topk", "n_users", 500, baseline=True),
    rec("mf", "rating", "rmse", 0.9),
    rec("global_mean", "rating", "rmse", 1.1, baseline=True),
    rec("deepfm", "ctr", "auc", 0.75),
    rec("random", "ctr", "auc", 0.5, baseline=True),
]


def test_leaderboard_files(tmp_path):
    path = write_leaderboard_json(RECORDS, tmp_path / "reports" / "leaderboard.json")
    data = json.loads(path.read_text())
    assert len(data["records"]) == len(RECORDS) and data["main_metric"]["rating"] == ["rmse", "min"]

    md = leaderboard_markdown(RECORDS)
    assert md.index("## rating") < md.index("## topk") < md.index("## ctr")
    topk = md[md.index("## topk") : md.index("## ctr")]
    assert "| mf | mf | v1 | **0.3000** | 0.2000 | 500 |" in topk  # main metric first, best bold
    assert "| popularity *(baseline)* | baseline | – | 0.1000 | **0.2500** | 500 |" in topk
    assert "**0.9000**" in md  # rmse: lower is better

    png = leaderboard_png(RECORDS, tmp_path / "reports" / "leaderboard.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_rejects_bad_records(tmp_path):
    with pytest.raises(ValueError, match="no leaderboard records"):
        leaderboard_markdown([])
    with pytest.raises(ValueError, match="duplicates"):
        leaderboard_markdown([RECORDS[0], RECORDS[0]])
    with pytest.raises(ValueError, match="lacks"):
        write_leaderboard_json([{"model": "x"}], tmp_path / "l.json")
    with pytest.raises(ValueError, match="main metric"):
        leaderboard_png([rec("mf", "topk", "recall@20", 0.2)], tmp_path / "l.png")
