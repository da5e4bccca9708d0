"""The audit's inputs: synthetic and source items, the settings of one audit, and the checks
that make bad input a clear error.

Errors name synthetic keys and positions (`source #12`), never a source or patient id: those are
protected health information.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthgen.audit.embedders import AuditError
from synthgen.audit.fidelity import LabelHead
from synthgen.audit.stream import ImageLike


@dataclass(frozen=True)
class SyntheticItem:
    """A synthetic image; `source_id` links an image-to-image output to its source (T2I: None)."""

    key: str
    image: ImageLike
    source_id: str | None
    strength: float | None


@dataclass(frozen=True)
class SourceItem:
    """A real image; `labels` (label name -> value) are needed only for label utility."""

    source_id: str
    patient_id: str
    image: ImageLike
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditSettings:
    """How one audit runs: its models, where and in what batches, what it computes, and what the
    report records besides. Names of models only, never data: everything here may be published.

    `label_heads` map the predictor's output columns to the sources' `labels`; `lpips` is the
    LPIPS backbone (None: no LPIPS); `memorisation_quantile` picks the real-vs-real threshold;
    `contact_pairs` is how many pairs each contact sheet shows; `extra` are caller settings
    recorded in report.json (no ids).
    """

    embedder: str = "pixels"
    predictor: str | None = None
    label_heads: tuple[LabelHead, ...] = ()
    device: str = "cpu"
    batch_size: int = 64
    lpips: str | None = "alex"
    distribution: bool = True
    memorisation_quantile: float = 0.99
    contact_pairs: int = 16
    extra: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        # a caller may pass a list: keep an immutable copy, as a frozen record should
        object.__setattr__(self, "label_heads", tuple(self.label_heads))


@dataclass(frozen=True)
class AuditInputs:
    """Checked inputs and the row numbers that link them: synthetic rows to source rows, source
    rows to patient numbers. The report is built from these numbers, never from the ids."""

    synthetic: Sequence[SyntheticItem]
    sources: Sequence[SourceItem]
    holdout: Sequence[SourceItem]
    source_row: Mapping[str, int]  # source id -> its row in `sources`
    i2i_rows: np.ndarray  # synthetic rows with a source, ascending
    t2i_rows: np.ndarray  # synthetic rows without one, ascending
    true_index: np.ndarray  # the source row of each i2i row
    source_patient: np.ndarray  # the patient number (0..P-1) of each source row
    n_patients: int

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The places of image-to-image synthetic rows among `i2i_rows`."""
        return np.searchsorted(self.i2i_rows, rows)


def validate_inputs(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    holdout: Sequence[SourceItem],
    settings: AuditSettings,
) -> AuditInputs:
    """Check the inputs (errors name keys and positions only); return them with their links."""
    if not synthetic:
        raise AuditError("no synthetic images to audit")
    source_row = _source_index(sources)
    _check_linkage(synthetic, source_row)
    train_patients = {source.patient_id for source in sources}
    if any(item.patient_id in train_patients for item in holdout):
        raise AuditError("the holdout cohort shares patients with the training cohort")
    _check_label_heads(synthetic, sources, source_row, settings)
    i2i_rows = np.array([r for r, item in enumerate(synthetic) if item.source_id], dtype=np.int64)
    t2i_rows = np.array([r for r, item in enumerate(synthetic) if not item.source_id], dtype=int)
    patient_of = {pid: n for n, pid in enumerate(dict.fromkeys(s.patient_id for s in sources))}
    return AuditInputs(
        synthetic=synthetic,
        sources=sources,
        holdout=holdout,
        source_row=source_row,
        i2i_rows=i2i_rows,
        t2i_rows=t2i_rows,
        true_index=np.array([source_row[synthetic[r].source_id] for r in i2i_rows], np.int64),
        source_patient=np.array([patient_of[s.patient_id] for s in sources], dtype=np.int64),
        n_patients=len(patient_of),
    )


def _source_index(sources: Sequence[SourceItem]) -> dict[str, int]:
    """Each source id's position; every source needs a patient and an id of its own."""
    if len(sources) < 2:
        raise AuditError(f"the source cohort has {len(sources)} image(s); at least 2 are needed")
    index: dict[str, int] = {}
    for i, source in enumerate(sources):
        if not source.patient_id:
            raise AuditError("source has no patient id", where=f"source #{i}")
        if source.source_id in index:  # the id itself is protected: say where, not what
            raise AuditError("duplicate source id", where=f"source #{i}")
        index[source.source_id] = i
    return index


def _check_linkage(synthetic: Sequence[SyntheticItem], index: Mapping[str, int]) -> None:
    """Unique keys; every image-to-image item links to a source of this cohort."""
    keys = set()
    linked = absent = 0
    first_absent = None
    for item in synthetic:
        if item.key in keys:
            raise AuditError(f"synthetic key {item.key!r} appears twice")
        keys.add(item.key)
        if not item.source_id:
            if item.strength is not None:
                raise AuditError(
                    f"synthetic {item.key!r} is image-to-image (strength {item.strength}) but "
                    "has no source: its key is absent from the linkage"
                )
            continue
        linked += 1
        if item.source_id not in index:
            absent += 1
            first_absent = first_absent or item.key
    if linked and absent == linked:
        raise AuditError(
            f"none of the {linked} image-to-image synthetic images links to an image of the "
            "source cohort: is the linkage for this cohort?"
        )
    if absent:
        raise AuditError(
            f"{absent} of {linked} synthetic images link to sources absent from the source "
            f"cohort (first: {first_absent!r}); audit against the full cohort they came from"
        )


def _check_label_heads(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    index: Mapping[str, int],
    settings: AuditSettings,
) -> None:
    """A predictor comes with its heads, and the source of every linked item has each label."""
    if bool(settings.predictor) != bool(settings.label_heads):
        raise AuditError("label utility needs both a predictor and its label heads")
    for head in settings.label_heads:
        if head.kind not in ("numeric", "categorical"):
            raise AuditError(f"label {head.name!r}: kind must be numeric or categorical")
        for item in synthetic:
            if item.source_id:
                value = sources[index[item.source_id]].labels.get(head.name)
                if value is None or (head.kind == "categorical" and str(value) not in head.classes):
                    raise AuditError(
                        f"label {head.name!r} of the source of {item.key!r} is missing or not "
                        f"one of {list(head.classes) or 'its classes'}"
                    )
