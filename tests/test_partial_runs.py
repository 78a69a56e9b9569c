"""A partial run after new data, as the README shows it: ``recsys run --select 'model_wals*'``.

The selection takes in ``model_emb_knn`` (downstream of ``model_wals``), which builds on the
embeddings of ``model_mf_implicit``, a family the selection leaves out. After new data only
the snapshot was rebuilt (a run killed during training), so the latest ``mf_implicit`` model
was fitted on the previous snapshot. ``recsys run`` adds it to the run, saying why; the emb_knn
step launched without it (the UI, ``dagster asset materialize``) stops, naming the asset to
add."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from test_models import write_tiny_snapshot

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    # emb_knn brings the four families whose embeddings it may use (wals, mf_implicit, gmf, mf_sgd)
    "RECSYS_FAMILIES": "wals,emb_knn",
    "RECSYS_SYNTH_USERS": "100",
    "RECSYS_SYNTH_ITEMS": "400",
    "RECSYS_SYNTH_EVENTS": "5000",
    "RECSYS_MAX_CONCURRENT": "1",
}
CLEARED = ("DAGSTER_HOME", "RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_COLUMN_MAP", "RECSYS_SPLIT",
           "RECSYS_MODEL_CONFIG", "RECSYS_MIN_EVENTS", "RECSYS_SYNTH_SEED")  # fmt: skip
RUN_LINE = re.compile(r"^recsys run: run (\S+), \d+ steps?$", re.MULTILINE)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(SMALL, RECSYS_HOME=str(home), DBT_SEND_ANONYMOUS_USAGE_STATS="false",
               GX_ANALYTICS_ENABLED="false", **extra)  # fmt: skip
    return env


def _recsys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _killed_during_training(env: dict[str, str]) -> str:
    """``recsys run`` on the new data, killed (SIGKILL) as the first model starts training:
    ingest, dbt and the snapshot are done, no model is."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "run"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\bstart\s+model_", line):
                proc.kill()
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    out = "".join(seen)
    assert proc.returncode == -9, f"the run ended before any model started:\n{out[-3000:]}"
    return out


def _latest(instance: dg.DagsterInstance, key: str) -> tuple[str, dict]:
    """(run id, metadata values) of the asset's latest materialisation."""
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was never materialised"
    metadata = event.asset_materialization.metadata
    return event.run_id, {name: getattr(value, "value", value) for name, value in metadata.items()}


def _fitted_on(instance: dg.DagsterInstance, family: str) -> str:
    return str(_latest(instance, f"model_{family}")[1]["snapshot"])


@pytest.mark.slow
def test_readme_partial_run_after_new_data_brings_the_stale_upstream_model(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _recsys(_env(home), "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    new_data = _env(home, RECSYS_SYNTH_SEED="7")
    _killed_during_training(new_data)
    dagster_home = home / "dagster"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        snapshot = str(_latest(instance, "training_snapshot")[1]["snapshot_dir"])
        old = _fitted_on(instance, "mf_implicit")
    assert old != snapshot, "the killed run rebuilt the snapshot but fitted no model on it"

    # Launched on its own, as from the UI: the step names the asset to add to the selection.
    from orchestration.cli import reap_dead_runs

    assert reap_dead_runs(dagster_home), "the killed run is settled, freeing its pool slot"
    alone = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "--select",
         "model_emb_knn", "-m", "orchestration.definitions"],
        env={**new_data, "DAGSTER_HOME": str(dagster_home)}, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    both = alone.stdout + alone.stderr
    assert alone.returncode != 0, both[-3000:]
    assert "Add model_mf_implicit to the selection" in both, both[-3000:]

    # The README's example: the stale upstream model joins the run, with one line saying why.
    done = _recsys(new_data, "run", "--select", "model_wals*")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    added = re.findall(r"^recsys run: also running (\S+): (.*)$", done.stdout, re.MULTILINE)
    assert [name for name, _ in added] == ["model_mf_implicit"], out[-4000:]
    assert "model_emb_knn builds on it" in added[0][1] and Path(old).name in added[0][1], added
    run_id = RUN_LINE.search(done.stdout).group(1)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        knn_run, knn = _latest(instance, "model_emb_knn")
        assert knn_run == run_id and knn["snapshot"] == snapshot
        assert _fitted_on(instance, "mf_implicit") == snapshot
        used = knn["upstream_models"]
        assert list(used) == ["model_mf_implicit"] and f"run_id={run_id} " in used["model_mf_implicit"], used
        # sources emb_knn does not read are left alone
        assert _fitted_on(instance, "gmf") == old


def _materialised(instance: dg.DagsterInstance, key: str, **metadata) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata=metadata))


