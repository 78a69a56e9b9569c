"""Every family through the real Dagster graph on the default synthetic data: trained,
exported, parity-gated, evaluated by onnxruntime, blessed against popularity, promoted to
the registry, on the leaderboard, and scored by onnxruntime-node like Python."""

from __future__ import annotations

import json
import subprocess

import dagster as dg
import numpy as np
import pytest
from conftest import _tool

from export.lineage import read_onnx_lineage
from export.registry import REQUIRED_FILES, current_version
from models.catalogue import FAMILIES

MAIN = {"rating": "rmse", "topk": "ndcg@10", "ctr": "auc", "multitask": "auc_like"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("recsys_home")
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        for var in ("RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_SPLIT", "RECSYS_MODEL_CONFIG"):
            mp.delenv(var, raising=False)
        from orchestration.definitions import defs

        instance = dg.DagsterInstance.get()
        result = defs.resolve_job_def("refresh_all").execute_in_process(
            instance=instance, raise_on_error=False
        )
        yield {"home": home, "result": result, "instance": instance, "defs": defs, "mp": mp}


def _checks(result, name):
    return {
        c.asset_key.to_user_string(): c for c in result.get_asset_check_evaluations() if c.check_name == name
    }


@pytest.mark.slow
def test_every_family_is_exported_evaluated_and_blessed(pipeline):
    result = pipeline["result"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    parity = _checks(result, "parity")
    blessing = _checks(result, "blessing")
    for name, family in FAMILIES.items():
        assert parity[f"onnx_{name}"].passed, name
        check = blessing[f"eval_{name}"]
        assert check.passed, (name, check.metadata["reasons"].value)
        assert check.metadata["main_metric"].value == MAIN[family.task.value]
        value, popularity = check.metadata["value"].value, check.metadata["popularity"].value
        better = value < popularity if family.task.value == "rating" else value > popularity
        assert better, (name, value, popularity)


@pytest.mark.slow
def test_sequence_models_beat_deepfm_on_the_planted_sequential_signal(pipeline):
    """DIN and BST read the behaviour history that DeepFM does not see; on the default data (whose
    generator plants successor items) they must rank test clicks better, measured by onnxruntime."""
    blessing = _checks(pipeline["result"], "blessing")
    deepfm = blessing["eval_deepfm"].metadata["value"].value
    for name in ("din", "bst"):
        assert blessing[f"eval_{name}"].metadata["value"].value > deepfm, name


@pytest.mark.slow
def test_registry_holds_blessed_models_with_lineage(pipeline):
    home = pipeline["home"]
    registry = home / "registry"
    index = json.loads((registry / "index.json").read_text())
    raw_version = (
        pipeline["instance"]
        .get_latest_data_version_record(dg.AssetKey("raw_interactions"))
        .asset_materialization.tags["dagster/data_version"]
    )
    for name in FAMILIES:
        version = current_version(name, registry)
        assert version is not None
        folder = registry / name / version
        for file in REQUIRED_FILES:
            assert (folder / file).is_file(), (name, file)
        assert not list((registry / name).glob(".*tmp*")), "no half-written folder is visible"
        lineage = read_onnx_lineage(folder / "model.onnx")
        assert lineage["family"] == name
        assert lineage["data_fingerprint"] == raw_version
        assert lineage["split"] == "temporal"
        assert "int_split" in lineage["dbt_models"]["fct_ratings"]  # back to the dbt models
        assert json.loads((folder / "lineage.json").read_text())["config_sha256"] == lineage["config_sha256"]
        signature = json.loads((folder / "signature.json").read_text())
        assert signature["inputs"][0]["shape"][0] == "batch"
        assert name in json.dumps(index)
    assert (registry / "wals" / current_version("wals", registry) / "model_topk.onnx").is_file()
    from orchestration.cli import main

    assert main(["lineage", str(registry)]) == 0  # every file in the registry is described


@pytest.mark.slow
def test_leaderboard_json_png_and_table(pipeline):
    reports = pipeline["home"] / "reports"
    board = json.loads((reports / "leaderboard.json").read_text())
    records = board["records"]
    models = {r["model"] for r in records}
    assert set(FAMILIES) <= models
    assert {"baseline:popularity", "baseline:random"} <= models
    assert all(r["split"] == "temporal" and r["data_version"] for r in records)
    assert (reports / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mats = {e.asset_key.to_user_string(): e for e in pipeline["result"].get_asset_materialization_events()}
    table = mats["leaderboard"].materialization.metadata["leaderboard"].value
    assert "wals" in table and "popularity" in table


@pytest.mark.slow
def test_node_scores_registry_like_python(pipeline, handoff_dir):
    registry = pipeline["home"] / "registry"
    done = subprocess.run(
        [_tool("node"), "score.mjs", str(registry)],
        cwd=handoff_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = {json.loads(x)["family"]: json.loads(x) for x in done.stdout.splitlines() if x.strip()}
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(lines) == set(FAMILIES)
    for name, line in lines.items():
        golden = json.loads((registry / name / current_version(name, registry) / "golden.json").read_text())
        for out, want in golden["outputs"].items():
            got = np.asarray(line["outputs"][out]["data"], np.float64)
            assert np.abs(got - np.asarray(want["data"], np.float64)).max() < 1e-5, (name, out)


@pytest.mark.slow
def test_openvino_scores_registry_like_python(pipeline):
    """A second runtime with its own ONNX frontend and kernels: every blessed file is standard ONNX."""
    from export.openvino_handoff import score_registry

    results = {r["family"]: r for r in score_registry(pipeline["home"] / "registry")}
    assert set(results) == set(FAMILIES)
    failed = {name: r.get("error") or r.get("detail") for name, r in results.items() if not r["passed"]}
    assert not failed, failed


@pytest.mark.slow
def test_failed_retrain_keeps_blessed_model(pipeline, tmp_path):
    """A model config with an unknown field fails that family's training with a clear error;
    the registry still serves the previously blessed version."""
    registry = pipeline["home"] / "registry"
    before = current_version("deepfm", registry)
    bad = tmp_path / "models.toml"
    bad.write_text("[deepfm]\nembedding_dimension = 8\n")
    pipeline["mp"].setenv("RECSYS_MODEL_CONFIG", str(bad))
    job = pipeline["defs"].resolve_job_def("refresh_all")
    result = job.execute_in_process(
        instance=pipeline["instance"],
        raise_on_error=False,
        asset_selection=[
            dg.AssetKey(k) for k in ("model_deepfm", "onnx_deepfm", "eval_deepfm", "registry_deepfm")
        ],
    )
    pipeline["mp"].delenv("RECSYS_MODEL_CONFIG")
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.event_specific_data.error)
    assert "embedding_dimension" in message and "deepfm" in message
    assert current_version("deepfm", registry) == before


@pytest.mark.slow
def test_reevaluation_checks_regression_against_blessed_version(pipeline):
    registry = pipeline["home"] / "registry"
    before = current_version("mf_sgd", registry)
    job = pipeline["defs"].resolve_job_def("refresh_all")
    result = job.execute_in_process(
        instance=pipeline["instance"],
        raise_on_error=False,
        asset_selection=[dg.AssetKey("eval_mf_sgd"), dg.AssetKey("registry_mf_sgd")],
    )
    assert result.success
    check = _checks(result, "blessing")["eval_mf_sgd"]
    assert check.passed
    assert check.metadata["previous_version"].value == before
    assert check.metadata["same_data_as_previous"].value == "True"
    assert any("regress" in r or before in r for r in check.metadata["reasons"].value)
    # the same model.onnx is not promoted twice: the registry step says so, CURRENT stays
    materialized = {
        e.asset_key.to_user_string(): e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
    }
    registry_meta = materialized["registry_mf_sgd"].metadata
    assert registry_meta["promoted"].value is False and "identical" in registry_meta["reason"].value
    assert current_version("mf_sgd", registry) == before and (registry / "mf_sgd" / before).is_dir()
