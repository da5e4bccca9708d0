"""Memorisation check for text-to-image outputs: how close each one comes to a training image.

A threshold comes from real-vs-real nearest neighbours of different patients in the training
cohort (their `quantile`, e.g. 0.99): a synthetic image nearer to a training image than that is
closer than two different patients usually are. With a holdout cohort, the share of synthetic
images nearer to training than to holdout is reported, training subsampled to the holdout's size
so that 0.5 is what no memorisation looks like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synthgen.audit import report as audit_report
from synthgen.audit.items import SourceItem, SyntheticItem
from synthgen.audit.reid import Estimate, mean_estimate, nearest_similarity, wilson_interval

REFERENCE_MAX = 10_000  # training images used as queries for the real-vs-real threshold


@dataclass(frozen=True)
class MemorisationInput:
    """The embedded sides the check compares; every embedding L2-normalised, one row per item."""

    synthetic: Sequence[SyntheticItem]  # the text-to-image items, in the rows of `queries`
    queries: torch.Tensor  # (Q, D)
    training: Sequence[SourceItem]  # the sources the generator was trained on
    training_unit: torch.Tensor  # (N, D)
    training_patient: np.ndarray  # (N,) patient number of each training row
    holdout_unit: torch.Tensor | None  # (H, D) real images never trained on, or None


def check_memorisation(
    inputs: MemorisationInput, *, quantile: float, count: int, device: str
) -> tuple[dict[str, Any], list[audit_report.Pair]]:
    """Nearest-training similarity of the T2I images, the share above the real-vs-real threshold,
    and (with a holdout) the share nearer to training than to holdout; plus the `count` closest
    pairs."""
    nearest, where = nearest_similarity(inputs.queries, inputs.training_unit, device=device)
    nearest, where = nearest[:, 0], where[:, 0]
    rng = np.random.default_rng(0)  # one stream for both subsamples: the same subsets every run
    report: dict[str, Any] = {
        "n_synthetic": len(inputs.synthetic),
        "nearest_training_similarity": mean_estimate(
            nearest.astype(np.float64), "lower is more private"
        ).to_dict(),
    }
    real_nn = _real_vs_real(inputs, rng, device)
    threshold, above = _above_threshold(nearest, real_nn, quantile)
    report.update(threshold)
    report["closer_to_training_than_holdout"] = _versus_holdout(inputs, rng, device)
    order = np.argsort(-nearest)[:count]
    report["closest"] = [
        {"key": inputs.synthetic[i].key, "similarity": float(nearest[i]), "above": bool(above[i])}
        for i in order
    ]
    pairs = [
        audit_report.Pair(
            inputs.synthetic[i].image,
            inputs.training[where[i]].image,
            f"{inputs.synthetic[i].key}\nnearest training sim {nearest[i]:.3f}",
        )
        for i in order
    ]
    return report, pairs


def _real_vs_real(inputs: MemorisationInput, rng: np.random.Generator, device: str) -> np.ndarray:
    """Each reference training image's nearest training neighbour of another patient."""
    reference = np.arange(len(inputs.training))
    if len(reference) > REFERENCE_MAX:
        reference = np.sort(rng.choice(reference, REFERENCE_MAX, replace=False))
    real_nn = nearest_similarity(
        inputs.training_unit[reference],
        inputs.training_unit,
        query_patient=inputs.training_patient[reference],
        gallery_patient=inputs.training_patient,
        device=device,
    )[0][:, 0]
    return real_nn[np.isfinite(real_nn)]  # a single-patient cohort has no other patient


def _above_threshold(
    nearest: np.ndarray, real_nn: np.ndarray, quantile: float
) -> tuple[dict[str, Any], np.ndarray]:
    """The report's threshold entries, and which synthetic images lie above the threshold."""
    if not len(real_nn):
        reason = "the training cohort has a single patient: no real-vs-real reference"
        unknown = {"computed": False, "reason": reason}
        return {"above_threshold": unknown}, np.zeros(len(nearest), dtype=bool)
    threshold = float(np.quantile(real_nn, quantile))
    above = nearest > threshold
    hits, n = int(above.sum()), len(nearest)
    entries = {
        "threshold": {
            "value": threshold,
            "quantile": quantile,
            "reference": "nearest training neighbour of a different patient, per training image",
            "n_reference": len(real_nn),
        },
        "above_threshold": Estimate(
            hits / n,
            wilson_interval(hits, n),
            n,
            f"lower is more private ({1 - quantile:.3g} expected by chance)",
            "Wilson",
        ).to_dict(),
    }
    return entries, above


def _versus_holdout(
    inputs: MemorisationInput, rng: np.random.Generator, device: str
) -> dict[str, Any]:
    """Share of synthetic images nearer to training than to holdout, at equal gallery sizes."""
    if inputs.holdout_unit is None:
        return {"computed": False, "reason": "no holdout cohort was given"}
    n_holdout = inputs.holdout_unit.shape[0]
    training = np.arange(inputs.training_unit.shape[0])
    if len(training) > n_holdout:
        training = np.sort(rng.choice(training, n_holdout, replace=False))
    to_train = nearest_similarity(inputs.queries, inputs.training_unit[training], device=device)
    to_holdout = nearest_similarity(inputs.queries, inputs.holdout_unit, device=device)
    hits, n = int((to_train[0][:, 0] > to_holdout[0][:, 0]).sum()), inputs.queries.shape[0]
    return Estimate(
        hits / n,
        wilson_interval(hits, n),
        n,
        "0.5 = no memorisation; higher suggests memorisation",
        f"Wilson; training subsampled to {len(training)} to match the holdout",
    ).to_dict()