def _snapshot(root: Path, seed: int, data_version: str) -> str:
    """A tiny snapshot whose meta.json names the raw data version it was built from."""
    path = write_tiny_snapshot(root, seed)
    meta = json.loads((path / "meta.json").read_text())
    meta.update(fingerprint=root.name, upstream={"raw_interactions": data_version})
    (path / "meta.json").write_text(json.dumps(meta))
    return str(path)


def test_only_a_stale_upstream_that_fit_reads_joins_the_selection(tmp_path: Path, monkeypatch) -> None:
    from models.emb_knn import SOURCES
    from orchestration.launch import with_fitted_upstream

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_MODEL_CONFIG", raising=False)
    old, new = _snapshot(tmp_path / "old", 0, "v1"), _snapshot(tmp_path / "new", 1, "v2")
    wals_chain = {dg.AssetKey(k) for k in ("model_wals", "onnx_wals", "model_emb_knn", "onnx_emb_knn")}
    with dg.DagsterInstance.ephemeral() as instance:
        _materialised(instance, "training_snapshot", snapshot_dir=dg.MetadataValue.path(new))
        for source in SOURCES:
            _materialised(instance, f"model_{source}", snapshot=old)

        keys = set(wals_chain)
        lines = with_fitted_upstream(instance, keys)
        assert keys == wals_chain | {dg.AssetKey("model_mf_implicit")}, "emb_knn reads mf_implicit only"
        assert len(lines) == 1 and lines[0].startswith(
            "recsys run: also running model_mf_implicit: model_emb_knn builds on it and its latest "
            "model (run "
        ), lines
        assert lines[0].endswith("was fitted on snapshot old, not on new"), lines

        # the source the config names is the one that joins
        config = tmp_path / "models.toml"
        config.write_text('[emb_knn]\nsource = "gmf"\n')
        monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(config))
        keys = set(wals_chain)
        (line,) = with_fitted_upstream(instance, keys)
        assert line.startswith("recsys run: also running model_gmf: ") and dg.AssetKey("model_gmf") in keys
        monkeypatch.delenv("RECSYS_MODEL_CONFIG")

        # a model fitted on the same snapshot, or on a copy built from the same inputs, stays out
        _materialised(instance, "model_mf_implicit", snapshot=new)
        keys = set(wals_chain)
        assert with_fitted_upstream(instance, keys) == [] and keys == wals_chain
        # (the marts' float columns differ in the last bits from one dbt build to the next)
        _materialised(instance, "model_mf_implicit", snapshot=_snapshot(tmp_path / "rebuilt", 1, "v2"))
        assert with_fitted_upstream(instance, set(wals_chain)) == []

        # the snapshot is rebuilt in this run: which one is not known, so the upstream joins
        keys = wals_chain | {dg.AssetKey("training_snapshot")}
        (line,) = with_fitted_upstream(instance, keys)
        assert dg.AssetKey("model_mf_implicit") in keys and "training_snapshot is rebuilt" in line


