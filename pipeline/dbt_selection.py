"""Which dbt tests a subset build runs: a test runs when each of its parents is selected or built.

dbt's default (``eager``) indirect selection runs every test that touches a selected node,
so building ``*dim_users`` on a fresh warehouse runs ``relationships`` tests of ``dim_items``
(never built) and fails. ``cautious`` runs only tests whose parents are all selected, which
would silently skip a relationship test between a rebuilt mart and one built earlier. This
module adds those back: a subset build runs with ``cautious`` plus every multi-parent test
whose parents outside the selection already exist as relations in the warehouse.

Plain functions over the dbt manifest and a read-only look at the warehouse; the Dagster
op in ``orchestration/assets/transforms.py`` applies the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

# The one-row model of the vars a build used; rebuilt with any mart so it never goes stale.
BUILD_INFO_MODEL = "mart_build_info"
MARTS_LAYER = "marts"


@dataclass(frozen=True)
class SubsetSelection:
    """What to add to dagster-dbt's own selection of a subset build."""

    indirect_selection: str | None = None  # DBT_INDIRECT_SELECTION; None: dbt's default
    extra_select: tuple[str, ...] = ()  # dbt selectors (FQNs) added to the selection
    extra_tests: tuple[str, ...] = field(default=(), compare=False)  # names, for the log

    def args(self) -> list[str]:
        return ["--select", " ".join(self.extra_select)] if self.extra_select else []


def relation_of(props: Mapping[str, Any]) -> tuple[str, str]:
    """(schema, name) of a model's or source's relation, lower case as DuckDB compares them."""
    name = props.get("alias") or props.get("identifier") or props["name"]
    return str(props["schema"]).lower(), str(name).lower()


def warehouse_relations(path: Path) -> set[tuple[str, str]] | None:
    """Tables and views in the DuckDB file, read-only and closed at once (dbt writes next).

    Empty for a missing file; None when another process holds it (dbt will then report the
    lock itself, and the build runs without the extra tests).
    """
    if not path.exists():
        return set()
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        rows = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() "
            "UNION ALL SELECT schema_name, view_name FROM duckdb_views() WHERE NOT internal"
        ).fetchall()
    finally:
        con.close()
    return {(str(s).lower(), str(t).lower()) for s, t in rows}


def _models(manifest: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    kinds = ("model", "seed", "snapshot")
    return {uid: n for uid, n in manifest["nodes"].items() if n["resource_type"] in kinds}


def selected_node_ids(manifest: Mapping[str, Any], asset_names: Iterable[str]) -> set[str]:
    """Unique ids of the dbt models behind Dagster asset keys (bare model names here)."""
    names = set(asset_names)
    return {uid for uid, n in _models(manifest).items() if n["name"] in names}


def tests_to_add(
    manifest: Mapping[str, Any], selected: set[str], existing: set[tuple[str, str]]
) -> list[Mapping[str, Any]]:
    """Multi-parent tests that touch the selection and whose other parents already exist."""
    nodes, sources = manifest["nodes"], manifest.get("sources", {})
    found = []
    for node in nodes.values():
        if node["resource_type"] != "test":
            continue
        parents = set(node["depends_on"]["nodes"])
        outside = parents - selected
        if len(parents) < 2 or not outside or not parents & selected:
            continue  # one parent, or fully inside (cautious runs it), or not ours
        props = [nodes.get(p) or sources.get(p) for p in outside]
        if all(p is not None and relation_of(p) in existing for p in props):
            found.append(node)
    return sorted(found, key=lambda n: n["unique_id"])


def subset_selection(
    manifest: Mapping[str, Any], asset_names: Iterable[str], warehouse: Path
) -> SubsetSelection:
    """Additions for a build of the dbt models named by ``asset_names``; none for a full build."""
    models = _models(manifest)
    selected = selected_node_ids(manifest, asset_names)
    if not selected or selected == set(models):
        return SubsetSelection()
    extra: list[str] = []
    touches_marts = any(models[uid]["fqn"][1:2] == [MARTS_LAYER] for uid in selected)
    build_info = [uid for uid, n in models.items() if n["name"] == BUILD_INFO_MODEL]
    if touches_marts and build_info and build_info[0] not in selected:
        extra.append(".".join(models[build_info[0]]["fqn"]))
        selected = selected | {build_info[0]}
    existing = warehouse_relations(warehouse)
    tests = tests_to_add(manifest, selected, existing) if existing is not None else []
    extra += [".".join(t["fqn"]) for t in tests]
    return SubsetSelection("cautious", tuple(extra), tuple(t["name"] for t in tests))
