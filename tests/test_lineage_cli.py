"""`recsys lineage`: any model.onnx on disk leads back to its raw data, dbt models and config."""

from __future__ import annotations

import json
from dataclasses import asdict

import onnx
from onnx import TensorProto, helper

from export.lineage import Lineage, dbt_lineage, stamp_onnx, write_lineage_json
from orchestration.cli import main


def _tiny_onnx(path):
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _lineage(**extra) -> Lineage:
    return Lineage(
        family="wals",
        version="run-123",
        data_fingerprint="rawfp42",
        snapshot_fingerprint="snapfp7",
        dbt_manifest_sha256="abc",
        split="temporal",
        config_sha256="cfg9",
        config={"factors": 64},
        code_version="git:deadbeef",
        trained_rows=1000,
        upstream={"raw_interactions": "rawfp42", "fct_ratings": "v1"},
        **extra,
    )


def test_dbt_lineage_walks_the_real_manifest_to_the_sources():
    from orchestration.assets.contracts import MARTS
    from orchestration.assets.transforms import ensure_manifest

    manifest = ensure_manifest()
    tree = dbt_lineage(manifest, MARTS)
    assert set(tree) == set(MARTS)
    assert "int_split" in tree["fct_ratings"]
    assert any(name.startswith("source:") for name in tree["fct_ratings"])
    assert not any(name.startswith("test") for names in tree.values() for name in names)
    assert dbt_lineage(manifest.parent / "absent.json", MARTS) == {}


def test_lineage_command_prints_stamps_and_checks_lineage_json(tmp_path, capsys):
    folder = tmp_path / "wals" / "onnx"
    folder.mkdir(parents=True)
    path = _tiny_onnx(folder / "model.onnx")
    lineage = _lineage(dbt_models={"fct_ratings": ["int_split", "source:raw.interactions"]})
    stamp_onnx(path, lineage)
    write_lineage_json(folder, lineage)

    assert main(["lineage", str(tmp_path)]) == 0  # a folder is searched for *.onnx
    out = capsys.readouterr().out
    for text in ("wals", "run-123", "rawfp42", "snapfp7", "fct_ratings", "int_split",
                 "source:raw.interactions", "git:deadbeef", "lineage.json      agrees"):  # fmt: skip
        assert text in out, text

    doc = asdict(lineage) | {"data_fingerprint": "other"}
    (folder / "lineage.json").write_text(json.dumps(doc))
    assert main(["lineage", str(path)]) == 0
    assert "DIFFERS on data_fingerprint" in capsys.readouterr().out


def test_lineage_command_on_unstamped_missing_and_garbage_files(tmp_path, capsys):
    plain = _tiny_onnx(tmp_path / "plain.onnx")
    assert main(["lineage", str(plain)]) == 0
    assert "no recsys lineage stamps" in capsys.readouterr().out

    assert main(["lineage", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    assert main(["lineage", str(garbage)]) == 2
    assert "cannot be read as ONNX" in capsys.readouterr().err

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["lineage", str(empty)]) == 2
    assert "no .onnx file" in capsys.readouterr().err
