"""Run a data-contract suite (GX Core 1.x) against a DuckDB relation.

A suite is a GX ``ExpectationSuite`` serialised as JSON in ``suites/<name>.json``. Its
``meta`` tells the runner what to validate:

- ``relation``: the DuckDB relation (``raw.interactions``, ``main.dim_users``);
- ``asset``: the Dagster asset that writes it (named in the missing-relation error);
- ``columns``: the relation's columns pulled into pandas as they are. Only these reach
  pandas, so wide text or list columns stay in DuckDB;
- ``derived``: ``{alias: SQL expression}`` computed by DuckDB on the way out (split
  indicators whose mean is a split fraction, the length of a list column, ...);
- ``key``: columns that identify a row; failing rows are reported by these;
- ``parameters``: ``{name: scalar SQL}`` filling the suite's ``{"$PARAMETER": name}``
  values from the warehouse (for example the row count of an upstream table);
- ``parameter_defaults``: ``{name: value}`` for parameters the caller may override.

GX's SQL path to DuckDB does not work with duckdb 2.x, so the relation is read through
DuckDB into a pandas DataFrame and validated with GX's pandas engine. GX is imported
lazily because importing it takes seconds.

Tables over ``max_rows`` (default 1M, ``RECSYS_CONTRACT_MAX_ROWS``) are validated on a
seeded reservoir sample of that many rows, because the pandas path grows linearly: at 10M
``fct_ctr_samples`` rows it took 80 s and 7.3 GiB. Per-row rules (nulls, ranges, types,
labels) and aggregates (means, fractions) are then checked on the sample; row-count
expectations are evaluated against the table's real ``count(*)`` in SQL, never on the
sample. Uniqueness on a sample only catches duplicates that land in it; dbt's ``unique``
tests check the whole marts in the same run.

Cost on 1M rows (2 cores, GX import excluded; README.md in this folder has the table):
``fct_ctr_samples``, the widest suite (26 columns pulled, 83 expectations), about 5 s and
0.6 GiB above the 0.26 GiB a process holds after importing GX; ``fct_ratings`` about 2 s
and 0.35 GiB. Memory grows linearly with rows: the pulled frame is about 130 MB per
million ``fct_ctr_samples`` rows and GX's metrics copy columns as they go.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from data_contracts.gx_validation import outcome_of, validate_frame
from data_contracts.results import ContractResult, ExpectationOutcome, plain

if TYPE_CHECKING:
    import pandas as pd

SUITES_DIR = Path(__file__).resolve().parent / "suites"
# How many failing values (and identifying rows) each expectation reports.
class ContractError(RuntimeError):
    """A suite cannot be run at all (as opposed to a suite that runs and fails)."""


class MissingRelationError(ContractError):
    """A relation the suite reads does not exist in the warehouse."""


def list_suites() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.json"))


def load_suite(name: str) -> dict:
    """The suite as GX's serialised dict; raises ContractError naming the file."""
    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        raise ContractError(
            f"No data-contract suite {name!r}: {path} does not exist "
            f"(available: {', '.join(list_suites()) or 'none'})."
        )
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ContractError(f"Suite file {path} is not valid JSON: {exc}") from exc
    meta = suite.get("meta") if isinstance(suite, dict) else None
    if not isinstance(meta, dict) or not meta.get("relation") or not meta.get("columns"):
        raise ContractError(f"Suite file {path} needs meta.relation and meta.columns.")
    return suite


ROW_COUNT_EXPECTATIONS = ("expect_table_row_count_to_be_between", "expect_table_row_count_to_equal")
DEFAULT_MAX_ROWS = 1_000_000


