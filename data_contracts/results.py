"""What a contract run returns: one outcome per expectation, and their Markdown report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SAMPLE_SIZE = 10
MARKDOWN_CELL_CHARS = 120



@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    observed: object
    unexpected_count: int | None
    sample_bad_values: list
    kwargs: dict
    # Key columns (``meta.key``) plus the offending values of up to SAMPLE_SIZE failing
    # rows: for a null check the bad values alone are just ``None``.
    sample_bad_rows: list = field(default_factory=list)


@dataclass(frozen=True)
class ContractResult:
    suite: str
    relation: str
    success: bool
    n_rows: int
    outcomes: list[ExpectationOutcome]
    # Rows GX saw when the table was larger than ``max_rows`` (a seeded sample); None = all.
    sampled_rows: int | None = None
    # Expectations not run because a relation their parameters read is not built yet
    # (``skip_unbuilt_upstream``), as "expectation (column): needs relation".
    skipped: tuple[str, ...] = ()

    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_markdown(self) -> str:
        """A summary line and a table for the Dagster UI.

        The table lists the failures first, then the passing aggregates (row counts,
        label rates, split fractions): the numbers worth watching. Passing per-row
        checks would only repeat "0 unexpected".
        """
        failed = self.failed()
        status = "passed" if self.success else "FAILED"
        shown = failed + [o for o in self.outcomes if o.success and _is_number(o.observed)]
        lines = [
            f"**{self.suite}** on `{self.relation}` {status}: {self.n_rows} rows"
            + (f" (per-row rules on a sample of {self.sampled_rows})" if self.sampled_rows else "")
            + f", {len(failed)} of {len(self.outcomes)} expectations failed."
            + (f" Not run, upstream not built yet: {'; '.join(self.skipped)}." if self.skipped else ""),
            "",
            "| | expectation | column | observed | sample bad values |",
            "|---|---|---|---|---|",
        ]
        for o in shown:
            # For a null check the bad values are all None; the row keys say more.
            samples = o.sample_bad_rows if _all_none(o.sample_bad_values) else o.sample_bad_values
            cells = ["ok" if o.success else "FAIL", o.expectation, o.column, o.observed, samples]
            lines.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
        return "\n".join(lines)


def plain(value: Any) -> Any:
    """Plain Python values: numpy scalars and pandas NA would leak into Dagster metadata."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if value is None or isinstance(value, str | bool | int | float):
        return value
    import pandas as pd

    return None if pd.isna(value) else str(value)


def _all_none(values: list) -> bool:
    return all(v is None for v in values)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _markdown_cell(value: object) -> str:
    if value is None or value == []:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split()).replace("|", "\\|")
    if len(text) > MARKDOWN_CELL_CHARS:
        text = text[: MARKDOWN_CELL_CHARS - 1] + "…"
    return text
