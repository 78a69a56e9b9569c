"""Export one trained family: ONNX (+ top-K graph), parity gate, lineage, signature, golden batch.

The orchestration calls :func:`export_family` from the ``onnx_<family>`` asset. Order
matters: the file is exported and checked first, the parity gate runs on it, and only then
are lineage, signature and golden batch written beside it, so a folder with a
``golden.json`` always holds a file that passed parity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from export.golden import write_golden
from export.lineage import Lineage, code_version, config_sha256, stamp_onnx, write_lineage_json
from export.onnx_export import TopKScorer, export_onnx, export_topk_onnx, topk_spec
from export.parity import ParityReport, parity_batch, parity_gate, standard_cases
from export.signature import graph_signature, write_signature

GOLDEN_ROWS = 8


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    parity: ParityReport
    lineage: dict
    signature: dict

    @property
    def parity_passed(self) -> bool:
        return self.parity.passed

    @property
    def parity_tolerance(self) -> str:
        return f"atol={self.parity.atol:g}, rtol={self.parity.rtol:g}"

    @property
    def parity_max_abs_diff(self) -> float:
        return float(max((c.max_abs_diff for c in self.parity.cases), default=0.0))

    @property
    def parity_markdown(self) -> str:
        lines = ["| case | batch | max abs diff | passed |", "|---|---|---|---|"]
        for c in self.parity.cases:
            lines.append(
                f"| {c.name} | {c.batch} | {c.max_abs_diff:.3g} | {'yes' if c.passed else '**NO**'} |"
            )
        return "\n".join(lines)


def _cardinalities(meta: dict) -> dict[str, object]:
    card = meta["sparse_cardinality"]
    return {
        "user_idx": meta["n_users"],
        "item_idx": meta["n_items"],
        "hist_item_idx": meta["n_items"],
        "history": meta["n_items"],
        "sparse": [card[f] for f in meta["sparse_fields"]],
    }


def export_family(
    family,
    model_dir: Path,
    snapshot_dir: Path,
    out_dir: Path,
    asset_code_version: str | None = None,
    run_id: str = "",
) -> ExportResult:
    from models.catalogue import load_model

    model = load_model(model_dir)
    meta = json.loads((snapshot_dir / "meta.json").read_text())
    scorer = model.scorer()
    spec = model.export_spec()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(scorer, spec, out_dir / "model.onnx")

    rng = np.random.default_rng(0)
    rows = parity_batch(spec)  # the top-K graph scores the same full rows inside
    cases = standard_cases(spec, meta["n_items"], meta["n_users"], rng, _cardinalities(meta), batch_n=rows)
    report = parity_gate(scorer, onnx_path, cases)
    task = str(model.task.value if hasattr(model.task, "value") else model.task)
    topk_k = spec.topk if task == "topk" else None
    if topk_k:
        topk_path = export_topk_onnx(scorer, spec, topk_k, out_dir / "model_topk.onnx")
        tspec = topk_spec(scorer, spec, topk_k)
        topk_cases = standard_cases(
            tspec, meta["n_items"], meta["n_users"], rng, _cardinalities(meta), batch_n=rows
        )
        topk_report = parity_gate(TopKScorer(scorer, topk_k, spec), topk_path, topk_cases)
        report = ParityReport(
            passed=report.passed and topk_report.passed,
            cases=[
                *report.cases,
                *[type(c)(**{**asdict(c), "name": f"topk:{c.name}"}) for c in topk_report.cases],
            ],
            atol=report.atol,
            rtol=report.rtol,
            onnx_path=report.onnx_path,
            rule=report.rule,
        )

    # Extra graphs a model offers beside model.onnx (emb_knn: similar_items.onnx), each with
    # its own parity cases folded into the one report (case names prefixed by the graph).
    extra_graphs = getattr(model, "extra_graphs", None)
    graphs: dict[str, dict] = {}
    for graph, (module, graph_spec) in (extra_graphs() if extra_graphs else {}).items():
        path = export_onnx(module.eval(), graph_spec, out_dir / f"{graph}.onnx")
        graph_cases = standard_cases(
            graph_spec, meta["n_items"], meta["n_users"], rng, _cardinalities(meta),
            batch_n=parity_batch(graph_spec),
        )  # fmt: skip
        report = _fold(report, parity_gate(module, path, graph_cases), graph)
        graphs[graph] = graph_signature(graph_spec, path.name)

    config = asdict(model.config) if is_dataclass(model.config) else dict(model.config)
    upstream = meta.get("upstream") or {}
    # models built on other models (emb_knn on WALS embeddings) name them: asset key -> run/dir
    upstream_models = model.meta.get("upstream_models") or {}
    lineage = Lineage(
        family=family.name,
        version=run_id,
        data_fingerprint=str(upstream.get("raw_interactions")),
        snapshot_fingerprint=meta["fingerprint"],
        dbt_manifest_sha256=str(meta.get("dbt_manifest_sha256")),
        split=str(meta.get("split")),
        config_sha256=config_sha256(model.config),
        config=config,
        code_version=code_version_of(family, asset_code_version),
        trained_rows=int(meta["split_rows"].get("train", 0)),
        upstream={**{k: str(v) for k, v in upstream.items()}, **upstream_models},
        dbt_models=meta.get("dbt_models") or {},
    )
    if report.passed:
        stamp_onnx(onnx_path, lineage)
        if topk_k:
            stamp_onnx(out_dir / "model_topk.onnx", lineage)
        for graph in graphs.values():
            stamp_onnx(out_dir / graph["file"], lineage)
    write_lineage_json(out_dir, lineage)
    signature_path = write_signature(
        spec,
        out_dir / "signature.json",
        {
            "task": task,
            "family": family.name,
            "n_users": meta["n_users"],
            "n_items": meta["n_items"],
            "sparse_fields": meta["sparse_fields"],
            "dense_fields": meta["dense_fields"],
            "parity": report.to_dict() if hasattr(report, "to_dict") else None,
            **({"graphs": graphs} if graphs else {}),
        },
        topk_k=topk_k,
    )
    if report.passed:
        batch = cases[next(name for name in cases if name.startswith("batch_") and name != "batch_1")]
        names = [t.name for t in spec.inputs]
        write_golden(onnx_path, {n: a[:GOLDEN_ROWS] for n, a in zip(names, batch)}, out_dir / "golden.json")
    return ExportResult(
        out_dir=out_dir,
        parity=report,
        lineage=json.loads((out_dir / "lineage.json").read_text()),
        signature=json.loads(signature_path.read_text()),
    )


def _fold(report: ParityReport, other: ParityReport, prefix: str) -> ParityReport:
    """One report from two: passed only if both did; ``other``'s case names get ``prefix:``."""
    return ParityReport(
        passed=report.passed and other.passed,
        cases=[*report.cases, *[type(c)(**{**asdict(c), "name": f"{prefix}:{c.name}"}) for c in other.cases]],
        atol=report.atol,
        rtol=report.rtol,
        onnx_path=report.onnx_path,
        rule=report.rule,
    )


def code_version_of(family, asset_code_version: str | None) -> str:
    from inspect import getsourcefile

    base = code_version(getsourcefile(family.fit))
    return f"{base};asset:{asset_code_version}" if asset_code_version else base