def run_suite(
    con: duckdb.DuckDBPyConnection,
    name: str,
    parameters: dict | None = None,
    max_rows: int | None = None,
    skip_unbuilt_upstream: bool = False,
) -> ContractResult:
    """Validate the suite's relation; ``parameters`` override the suite's parameters.

    Keys the suite does not use are ignored, so one dict can serve every suite.
    Raises ContractError (MissingRelationError) when the suite cannot run; a suite that
    runs reports every failure, including expectations that raised, as a failed outcome.
    With ``skip_unbuilt_upstream``, an expectation whose parameter reads a relation that
    does not exist yet (a partial build) is not run and is listed in ``skipped`` instead;
    the suite's own relation must still exist.
    """
    suite = load_suite(name)
    meta = suite["meta"]
    relation = meta["relation"]
    _require_relations(con, [relation])
    unbuilt = _unbuilt_parameters(con, suite, parameters or {}) if skip_unbuilt_upstream else {}
    suite, skipped = _without_parameters(suite, unbuilt)
    values = _resolve_parameters(con, suite, parameters or {})
    if max_rows is None:
        max_rows = int(os.environ.get("RECSYS_CONTRACT_MAX_ROWS") or DEFAULT_MAX_ROWS)
    n_rows = int(con.execute(f"SELECT count(*) FROM {relation}").fetchone()[0])
    sampled = n_rows > max_rows
    frame, unbound = _read_frame(con, meta, sample=max_rows if sampled else None)
    key = [c for c in meta.get("key", []) if c in frame.columns]
    counted: list[ExpectationOutcome] = []
    if sampled:
        kept = [e for e in suite["expectations"] if e["type"] not in ROW_COUNT_EXPECTATIONS]
        counted = [
            _row_count_outcome(e, n_rows, values)
            for e in suite["expectations"]
            if e["type"] in ROW_COUNT_EXPECTATIONS
        ]
        suite = {**suite, "expectations": kept}
    outcomes = unbound + counted + [outcome_of(r, frame, key) for r in validate_frame(frame, suite, values)]
    return ContractResult(
        suite=name,
        relation=relation,
        success=all(o.success for o in outcomes),
        n_rows=n_rows,
        outcomes=outcomes,
        sampled_rows=len(frame) if sampled else None,
        skipped=tuple(skipped),
    )


def _unbuilt_parameters(con: duckdb.DuckDBPyConnection, suite: dict, overrides: dict) -> dict[str, str]:
    """Parameters computed by SQL over a relation that does not exist: name -> relation."""
    unbuilt = {}
    for name, sql in suite["meta"].get("parameters", {}).items():
        if name in overrides:
            continue
        for relation in _relations_in(con, sql):
            try:
                _require_relations(con, [relation])
            except MissingRelationError:
                unbuilt[name] = relation
                break
    return unbuilt


def _without_parameters(suite: dict, unbuilt: dict[str, str]) -> tuple[dict, list[str]]:
    """The suite minus expectations that use an unbuilt parameter, and what was left out."""
    if not unbuilt:
        return suite, []
    kept, skipped = [], []
    for expectation in suite["expectations"]:
        used = [
            v["$PARAMETER"]
            for v in expectation["kwargs"].values()
            if isinstance(v, dict) and "$PARAMETER" in v
        ]
        missing = sorted({unbuilt[p] for p in used if p in unbuilt})
        if missing:
            column = expectation["kwargs"].get("column")
            label = expectation["type"] + (f" ({column})" if column else "")
            skipped.append(f"{label}: needs {', '.join(missing)}")
        else:
            kept.append(expectation)
    meta = {
        **suite["meta"],
        "parameters": {k: v for k, v in suite["meta"].get("parameters", {}).items() if k not in unbuilt},
    }
    return {**suite, "expectations": kept, "meta": meta}, skipped


def _row_count_outcome(expectation: dict, n_rows: int, values: dict) -> ExpectationOutcome:
    """A row-count expectation evaluated on the table's real count (the frame is a sample)."""
    kwargs = {
        k: values[v["$PARAMETER"]] if isinstance(v, dict) and "$PARAMETER" in v else v
        for k, v in expectation["kwargs"].items()
    }
    if expectation["type"] == "expect_table_row_count_to_equal":
        success = n_rows == int(kwargs["value"])
    else:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        success = (low is None or n_rows >= low) and (high is None or n_rows <= high)
    return ExpectationOutcome(
        expectation=expectation["type"],
        column=None,
        success=bool(success),
        observed=n_rows,
        unexpected_count=None,
        sample_bad_values=[],
        kwargs=plain(kwargs),
    )


# --- relations ------------------------------------------------------------------------


def _require_relations(con: duckdb.DuckDBPyConnection, relations: list[str]) -> None:
    for relation in relations:
        schema, _, table = relation.rpartition(".")
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
            [schema or "main", table],
        ).fetchone()[0]
        if not found:
            asset = _assets_by_relation().get(relation)
            hint = f"the asset `{asset}`" if asset else "the asset that writes it"
            raise MissingRelationError(
                f"Relation {relation} does not exist in the warehouse: materialise {hint} first."
            )


