"""The pipeline's steps without Dagster: train -> export -> evaluate -> promote, the reuse
cache, and the registry lock that every promotion takes, whoever calls it."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_models import write_tiny_snapshot

from evaluation.evaluate import evaluate_baselines
from export.registry import current_version, promote_blessed
from models.catalogue import FAMILIES
from pipeline import steps
from pipeline.reuse import source_version
from pipeline.settings import load_settings

LOG = logging.getLogger("test_steps")


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_MODEL_CONFIG", raising=False)
    return load_settings()


def _chain(family, snapshot: str, settings, run_id: str):
    version = source_version(family.fit)
    trained = steps.train(family, snapshot, settings, run_id, LOG, version)
    exported = steps.export(family, str(trained.out), snapshot, settings, run_id, LOG, version)
    popularity = evaluate_baselines(Path(snapshot), family.task.value)["popularity"]
    evaluated = steps.evaluate(family, str(exported.out), snapshot, popularity, settings, run_id, LOG)
    return trained, exported, evaluated, evaluated.record(family, str(exported.out))


def test_chain_runs_without_dagster_and_reuses_on_unchanged_inputs(tmp_path, settings):
    snapshot = str(write_tiny_snapshot(tmp_path / "snap"))
    family = FAMILIES["item_knn"]

    trained, exported, evaluated, record = _chain(family, snapshot, settings, "run1")
    assert not trained.reuse.reused and trained.out == settings.artifacts_dir / "item_knn" / "run1" / "model"
    assert exported.parity["passed"] and (exported.out / "model.onnx").is_file()
    assert evaluated.blessing.blessed, evaluated.blessing.reasons
    assert evaluated.metrics_path.is_file() and evaluated.metrics["rmse"] > 0

    first = steps.promote(family, record, settings, "run1", LOG)
    assert first.promoted and current_version("item_knn", settings.registry_dir) == first.version

    # A second run on the same snapshot, config and code reuses every output of the first...
    again_t, again_x, again_e, again = _chain(family, snapshot, settings, "run2")
    assert again_t.reuse.reused and again_t.out == trained.out and again_t.reuse.key == trained.reuse.key
    assert "run1" in again_t.reuse.note("checkpoint")
    assert again_x.reuse.reused and again_x.out == exported.out
    assert again_e.reuse.reused and again_e.metrics == evaluated.metrics
    # ...and the blessing is decided again, now against the version the first run promoted.
    assert again_e.blessing.previous_version == first.version
    # The same model.onnx is not promoted twice.
    second = steps.promote(family, again, settings, "run2", LOG)
    assert not second.promoted and second.version == first.version and "identical" in second.note


def test_changed_config_gives_a_new_key_and_a_new_checkpoint(tmp_path, settings, monkeypatch):
    snapshot = str(write_tiny_snapshot(tmp_path / "snap"))
    family = FAMILIES["item_knn"]
    version = source_version(family.fit)
    first = steps.train(family, snapshot, settings, "run1", LOG, version)
    override = tmp_path / "models.toml"
    override.write_text("[item_knn]\nk = 7\n")
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(override))
    second = steps.train(family, snapshot, load_settings(), "run2", LOG, version)
    assert not second.reuse.reused and second.reuse.key != first.reuse.key and second.config["k"] == 7

    override.write_text("[item_knn]\nkk = 7\n")
    with pytest.raises(ValueError, match=r"kk"):
        steps.train(family, snapshot, load_settings(), "run3", LOG, version)


def test_emb_knn_checkpoint_depends_only_on_the_upstream_model_it_reads(tmp_path, settings, monkeypatch):
    """emb_knn declares four embedding sources and reads the one ``source`` names: a new model
    of another source (gmf retrained) reuses its checkpoint; a new model of its source does not."""
    snapshot = str(write_tiny_snapshot(tmp_path / "snap"))
    override = tmp_path / "models.toml"
    override.write_text('[emb_knn]\nsource = "wals"\n')
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(override))
    settings = load_settings()
    wals, knn = FAMILIES["wals"], FAMILIES["emb_knn"]
    wals_dir = str(steps.train(wals, snapshot, settings, "w1", LOG, source_version(wals.fit)).out)
    gmf_dirs = [tmp_path / "gmf1", tmp_path / "gmf2"]  # never read: need not hold a model
    for d in gmf_dirs:
        d.mkdir()

    def train(run_id: str, wals_dir: str, gmf_dir: Path):
        dirs = {"model_wals": wals_dir, "model_gmf": str(gmf_dir)}
        return steps.train(knn, snapshot, settings, run_id, LOG, source_version(knn.fit), dirs)

    first = train("k1", wals_dir, gmf_dirs[0])
    assert not first.reuse.reused and list(first.upstream_models) == ["model_wals"]
    assert train("k2", wals_dir, gmf_dirs[1]).reuse.reused
    override.write_text('[emb_knn]\nsource = "wals"\n[wals]\ndim = 8\n')
    settings = load_settings()
    other_wals = str(steps.train(wals, snapshot, settings, "w2", LOG, source_version(wals.fit)).out)
    assert not train("k3", other_wals, gmf_dirs[1]).reuse.reused


# Another process holds the registry lock until it reads a line on stdin.
HOLDER = """
import sys
from export.registry import registry_lock
with registry_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_promotion_from_anywhere_waits_for_the_registry_lock(tmp_path):
    """export.registry.promote_blessed (and promote) take the lock themselves: a promotion
    started while another process holds it waits, and says so, until it is released."""
    release_dir = tmp_path / "release"
    release_dir.mkdir()
    for name in ("model.onnx", "signature.json", "lineage.json"):
        (release_dir / name).write_text(f"{name}\n" if name == "model.onnx" else "{}\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"rmse": 1.0}\n')
    registry = tmp_path / "registry"
    registry.mkdir()

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(registry)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held", "the lock holder did not start"
        waiting, done = threading.Event(), []

        def promote_now():
            done.append(promote_blessed("wals", release_dir, metrics, registry, tmp_path / "staging",
                                        on_wait=lambda msg: waiting.set()))  # fmt: skip

        worker = threading.Thread(target=promote_now)
        worker.start()
        assert waiting.wait(60), "promote_blessed did not wait for the lock another process holds"
        assert not done and current_version("wals", registry) is None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        worker.join(60)
        assert done and done[0].promoted and current_version("wals", registry) == done[0].version
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait(60)


def test_promotion_sweeps_leftovers_of_a_killed_promotion(tmp_path):
    release_dir = tmp_path / "release"
    release_dir.mkdir()
    for name in ("model.onnx", "signature.json", "lineage.json"):
        (release_dir / name).write_text("x\n" if name == "model.onnx" else "{}\n")
    (tmp_path / "metrics.json").write_text('{"rmse": 1.0}\n')
    leftover = tmp_path / "registry" / "wals" / ".20260101T000000Z-deadbeef.abc.tmp"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_text("half")
    result = promote_blessed("wals", release_dir, tmp_path / "metrics.json", tmp_path / "registry",
                             tmp_path / "staging")  # fmt: skip
    assert result.promoted and result.swept == [leftover.name] and not leftover.exists()
    assert (tmp_path / "registry" / "index.json").is_file()
