"""The audit's inputs: synthetic and source items, and the checks that make bad input a clear error.

Errors name synthetic keys and positions (`source #12`), never a source or patient id: those are
protected health information.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def validate_inputs(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    holdout: Sequence[SourceItem],
    predictor: str | None,
    label_heads: Sequence[LabelHead],
) -> dict[str, int]:
    """Check the inputs; return each source id's position in `sources`."""
    if not synthetic:
        raise AuditError("no synthetic images to audit")
    if len(sources) < 2:
        raise AuditError(f"the source cohort has {len(sources)} image(s); at least 2 are needed")
    index: dict[str, int] = {}
    for i, source in enumerate(sources):
        if not source.patient_id:
            raise AuditError("source has no patient id", where=f"source #{i}")
        if source.source_id in index:  # the id itself is protected: say where, not what
            raise AuditError("duplicate source id", where=f"source #{i}")
        index[source.source_id] = i
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
    train_patients = {source.patient_id for source in sources}
    if any(item.patient_id in train_patients for item in holdout):
        raise AuditError("the holdout cohort shares patients with the training cohort")
    if bool(predictor) != bool(label_heads):
        raise AuditError("label utility needs both a predictor and its label heads")
    for head in label_heads:
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
    return index
