"""Privacy-utility audit: re-identification, fidelity and utility of synthetic vs source images.

The engine knows nothing of file layout: callers hand it `SyntheticItem`s and `SourceItem`s
(images or zero-argument loaders, so a 10^5 cohort streams) and a report directory. Source and
patient ids are protected health information and never reach the report: it names synthetic
keys and ranks only. The default embedders give a lower bound on re-identification risk; the
paper's matcher is unpublished, so no parity with its numbers is claimed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthgen.audit import report as audit_report
from synthgen.audit.embedders import AuditError, Embedder, load_embedder
from synthgen.audit.fidelity import LabelHead, LpipsScorer
from synthgen.audit.groups import (
    DistributionScorer,
    Group,
    GroupEvidence,
    groups_of,
    score_groups,
)
from synthgen.audit.items import (
    AuditInputs,
    AuditSettings,
    SourceItem,
    SyntheticItem,
    validate_inputs,
)
from synthgen.audit.memorisation import MemorisationInput, check_memorisation
from synthgen.audit.reid import RankResult, normalise, rank_sources
from synthgen.audit.stream import (
    BatchHook,
    Embedded,
    ImageLike,
    PairFidelity,
    Streamed,
    embed_stream,
)

__all__ = [
    "AuditError",
    "AuditSettings",
    "ChanceLevelWarning",
    "LabelHead",
    "SourceItem",
    "SyntheticItem",
    "load_embedder",
    "run_audit",
]


class ChanceLevelWarning(UserWarning):
    """An attack did no better than chance: the attack failed, which does not prove privacy."""


def run_audit(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    *,
    report_dir: Path,
    holdout: Sequence[SourceItem] = (),
    settings: AuditSettings | None = None,
) -> dict:
    """Audit synthetic images against their sources; write the report files; return report.json.

    I2I items (with a source_id) are ranked against every source; T2I items (no source_id) are
    checked for memorisation against the sources as training cohort and, when given, `holdout`
    (real images never trained on). Without `settings`, `AuditSettings()`.
    """
    settings = settings or AuditSettings()
    inputs = validate_inputs(synthetic, sources, holdout, settings)
    models = _Models.load(settings)
    embedded = _embed(inputs, models, settings)
    groups = groups_of(synthetic)
    ranks = _rank(inputs, embedded, groups, settings)
    distribution = DistributionScorer(embedded, settings.device) if settings.distribution else None
    entries, found_warnings = score_groups(
        groups, GroupEvidence(inputs, settings, embedded, ranks, distribution)
    )
    for message in found_warnings:
        warnings.warn(message, ChanceLevelWarning, stacklevel=2)
    memorisation, memorised_pairs = _memorisation(inputs, embedded, settings)
    report = {
        "synthgen_audit": 1,
        "settings": _settings_record(inputs, models, settings),
        "notes": audit_report.NOTES,
        "warnings": found_warnings,
        "groups": entries,
        "memorisation": memorisation,
    }
    pairs = _most_reidentifiable(inputs, ranks, settings.contact_pairs)
    return audit_report.write_report(report, Path(report_dir), pairs, memorised_pairs)


@dataclass(frozen=True)
class _Models:
    """The attacker's embedder, the label predictor and the LPIPS scorer, each loaded once."""

    embed: Embedder
    predict: Embedder | None
    lpips: LpipsScorer | None

    @classmethod
    def load(cls, settings: AuditSettings) -> _Models:
        device = settings.device
        predictor = settings.predictor
        return cls(
            embed=load_embedder(settings.embedder, device),
            predict=load_embedder(predictor, device, keep_head=True) if predictor else None,
            lpips=LpipsScorer(settings.lpips, device) if settings.lpips else None,
        )


def _embed(inputs: AuditInputs, models: _Models, settings: AuditSettings) -> Embedded:
    """Every image through the embedder once, the predictor on linked rows only; each
    image-to-image output is scored against its source on the way. The holdout is embedded only
    when text-to-image rows are checked against it."""
    real = _stream(
        _numbered(inputs.sources, "source"),
        "embedding sources",
        models,
        settings,
        predict_rows=np.unique(inputs.true_index),
    )
    pair_scores = PairFidelity(_sources_of(inputs), models.lpips)
    fake = _stream(
        [(item.image, f"synthetic {item.key!r}") for item in inputs.synthetic],
        "embedding synthetic",
        models,
        settings,
        predict_rows=inputs.i2i_rows,
        on_batch=pair_scores,
    )
    _check_prediction_width(fake, settings)
    holdout_unit = None
    if len(inputs.t2i_rows) and inputs.holdout:
        held = _stream(_numbered(inputs.holdout, "holdout"), "embedding holdout", models, settings)
        holdout_unit = normalise(held.features)
    return Embedded(
        real, fake, pair_scores, normalise(real.features), normalise(fake.features), holdout_unit
    )


