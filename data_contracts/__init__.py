"""Data contracts: GX expectation suites per raw table and mart, run on DuckDB relations."""

from data_contracts.runner import (
    ContractError,
    ContractResult,
    ExpectationOutcome,
    MissingRelationError,
    list_suites,
    load_suite,
    run_suite,
)

__all__ = [
    "ContractError",
    "ContractResult",
    "ExpectationOutcome",
    "MissingRelationError",
    "list_suites",
    "load_suite",
    "run_suite",
]
