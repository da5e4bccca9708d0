"""Privacy-utility audit: re-identification, fidelity and utility of synthetic vs source images.

The engine knows nothing of file layout: callers hand it `SyntheticItem`s and `SourceItem`s
(images or zero-argument loaders, so a 10^5 cohort streams) and a report directory. Source and
patient ids are protected health information and never reach the report: it names synthetic
keys and ranks only. The default embedders give a lower bound on re-identification risk; the
paper's matcher is unpublished, so no parity with its numbers is claimed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from synthgen.audit import report as audit_report
from synthgen.audit.embedders import AuditError, load_embedder
from synthgen.audit.fidelity import (
    LabelHead,
    LpipsScorer,
    RealFeatures,
    fid_kid,
    kth_similarity,
    label_agreement,
    prdc,
)
from synthgen.audit.items import SourceItem, SyntheticItem, validate_inputs
from synthgen.audit.memorisation import check_memorisation
from synthgen.audit.reid import RankResult, mean_estimate, normalise, rank_sources, summarise_level
from synthgen.audit.stream import PairFidelity, embed_stream

__all__ = [
    "AuditError",
    "ChanceLevelWarning",
    "LabelHead",
    "SourceItem",
    "SyntheticItem",
    "load_embedder",
    "run_audit",
]

DISTRIBUTION_MAX = 10_000  # images per side for precision/recall/density/coverage
ALL_STRENGTHS = "i2i all strengths"


class ChanceLevelWarning(UserWarning):
    """An attack did no better than chance: the attack failed, which does not prove privacy."""


@dataclass
class _Group:
    mode: str  # "i2i" | "t2i"
    strength: float | None
    name: str
    rows: np.ndarray  # indices into the synthetic sequence
    number: int = 0  # histogram row in the re-identification result (per-strength groups)


def _groups(synthetic: Sequence[SyntheticItem]) -> list[_Group]:
    """One group per strength, one for all strengths when there are several, one for T2I."""
    strengths: dict[float | None, list[int]] = {}
    t2i: list[int] = []
    for row, item in enumerate(synthetic):
        (strengths.setdefault(item.strength, []) if item.source_id else t2i).append(row)
    groups = []
    for number, strength in enumerate(sorted(strengths, key=lambda s: (s is None, s or 0.0))):
        name = "i2i" if strength is None else f"i2i strength={strength:g}"
        groups.append(_Group("i2i", strength, name, np.array(strengths[strength]), number))
    if len(groups) > 1:
        rows = np.sort(np.concatenate([g.rows for g in groups]))
        groups.append(_Group("i2i", None, ALL_STRENGTHS, rows, -1))
    if t2i:
        groups.append(_Group("t2i", None, "t2i", np.array(t2i), -1))
    return groups


def run_audit(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    *,
    report_dir: Path,
    embedder: str = "pixels",
    predictor: str | None = None,
    label_heads: Sequence[LabelHead] = (),
    holdout: Sequence[SourceItem] = (),
    device: str = "cpu",
    batch_size: int = 64,
    lpips: str | None = "alex",
    distribution: bool = True,
    memorisation_quantile: float = 0.99,
    contact_pairs: int = 16,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict:
    """Audit synthetic images against their sources; write the report files; return report.json.

    I2I items (with a source_id) are ranked against every source; T2I items (no source_id) are
    checked for memorisation against the sources as training cohort and, when given, `holdout`
    (real images never trained on). `label_heads` map the predictor's output columns to the
    sources' `labels`. `settings` are extra caller settings recorded in the report (no ids).
    """
    index = validate_inputs(synthetic, sources, holdout, predictor, label_heads)
    embed = load_embedder(embedder, device)
    predict = load_embedder(predictor, device, keep_head=True) if predictor else None
    groups = _groups(synthetic)
    i2i_rows = np.array([r for r, item in enumerate(synthetic) if item.source_id], dtype=np.int64)
    true_index = np.array([index[synthetic[r].source_id] for r in i2i_rows], dtype=np.int64)
    patient_of = {pid: n for n, pid in enumerate(dict.fromkeys(s.patient_id for s in sources))}
    source_patient = np.array([patient_of[s.patient_id] for s in sources], dtype=np.int64)

    real = embed_stream(
        [(source.image, f"source #{i}") for i, source in enumerate(sources)],
        embed,
        batch_size=batch_size,
        desc="embedding sources",
        progress=progress,
        predictor=predict,
        predict_rows=np.unique(true_index),
    )
    scorer = LpipsScorer(lpips, device) if lpips else None
    pair_scores = PairFidelity(
        [
            (sources[index[item.source_id]].image, f"the source of {item.key!r}")
            if item.source_id
            else None
            for item in synthetic
        ],
        scorer,
    )
    fake = embed_stream(
        [(item.image, f"synthetic {item.key!r}") for item in synthetic],
        embed,
        batch_size=batch_size,
        desc="embedding synthetic",
        progress=progress,
        predictor=predict,
        predict_rows=i2i_rows,
        on_batch=pair_scores,
    )
    width = sum(head.width for head in label_heads)
    if fake.predictions is not None and fake.predictions.shape[1] != width:
        raise AuditError(
            f"predictor {predictor!r} returns {fake.predictions.shape[1]} outputs per image but "
            f"the label heads need {width}"
        )
    source_unit, synth_unit = normalise(real.features), normalise(fake.features)

    ranks = None
    position = {row: i for i, row in enumerate(i2i_rows.tolist())}
    if len(i2i_rows):
        query_group = np.zeros(len(i2i_rows), dtype=np.int64)
        for group in groups:
            if group.number >= 0:
                query_group[[position[r] for r in group.rows]] = group.number
        ranks = rank_sources(
            synth_unit[i2i_rows],
            source_unit,
            true_index,
            source_patient,
            query_group,
            device=device,
            progress=progress,
        )

    entries, found_warnings = [], []
    reference = _RealReference(real.features, source_unit, device) if distribution else None
    for group in tqdm(groups, desc="scoring groups", unit="group", disable=not progress):
        entry: dict[str, Any] = {
            "mode": group.mode,
            "strength": group.strength,
            "name": group.name,
            "n_synthetic": len(group.rows),
        }
        if group.mode == "i2i" and ranks is not None:
            at = np.array([position[r] for r in group.rows])
            levels = _reidentification(ranks, at, group, len(sources), len(patient_of))
            entry["reidentification"] = {level: s.to_dict() for level, s in levels.items()}
            found_warnings += _chance_warnings(levels, group.name, embedder)
            entry["fidelity"] = _fidelity(group.rows, pair_scores, scorer)
            source_rows = np.array([index[synthetic[r].source_id] for r in group.rows])
            entry["label_utility"] = _label_utility(
                group.rows, source_rows, sources, label_heads, fake.predictions, real.predictions
            )
        if distribution:
            entry["distribution"] = _distribution(reference, fake.features, synth_unit, group.rows)
        entries.append(entry)
    for message in found_warnings:
        warnings.warn(message, ChanceLevelWarning, stacklevel=2)

    t2i_rows = np.array([r for r, item in enumerate(synthetic) if not item.source_id], dtype=int)
    memorisation, memorised_pairs = None, []
    if len(t2i_rows):
        memorisation, memorised_pairs = check_memorisation(
            synthetic,
            t2i_rows,
            synth_unit,
            sources,
            source_unit,
            source_patient,
            holdout,
            embed,
            batch_size=batch_size,
            quantile=memorisation_quantile,
            count=contact_pairs,
            device=device,
            progress=progress,
        )

    report = {
        "synthgen_audit": 1,
        "settings": {
            "embedder": embedder,
            "embedder_weights_sha256": embed.weights_sha256,
            "predictor": predictor,
            "predictor_weights_sha256": predict.weights_sha256 if predict else None,
            "label_heads": [
                {"name": h.name, "kind": h.kind, "classes": list(h.classes)} for h in label_heads
            ],
            "similarity": "cosine of L2-normalised embeddings; ties count for the attacker",
            "n_sources": len(sources),
            "n_patients": len(patient_of),
            "n_synthetic": len(synthetic),
            "n_holdout": len(holdout),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "torch": torch.__version__,
            **dict(settings or {}),
        },
        "notes": audit_report.NOTES,
        "warnings": found_warnings,
        "groups": entries,
        "memorisation": memorisation,
    }
    pairs = _most_reidentifiable(synthetic, sources, index, i2i_rows, ranks, contact_pairs)
    return audit_report.write_report(report, Path(report_dir), pairs, memorised_pairs)


def _reidentification(
    ranks: RankResult, at: np.ndarray, group: _Group, n_sources: int, n_patients: int
) -> dict:
    histograms = slice(None) if group.number < 0 else slice(group.number, group.number + 1)
    return {
        "image": summarise_level(
            ranks.image_rank[at],
            ranks.true_similarity[at],
            ranks.image_impostors[histograms].sum(0),
            n_sources,
        ),
        "patient": summarise_level(
            ranks.patient_rank[at],
            ranks.patient_similarity[at],
            ranks.patient_impostors[histograms].sum(0),
            n_patients,
        ),
    }


def _chance_warnings(levels: dict, group_name: str, embedder: str) -> list[str]:
    """Like anonymeter: say so when an attack does no better than guessing."""
    found = []
    for level, summary in levels.items():
        for k, rate in (("top-1", summary.top1), ("top-5", summary.top5)):
            if rate.at_chance:
                found.append(
                    f"{group_name}, {level} level: {k} re-identification {rate.value:.3f} "
                    f"(95% CI {rate.ci95[0]:.3f}-{rate.ci95[1]:.3f}) is no better than chance "
                    f"{rate.chance:.4f} with embedder {embedder!r}: the attack failed, which is "
                    "not proof of privacy"
                )
    return found


def _fidelity(rows: np.ndarray, scores: PairFidelity, scorer: LpipsScorer | None) -> dict:
    ssim = scores.ssim[rows]
    out: dict[str, Any] = {
        "psnr_db": mean_estimate(scores.psnr[rows], "higher is closer to the source").to_dict(),
        "ssim": mean_estimate(ssim[~np.isnan(ssim)], "higher is closer to the source").to_dict(),
        "resize": "RGB in [0, 1] at the smaller of the two sizes (the larger downsampled, Lanczos)",
    }
    if scores.lpips is None:
        reason = scorer.reason if scorer is not None else "not requested"
        out["lpips"] = {"computed": False, "reason": reason}
    else:
        lpips = scores.lpips_values[rows]
        out["lpips"] = mean_estimate(lpips, "lower is closer to the source").to_dict()
    return out


def _label_utility(
    rows: np.ndarray,
    source_rows: np.ndarray,
    sources: Sequence[SourceItem],
    heads: Sequence[LabelHead],
    on_synthetic: np.ndarray | None,
    on_source: np.ndarray | None,
) -> dict:
    if not heads or on_synthetic is None or on_source is None:
        return {"computed": False, "reason": "no predictor was given (--predictor)"}
    labels, column = {}, 0
    for head in heads:
        columns = slice(column, column + head.width)
        column += head.width
        truth = [sources[i].labels[head.name] for i in source_rows]
        agreement = label_agreement(
            head, truth, on_synthetic[rows, columns], on_source[source_rows, columns]
        )
        labels[head.name] = {name: estimate.to_dict() for name, estimate in agreement.items()}
    return {"computed": True, "labels": labels}


class _RealReference:
    """The real side of the distribution metrics, shared by every group: computed once."""

    def __init__(self, features: torch.Tensor, unit: torch.Tensor, device: str):
        self.real, self.device = RealFeatures(features), device
        self.unit = unit[_at_most(np.arange(len(features)), DISTRIBUTION_MAX)]
        self._radii: dict[int, np.ndarray] = {}

    def radii(self, k: int) -> np.ndarray:
        if k not in self._radii:
            self._radii[k] = kth_similarity(self.unit, k, self.device)
        return self._radii[k]


def _at_most(rows: np.ndarray, limit: int) -> np.ndarray:
    """`rows`, or a fixed random `limit` of them in order (the same subset on every run)."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, limit, replace=False))


