"""After a partial run the leaderboard lists the families it did not run under the snapshot
their latest evaluation scored, never under the new snapshot's data version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from evaluation.leaderboard import publish_leaderboard


def _snapshot(root: Path, fingerprint: str, split: str) -> Path:
    folder = root / "snapshots" / fingerprint
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "split": split}))
    return folder


def _eval(family: str, snapshot: Path | None, rmse: float) -> dict:
    record = {"family": family, "task": "rating", "metrics": {"rmse": rmse, "mae": rmse * 0.8}}
    if snapshot is not None:
        record["snapshot"] = str(snapshot)
    return record


def test_an_evaluation_of_an_older_snapshot_keeps_its_own_label(tmp_path):
    old = _snapshot(tmp_path, "aaaa1111", "temporal")
    new = _snapshot(tmp_path, "bbbb2222", "leave_last_out")
    baselines = {"rating": {"popularity": {"rmse": 1.0, "mae": 0.8}}}
    evals = [_eval("mf_sgd", new, 0.9), _eval("item_knn", old, 0.95), _eval("user_knn", None, 0.97)]
    board = publish_leaderboard(evals, baselines, new, tmp_path / "reports")
    labels = {r["model"]: (r["split"], r["data_version"]) for r in board.records}
    assert labels["mf_sgd"] == ("leave_last_out", "bbbb2222")
    assert labels["item_knn"] == ("temporal", "aaaa1111")
    # written before evaluations named their snapshot: taken to be of the current one
    assert labels["user_knn"] == ("leave_last_out", "bbbb2222")
    assert labels["baseline:popularity"] == ("leave_last_out", "bbbb2222")
    assert "data `aaaa1111`" in board.markdown and "data `bbbb2222`" in board.markdown

    shutil.rmtree(old)  # pruned since: its folder name still says which data it scored
    board = publish_leaderboard(evals, baselines, new, tmp_path / "reports")
    labels = {r["model"]: (r["split"], r["data_version"]) for r in board.records}
    assert labels["item_knn"] == ("?", "aaaa1111")
