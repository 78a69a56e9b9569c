"""Validate a DataFrame against a GX suite (GX's pandas engine, an ephemeral context) and turn
GX's result dicts into :class:`ExpectationOutcome` with sample bad rows."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from data_contracts.results import SAMPLE_SIZE, ExpectationOutcome, plain

if TYPE_CHECKING:
    import pandas as pd


def validate_frame(frame: pd.DataFrame, suite: dict, parameters: dict) -> list[dict]:
    # The warehouse machines are offline: GX's usage analytics would only fail to send.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # tqdm bars would otherwise flood the Dagster compute logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("warehouse")
        .add_dataframe_asset(suite["name"])
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    # Not GX's `unexpected_index_column_names`: it looks up every unexpected row one by
    # one before truncating (a wholesale broken column on 1M rows took minutes).
    # SUMMARY's positional indices of the first failing rows are free; _sample_rows
    # looks those few up.
    result = batch.validate(
        gx.ExpectationSuite(**suite),
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": SAMPLE_SIZE},
        expectation_parameters=parameters,
    )
    return result.to_json_dict()["results"]


def outcome_of(result: dict, frame: pd.DataFrame, key: list[str]) -> ExpectationOutcome:
    config = result["expectation_config"]
    kwargs = {k: plain(v) for k, v in config["kwargs"].items() if k != "batch_id"}
    details = result.get("result") or {}
    error = _exception_message(result.get("exception_info") or {})
    return ExpectationOutcome(
        expectation=config["type"],
        column=_column_of(kwargs),
        # An expectation that raised has not shown anything: it fails.
        success=bool(result["success"]) and error is None,
        observed=error if error is not None else _observed(details),
        unexpected_count=details.get("unexpected_count"),
        sample_bad_values=plain(details.get("partial_unexpected_list", [])),
        kwargs=kwargs,
        sample_bad_rows=_sample_rows(frame, key, kwargs, details),
    )


def _exception_message(info: dict) -> str | None:
    # GX reports one exception flat, or one per failed metric keyed by metric id.
    reports = [info] if "raised_exception" in info else list(info.values())
    messages = [
        str(r.get("exception_message")) for r in reports if isinstance(r, dict) and r.get("raised_exception")
    ]
    return "; ".join(messages) if messages else None


def _column_of(kwargs: dict) -> str | None:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_list" in kwargs:
        return ",".join(kwargs["column_list"])
    if "column_A" in kwargs:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    return None


def _observed(details: dict) -> object:
    if "observed_value" in details:
        return plain(details["observed_value"])
    if "unexpected_count" in details:
        return (
            f"{details['unexpected_count']} of {details.get('element_count')} rows unexpected "
            f"({details.get('unexpected_percent') or 0:.3g}%)"
        )
    return None


def _sample_rows(frame: pd.DataFrame, key: list[str], kwargs: dict, details: dict) -> list:
    """Key and checked columns of the first failing rows (GX gives their index labels)."""
    positions = details.get("partial_unexpected_index_list") or []
    checked = [kwargs.get("column"), kwargs.get("column_A"), kwargs.get("column_B")]
    checked += kwargs.get("column_list", [])
    if not key:
        return []
    columns = list(dict.fromkeys(c for c in [*key, *checked] if c in frame.columns))
    return plain(frame.loc[positions, columns].to_dict("records"))
