"""Tables of real metadata (CSV or Parquet): read every cell as text, check declared labels.

Shared by cohort manifests (i2i) and `labels_from` tables (T2I resampling). Messages name the
table's field and a row number, never a cell's content.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthgen.errors import CohortError
from synthgen.recipe.conditional import LabelSpec
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.schema import LabelsFromConfig


def read_table(path: str, where: str) -> pd.DataFrame:
    """A CSV or Parquet table with every cell as a string (ids must not become floats).

    A missing value is the empty string in both: an empty CSV cell, a Parquet null or NaN.
    (`astype(str)` would make a null the text 'nan' or 'None': one more id, one more patient.)
    """
    file = Path(path)
    if not file.is_file():
        raise CohortError("file not found", where=where)
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(file)
            return pd.DataFrame(
                {name: _as_text(table.column(name)) for name in table.column_names}, dtype=str
            )
        return pd.read_csv(file, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many parser error types
        raise CohortError(
            f"cannot read the table ({exc.__class__.__name__})", where=where
        ) from None


def _as_text(column: pa.ChunkedArray) -> list[str]:
    """A Parquet column as text, cell by cell, with '' for a null or a float NaN.

    Arrow's own cast writes an integer id as `12`, where pandas would first make a column with
    nulls float and write `12.0`.
    """
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    try:
        cells = pc.cast(column, pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # lists, structs: Python's text
        cells = [None if cell is None else str(cell) for cell in column.to_pylist()]
    return ["" if cell is None else cell for cell in cells]


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
        cell = record[column]
        if not cell.strip():
            raise ValueError(f"label '{label}' (column '{column}'): empty cell")
        try:
            values[label] = labels[label].check(cell)
        except ValueError as exc:  # the label kinds' messages never quote the cell
            raise ValueError(f"label '{label}' (column '{column}'): {exc}") from None
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