def _assets_by_relation() -> dict[str, str]:
    suites = (load_suite(name)["meta"] for name in list_suites())
    return {meta["relation"]: meta.get("asset", "") for meta in suites}


def _relations_in(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    # DuckDB's own parser; it appends " AS alias" to aliased tables.
    return sorted(t.split(" AS ")[0] for t in con.get_table_names(sql, qualified=True))


# --- parameters -----------------------------------------------------------------------


def _resolve_parameters(con: duckdb.DuckDBPyConnection, suite: dict, overrides: dict) -> dict[str, Any]:
    """Caller's values win over the suite's SQL, which wins over its defaults."""
    meta = suite["meta"]
    values = {**meta.get("parameter_defaults", {}), **overrides}
    for name, sql in meta.get("parameters", {}).items():
        if name not in overrides:
            values[name] = _scalar(con, suite["name"], name, sql)
    missing = sorted(_referenced_parameters(suite) - values.keys())
    if missing:
        raise ContractError(
            f"Suite {suite['name']!r} needs parameter(s) {', '.join(missing)}: pass them in "
            "`parameters` or declare them in the suite's meta."
        )
    return values


def _referenced_parameters(suite: dict) -> set[str]:
    return {
        value["$PARAMETER"]
        for expectation in suite["expectations"]
        for value in expectation["kwargs"].values()
        if isinstance(value, dict) and "$PARAMETER" in value
    }


def _scalar(con: duckdb.DuckDBPyConnection, suite: str, name: str, sql: str) -> Any:
    _require_relations(con, _relations_in(con, sql))
    rows = con.execute(sql).fetchall()
    # A NULL would reach GX as "no bound" and silently pass, so it is an error.
    if len(rows) != 1 or len(rows[0]) != 1 or rows[0][0] is None:
        raise ContractError(
            f"Parameter {name!r} of suite {suite!r} must be one non-NULL value; `{sql}` returned {rows[:3]}."
        )
    return rows[0][0]


# --- reading --------------------------------------------------------------------------


def _read_frame(
    con: duckdb.DuckDBPyConnection, meta: dict, sample: int | None = None
) -> tuple[pd.DataFrame, list[ExpectationOutcome]]:
    """The suite's columns as a DataFrame, and a failed outcome per unbindable derived column.

    Listed columns missing from the relation are left out, so ``expect_column_to_exist``
    reports them instead of the whole SELECT failing to bind.
    """
    relation = meta["relation"]
    present = {row[0] for row in con.execute(f"DESCRIBE {relation}").fetchall()}
    select = [_quote(c) for c in meta["columns"] if c in present]
    unbound = []
    for alias, expression in meta.get("derived", {}).items():
        error = _bind_error(con, relation, expression)
        if error is None:
            select.append(f"{expression} AS {_quote(alias)}")
        else:
            unbound.append(_unbound_outcome(alias, expression, error))
    if not select:
        raise ContractError(
            f"None of the columns the suite expects exist in {relation}: "
            f"expected {meta['columns']}, found {sorted(present)}."
        )
    # DuckDB maps column types to the most compact pandas dtypes it can (INTEGER ->
    # int32, or nullable Int32 when NULLs are present).
    # A seeded reservoir sample keeps large tables' frames bounded and reproducible.
    query = f"SELECT {', '.join(select)} FROM {relation}"
    if sample:  # project first: sampling the relation itself decoded every list column (60 s at 10M)
        query = f"SELECT * FROM ({query}) USING SAMPLE reservoir({int(sample)} ROWS) REPEATABLE (42)"
    return con.sql(query).df(), unbound


def _bind_error(con: duckdb.DuckDBPyConnection, relation: str, expression: str) -> str | None:
    # con.sql binds without executing: nothing runs, and unlike a failed execute() it
    # does not abort a transaction the caller may have open.
    try:
        con.sql(f"SELECT {expression} FROM {relation}")
    except duckdb.Error as exc:
        return str(exc)
    return None


def _unbound_outcome(alias: str, expression: str, error: str) -> ExpectationOutcome:
    return ExpectationOutcome(
        expectation="derived_column_is_computable",
        column=alias,
        success=False,
        observed=error,
        unexpected_count=None,
        sample_bad_values=[],
        kwargs={"column": alias, "expression": expression},
    )


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


