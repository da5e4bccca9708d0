"""The groups an audit reports on (one per strength, all strengths together, text-to-image) and
each group's report entry: re-identification, fidelity, label utility, distribution.

Entries name groups, keys and numbers only; source rows are positions, never ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from synthgen.audit.fidelity import RealFeatures, fid_kid, kth_similarity, label_agreement, prdc
from synthgen.audit.items import AuditInputs, AuditSettings, SyntheticItem
from synthgen.audit.reid import LevelSummary, RankResult, mean_estimate, summarise_level
from synthgen.audit.stream import Embedded, PairFidelity

DISTRIBUTION_MAX = 10_000  # images per side for precision/recall/density/coverage
ALL_STRENGTHS = "i2i all strengths"


@dataclass
class Group:
    mode: str  # "i2i" | "t2i"
    strength: float | None
    name: str
    rows: np.ndarray  # indices into the synthetic sequence
    number: int = 0  # histogram row in the re-identification result (per-strength groups)


def groups_of(synthetic: Sequence[SyntheticItem]) -> list[Group]:
    """One group per strength, one for all strengths when there are several, one for T2I."""
    strengths: dict[float | None, list[int]] = {}
    t2i: list[int] = []
    for row, item in enumerate(synthetic):
        (strengths.setdefault(item.strength, []) if item.source_id else t2i).append(row)
    groups = []
    for number, strength in enumerate(sorted(strengths, key=lambda s: (s is None, s or 0.0))):
        name = "i2i" if strength is None else f"i2i strength={strength:g}"
        groups.append(Group("i2i", strength, name, np.array(strengths[strength]), number))
    if len(groups) > 1:
        rows = np.sort(np.concatenate([g.rows for g in groups]))
        groups.append(Group("i2i", None, ALL_STRENGTHS, rows, -1))
    if t2i:
        groups.append(Group("t2i", None, "t2i", np.array(t2i), -1))
    return groups


class DistributionScorer:
    """FID, KID and PRDC of a group's synthetic rows against all sources; the real side (its
    FID statistics, its subsample and its k-th neighbour radii) is computed once for every group."""

    def __init__(self, embedded: Embedded, device: str):
        real = embedded.real.features
        self.real, self.device = RealFeatures(real), device
        self.real_unit = embedded.source_unit[_at_most(np.arange(len(real)), DISTRIBUTION_MAX)]
        self.fake, self.fake_unit = embedded.fake.features, embedded.synth_unit
        self._radii: dict[int, np.ndarray] = {}

    def score(self, rows: np.ndarray) -> dict:
        fid, kid, reason = fid_kid(self.real, self.fake[rows])
        if reason:
            return {"computed": False, "reason": reason}
        rows = _at_most(rows, DISTRIBUTION_MAX)
        k = min(5, len(self.real_unit) - 1, len(rows) - 1)
        scores = prdc(
            self.real_unit,
            self.fake_unit[rows],
            k=k,
            device=self.device,
            real_kth=self._real_radii(k),
        )
        out = {"computed": True, "fid": fid.to_dict(), "kid": kid.to_dict(), "prdc_k": k}
        for name in ("precision", "recall", "density", "coverage"):
            out[name] = getattr(scores, name).to_dict()
        return out

    def _real_radii(self, k: int) -> np.ndarray:
        if k not in self._radii:
            self._radii[k] = kth_similarity(self.real_unit, k, self.device)
        return self._radii[k]


def _at_most(rows: np.ndarray, limit: int) -> np.ndarray:
    """`rows`, or a fixed random `limit` of them in order (the same subset on every run)."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, limit, replace=False))


@dataclass(frozen=True)
class GroupEvidence:
    """What every group's entry is read from, computed once per audit."""

    inputs: AuditInputs
    settings: AuditSettings
    embedded: Embedded
    ranks: RankResult | None  # None without image-to-image rows
    distribution: DistributionScorer | None  # None when not asked for