def _sources_of(inputs: AuditInputs) -> list[tuple[ImageLike, str] | None]:
    """The source image of each synthetic row (None for text-to-image), named without its id."""
    return [
        (inputs.sources[inputs.source_row[item.source_id]].image, f"the source of {item.key!r}")
        if item.source_id
        else None
        for item in inputs.synthetic
    ]


def _check_prediction_width(fake: Streamed, settings: AuditSettings) -> None:
    width = sum(head.width for head in settings.label_heads)
    if fake.predictions is not None and fake.predictions.shape[1] != width:
        raise AuditError(
            f"predictor {settings.predictor!r} returns {fake.predictions.shape[1]} outputs per "
            f"image but the label heads need {width}"
        )


def _numbered(items: Sequence[SourceItem], what: str) -> list[tuple[ImageLike, str]]:
    """Real images named by position (`source #12`): their ids are protected."""
    return [(item.image, f"{what} #{i}") for i, item in enumerate(items)]


def _stream(
    images: Sequence[tuple[ImageLike, str]],
    desc: str,
    models: _Models,
    settings: AuditSettings,
    *,
    predict_rows: np.ndarray | None = None,
    on_batch: BatchHook | None = None,
) -> Streamed:
    """`embed_stream` with this audit's embedder and batches; the predictor where rows are given."""
    return embed_stream(
        images,
        models.embed,
        batch_size=settings.batch_size,
        desc=desc,
        progress=settings.progress,
        predictor=models.predict if predict_rows is not None else None,
        predict_rows=predict_rows,
        on_batch=on_batch,
    )


def _rank(
    inputs: AuditInputs, embedded: Embedded, groups: Sequence[Group], settings: AuditSettings
) -> RankResult | None:
    """Where each image-to-image output's source (and patient) ranks among all sources."""
    if not len(inputs.i2i_rows):
        return None
    query_group = np.zeros(len(inputs.i2i_rows), dtype=np.int64)
    for group in groups:
        if group.number >= 0:
            query_group[inputs.at(group.rows)] = group.number
    return rank_sources(
        embedded.synth_unit[inputs.i2i_rows],
        embedded.source_unit,
        inputs.true_index,
        inputs.source_patient,
        query_group,
        device=settings.device,
        progress=settings.progress,
    )


def _memorisation(
    inputs: AuditInputs, embedded: Embedded, settings: AuditSettings
) -> tuple[dict[str, Any] | None, list[audit_report.Pair]]:
    """The memorisation check of the text-to-image rows, if there are any."""
    if not len(inputs.t2i_rows):
        return None, []
    t2i = MemorisationInput(
        synthetic=[inputs.synthetic[row] for row in inputs.t2i_rows],
        queries=embedded.synth_unit[inputs.t2i_rows],
        training=inputs.sources,
        training_unit=embedded.source_unit,
        training_patient=inputs.source_patient,
        holdout_unit=embedded.holdout_unit,
    )
    return check_memorisation(
        t2i,
        quantile=settings.memorisation_quantile,
        count=settings.contact_pairs,
        device=settings.device,
    )


def _settings_record(inputs: AuditInputs, models: _Models, settings: AuditSettings) -> dict:
    """What report.json says about how it was made: names, hashes and counts, no ids."""
    return {
        "embedder": settings.embedder,
        "embedder_weights_sha256": models.embed.weights_sha256,
        "predictor": settings.predictor,
        "predictor_weights_sha256": models.predict.weights_sha256 if models.predict else None,
        "label_heads": [
            {"name": h.name, "kind": h.kind, "classes": list(h.classes)}
            for h in settings.label_heads
        ],
        "similarity": "cosine of L2-normalised embeddings; ties count for the attacker",
        "n_sources": len(inputs.sources),
        "n_patients": inputs.n_patients,
        "n_synthetic": len(inputs.synthetic),
        "n_holdout": len(inputs.holdout),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": settings.device,
        "torch": torch.__version__,
        **dict(settings.extra),
    }


def _most_reidentifiable(
    inputs: AuditInputs, ranks: RankResult | None, count: int
) -> list[audit_report.Pair]:
    """Best-ranked first, most similar first among equals; captions carry keys and ranks only."""
    if ranks is None or count <= 0:
        return []
    pairs = []
    for at in np.lexsort((-ranks.true_similarity, ranks.image_rank))[:count]:
        item = inputs.synthetic[inputs.i2i_rows[at]]
        strength = "" if item.strength is None else f" s={item.strength:g}"
        caption = (
            f"{item.key}{strength}\n"
            f"rank {ranks.image_rank[at]}, sim {ranks.true_similarity[at]:.3f}"
        )
        source = inputs.sources[inputs.true_index[at]]
        pairs.append(audit_report.Pair(item.image, source.image, caption))
    return pairs