def _distribution(
    reference: _RealReference, fake: torch.Tensor, fake_unit: torch.Tensor, rows: np.ndarray
) -> dict:
    fid, kid, reason = fid_kid(reference.real, fake[rows])
    if reason:
        return {"computed": False, "reason": reason}
    rows = _at_most(rows, DISTRIBUTION_MAX)
    k = min(5, len(reference.unit) - 1, len(rows) - 1)
    scores = prdc(
        reference.unit,
        fake_unit[rows],
        k=k,
        device=reference.device,
        real_kth=reference.radii(k),
    )
    out = {"computed": True, "fid": fid.to_dict(), "kid": kid.to_dict(), "prdc_k": k}
    for name in ("precision", "recall", "density", "coverage"):
        out[name] = getattr(scores, name).to_dict()
    return out


def _most_reidentifiable(
    synthetic: Sequence[SyntheticItem],
    sources: Sequence[SourceItem],
    index: dict[str, int],
    i2i_rows: np.ndarray,
    ranks: RankResult | None,
    count: int,
) -> list[audit_report.Pair]:
    """Best-ranked first, most similar first among equals; captions carry keys and ranks only."""
    if ranks is None or count <= 0:
        return []
    pairs = []
    for at in np.lexsort((-ranks.true_similarity, ranks.image_rank))[:count]:
        item = synthetic[i2i_rows[at]]
        strength = "" if item.strength is None else f" s={item.strength:g}"
        caption = (
            f"{item.key}{strength}\n"
            f"rank {ranks.image_rank[at]}, sim {ranks.true_similarity[at]:.3f}"
        )
        pairs.append(audit_report.Pair(item.image, sources[index[item.source_id]].image, caption))
    return pairs