def test_emb_knn_trains_where_only_the_source_it_reads_was_ever_trained(tmp_path: Path, dagster_home,
                                                                        monkeypatch) -> None:  # fmt: skip
    """emb_knn declares four embedding sources but reads one: a home that trained only that one
    (``RECSYS_FAMILIES=mf_implicit``, then ``--families emb_knn`` of the large benchmark) must
    not fail on loading the other three, and a source it does read that was never trained is
    refused by name."""
    from orchestration.assets.families import UPSTREAM_LOADER, build_family_assets, upstream_checkpoint
    from orchestration.assets.snapshot import training_snapshot

    config = tmp_path / "models.toml"
    config.write_text("[mf_implicit]\nepochs = 2\n")
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(config))
    snapshot = write_tiny_snapshot(tmp_path / "snap")

    @dg.asset(key=training_snapshot.key)
    def stub_snapshot() -> str:
        return str(snapshot)

    from models.emb_knn import SOURCES

    graph = [stub_snapshot, *(build_family_assets(name)[0] for name in (*SOURCES, "emb_knn"))]
    resources = {UPSTREAM_LOADER: upstream_checkpoint}
    instance = dg.DagsterInstance.get()

    def materialize(*names: str) -> dg.ExecuteInProcessResult:
        selection = [training_snapshot.key, *(dg.AssetKey(f"model_{n}") for n in names)]
        return dg.materialize(graph, selection=selection, instance=instance, resources=resources,
                              raise_on_error=False)  # fmt: skip

    run = materialize("mf_implicit", "emb_knn")
    assert run.success
    meta = run.asset_materializations_for_node("model_emb_knn")[0].metadata
    assert list(meta["upstream_models"].value) == ["model_mf_implicit"]
    assert instance.get_latest_materialization_event(dg.AssetKey("model_gmf")) is None

    config.write_text('[mf_implicit]\nepochs = 2\n[emb_knn]\nsource = "gmf"\n')
    failed = materialize("emb_knn")
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "model_gmf" in message and "it was never materialised" in message, message


def test_leaderboard_leaves_off_families_never_evaluated(tmp_path: Path, dagster_home, monkeypatch) -> None:
    """The leaderboard spans every family of the definitions; a home that evaluated only some
    (``RECSYS_FAMILIES=mf_sgd recsys run``, then ``recsys run --select leaderboard``)
    gets a board of those, not a missing-file failure on the others' stored values."""
    from orchestration.assets.evaluation import (
        EVAL_LOADER,
        baseline_metrics,
        build_leaderboard_asset,
        latest_evaluation,
    )
    from orchestration.assets.families import UPSTREAM_LOADER, build_family_assets, upstream_checkpoint
    from orchestration.assets.snapshot import training_snapshot

    config = tmp_path / "models.toml"
    config.write_text("[mf_sgd]\nepochs = 2\n")
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(config))
    monkeypatch.setenv("RECSYS_FAMILIES", "mf_sgd,gmf")
    snapshot = write_tiny_snapshot(tmp_path / "snap")

    @dg.asset(key=training_snapshot.key)
    def stub_snapshot() -> str:
        return str(snapshot)

    families = ["mf_sgd", "gmf"]
    graph = [stub_snapshot, baseline_metrics, *(a for n in families for a in build_family_assets(n)),
             build_leaderboard_asset(families)]  # fmt: skip
    resources = {UPSTREAM_LOADER: upstream_checkpoint, EVAL_LOADER: latest_evaluation}
    instance = dg.DagsterInstance.get()

    def materialize(*keys: str) -> dg.ExecuteInProcessResult:
        return dg.materialize(graph, selection=[dg.AssetKey(k) for k in keys], instance=instance,
                              resources=resources, raise_on_error=False)  # fmt: skip

    alone = materialize("training_snapshot", "baseline_metrics", "leaderboard")
    assert not alone.success
    (failure,) = [e for e in alone.all_events if e.is_step_failure]
    assert "no family was ever evaluated" in failure.step_failure_data.error.message

    chain = ("model_mf_sgd", "onnx_mf_sgd", "eval_mf_sgd")
    assert materialize("training_snapshot", "baseline_metrics", *chain).success
    # a later run of the leaderboard alone reads the stored evaluation (the FS IO manager's file)
    board = materialize("training_snapshot", "baseline_metrics", "leaderboard")
    assert board.success
    meta = board.asset_materializations_for_node("leaderboard")[0].metadata
    assert meta["never_evaluated"].value == "gmf"
    records = json.loads(Path(meta["json"].value).read_text())["records"]
    models = {r["model"] for r in records}
    assert "mf_sgd" in models and "gmf" not in models, models