def score_groups(groups: Sequence[Group], evidence: GroupEvidence) -> tuple[list[dict], list[str]]:
    """Each group's report entry, and the chance-level warnings of them all."""
    entries, found = [], []
    progress = evidence.settings.progress
    for group in tqdm(groups, desc="scoring groups", unit="group", disable=not progress):
        entry, group_warnings = _score_group(group, evidence)
        entries.append(entry)
        found += group_warnings
    return entries, found


def _score_group(group: Group, evidence: GroupEvidence) -> tuple[dict[str, Any], list[str]]:
    entry: dict[str, Any] = {
        "mode": group.mode,
        "strength": group.strength,
        "name": group.name,
        "n_synthetic": len(group.rows),
    }
    found: list[str] = []
    if group.mode == "i2i" and evidence.ranks is not None:
        inputs = evidence.inputs
        at = inputs.at(group.rows)
        levels = _reidentification(evidence.ranks, at, group, inputs)
        entry["reidentification"] = {level: s.to_dict() for level, s in levels.items()}
        found = _chance_warnings(levels, group.name, evidence.settings.embedder)
        entry["fidelity"] = _fidelity(group.rows, evidence.embedded.pair_scores)
        entry["label_utility"] = _label_utility(group.rows, inputs.true_index[at], evidence)
    if evidence.distribution is not None:
        entry["distribution"] = evidence.distribution.score(group.rows)
    return entry, found


def _reidentification(
    ranks: RankResult, at: np.ndarray, group: Group, inputs: AuditInputs
) -> dict[str, LevelSummary]:
    histograms = slice(None) if group.number < 0 else slice(group.number, group.number + 1)
    return {
        "image": summarise_level(
            ranks.image_rank[at],
            ranks.true_similarity[at],
            ranks.image_impostors[histograms].sum(0),
            len(inputs.sources),
        ),
        "patient": summarise_level(
            ranks.patient_rank[at],
            ranks.patient_similarity[at],
            ranks.patient_impostors[histograms].sum(0),
            inputs.n_patients,
        ),
    }


def _chance_warnings(levels: dict[str, LevelSummary], group_name: str, embedder: str) -> list[str]:
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


def _fidelity(rows: np.ndarray, scores: PairFidelity) -> dict:
    ssim = scores.ssim[rows]
    out: dict[str, Any] = {
        "psnr_db": mean_estimate(scores.psnr[rows], "higher is closer to the source").to_dict(),
        "ssim": mean_estimate(ssim[~np.isnan(ssim)], "higher is closer to the source").to_dict(),
        "resize": "RGB in [0, 1] at the smaller of the two sizes (the larger downsampled, Lanczos)",
    }
    if scores.lpips is None:
        out["lpips"] = {"computed": False, "reason": scores.lpips_reason}
    else:
        lpips = scores.lpips_values[rows]
        out["lpips"] = mean_estimate(lpips, "lower is closer to the source").to_dict()
    return out


def _label_utility(rows: np.ndarray, source_rows: np.ndarray, evidence: GroupEvidence) -> dict:
    """The predictor's agreement with each source label, on the synthetic images and the sources."""
    heads = evidence.settings.label_heads
    on_synthetic = evidence.embedded.fake.predictions
    on_source = evidence.embedded.real.predictions
    if not heads or on_synthetic is None or on_source is None:
        return {"computed": False, "reason": "no predictor was given (--predictor)"}
    labels, column = {}, 0
    for head in heads:
        columns = slice(column, column + head.width)
        column += head.width
        truth = [evidence.inputs.sources[i].labels[head.name] for i in source_rows]
        agreement = label_agreement(
            head, truth, on_synthetic[rows, columns], on_source[source_rows, columns]
        )
        labels[head.name] = {name: estimate.to_dict() for name, estimate in agreement.items()}
    return {"computed": True, "labels": labels}
