"""Source cohorts: read the manifest table, map and check labels, check images, load pixels.

This is the privacy firewall's entry point: from here on only row numbers, declared label values
and pixels travel. Ids stay in `CohortRow.source_id` for the linkage table, and no message names
a path or an id — errors say `row N` (the 1-based data row of the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from synthgen.cohort.images import ImageError, preprocess, read_image, to_model_rgb
from synthgen.cohort.tables import read_table, require_columns, row_labels
from synthgen.errors import CohortError
from synthgen.recipe.conditional import LabelSpec
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.schema import PreprocessConfig, SourceConfig


@dataclass(frozen=True)
class CohortRow:
    row: int  # 1-based data row of the manifest: the only way messages refer to a patient
    source_id: str = field(repr=False)
    patient_id: str = field(repr=False)
    image_path: Path = field(repr=False)
    labels: dict[str, LabelValue] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    """A cohort row left out under `on_error: skip`, and why (never a cell's content)."""

    row: int
    reason: str


@dataclass(frozen=True)
class Cohort:
    rows: list[CohortRow]
    skipped: list[SkippedRow]

    @cached_property
    def by_row(self) -> dict[int, CohortRow]:
        return {row.row: row for row in self.rows}


def _wanted_columns(source: SourceConfig) -> dict[str, str]:
    wanted = {"source.image_column": source.image_column, "source.id_column": source.id_column}
    if source.patient_column:
        wanted["source.patient_column"] = source.patient_column
    wanted.update({f"source.labels.{label}": column for label, column in source.labels.items()})
    return wanted


def load_cohort(
    source: SourceConfig,
    labels: dict[str, LabelSpec],
    *,
    check_images: bool = True,
    progress: bool = True,
    checked_before: int = 0,
) -> Cohort:
    """Every usable row; unusable ones stop the run (`fail`) or are listed (`skip`).

    `checked_before`: rows up to this one were checked when an earlier run started (a grown
    cohort): their images are not decoded again."""
    table = read_table(source.manifest, where="source.manifest")
    require_columns(table, _wanted_columns(source))
    if source.max_rows is not None:
        table = table.head(source.max_rows)
    reader = _RowReader(source, labels)
    rows, skipped = [], []
    records = table.iterrows()
    if check_images and progress:
        records = tqdm(records, total=len(table), desc="checking cohort", unit="img", leave=False)
    for position, (_, record) in enumerate(records, start=1):
        try:
            row = reader.row(position, record)
            if check_images and position > checked_before:
                read_image(row.image_path)
        except (ValueError, ImageError) as exc:  # their messages never quote a cell or path
            if source.on_error == "fail":
                raise CohortError(
                    f"{exc} (source.on_error is fail)", where=f"source.manifest row {position}"
                ) from None
            skipped.append(SkippedRow(position, str(exc)))
            continue
        rows.append(row)
    if not rows:
        raise CohortError("no usable rows in the cohort", where="source.manifest")
    return Cohort(rows, skipped)


class _RowReader:
    """Turns manifest records into CohortRows; ValueError says what is wrong, never the cell."""

    def __init__(self, source: SourceConfig, labels: dict[str, LabelSpec]):
        self.source, self.labels = source, labels
        self.root = Path(source.images_root or Path(source.manifest).parent).resolve()
        self.first_row_of: dict[str, int] = {}  # source id -> the row that has it first

    def row(self, position: int, record: pd.Series) -> CohortRow:
        source = self.source
        source_id = self._required(record, source.id_column, "id")
        first = self.first_row_of.setdefault(source_id, position)
        if first != position:  # two keys linked to one id would make the linkage ambiguous
            raise ValueError(
                f"duplicate id: source.id_column '{source.id_column}' repeats row {first}"
            )
        patient = source_id
        if source.patient_column:
            patient = self._required(record, source.patient_column, "patient id")
        image_path = self._image_path(self._required(record, source.image_column, "image path"))
        values = row_labels(record, source.labels, self.labels)
        return CohortRow(position, source_id, patient, image_path, values)

    @staticmethod
    def _required(record: pd.Series, column: str, what: str) -> str:
        value = record[column].strip()
        if not value:
            raise ValueError(f"empty {what} (column '{column}')")
        return value

    def _image_path(self, value: str) -> Path:
        """The image's real path, refused unless it lies inside the images root.

        Resolved once, here: an absolute path, `..` or a symlink that leads out is refused,
        and the worker reads the very path that was checked.
        """
        try:
            path = (self.root / value).resolve()
        except (ValueError, RuntimeError, OSError):  # a NUL byte, a symlink loop
            raise ValueError("invalid image path") from None
        if not path.is_relative_to(self.root):
            raise ValueError(
                "image path leads outside the cohort folder (set source.images_root to read "
                "images kept elsewhere)"
            )
        return path


def source_image_loader(cohort: Cohort, config: PreprocessConfig) -> Callable[[int], Image.Image]:
    """Load row `n`'s image as the model's square RGB input."""

    def load(row: int) -> Image.Image:
        try:
            image = read_image(cohort.by_row[row].image_path)
        except ImageError as exc:
            raise CohortError(str(exc), where=f"source.manifest row {row}") from None
        return to_model_rgb(preprocess(image, config.size, config.fit))

    return load
