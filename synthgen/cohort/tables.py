"""Tables of real metadata (CSV or Parquet): read every cell as text, check declared labels.

Shared by cohort manifests (i2i) and `labels_from` tables (T2I resampling). Messages name the
table's field and a row number, never a cell's content.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from synthgen.errors import CohortError
from synthgen.recipe.conditional import LabelSpec
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.schema import LabelsFromConfig


def read_table(path: str, where: str) -> pd.DataFrame:
    """A CSV or Parquet table with every cell as a string (ids must not become floats)."""
    file = Path(path)
    if not file.is_file():
        raise CohortError("file not found", where=where)
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(file).astype(str)
        return pd.read_csv(file, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many parser error types
        raise CohortError(
            f"cannot read the table ({exc.__class__.__name__})", where=where
        ) from None


def require_columns(table: pd.DataFrame, wanted: Mapping[str, str]) -> None:
    """`wanted` maps a recipe field to the column it names; a missing column names the field."""
    for where, column in wanted.items():
        if column not in table.columns:
            raise CohortError(f"column '{column}' is not in the table", where=where)


def row_labels(
    record: pd.Series, columns: Mapping[str, str], labels: Mapping[str, LabelSpec]
) -> dict[str, LabelValue]:
    """The declared labels of one row, checked; ValueError names the label and the problem."""
    values = {}
    for label, column in columns.items():
        try:
            values[label] = labels[label].check(record[column])
        except ValueError as exc:
            raise ValueError(f"label '{label}': {exc}") from None
    return values


def label_table(config: LabelsFromConfig, labels: Mapping[str, LabelSpec]) -> list[dict]:
    """Validated label rows of a `labels_from` table, to be resampled by the plan."""
    frame = read_table(config.table, where="labels_from.table")
    require_columns(
        frame, {f"labels_from.columns.{label}": column for label, column in config.columns.items()}
    )
    rows = []
    for position, (_, record) in enumerate(frame.iterrows(), start=1):
        try:
            rows.append(row_labels(record, config.columns, labels))
        except ValueError as exc:
            raise CohortError(str(exc), where=f"labels_from.table row {position}") from None
    if not rows:
        raise CohortError("the table has no rows", where="labels_from.table")
    return rows
