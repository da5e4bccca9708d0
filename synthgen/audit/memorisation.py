"""Memorisation check for text-to-image outputs: how close each one comes to a training image.

A threshold comes from real-vs-real nearest neighbours of different patients in the training
cohort (their `quantile`, e.g. 0.99): a synthetic image nearer to a training image than that is
closer than two different patients usually are. With a holdout cohort, the share of synthetic
images nearer to training than to holdout is reported, training subsampled to the holdout's size
so that 0.5 is what no memorisation looks like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from synthgen.audit import report as audit_report
from synthgen.audit.embedders import Embedder
from synthgen.audit.reid import (
    Estimate,
    mean_estimate,
    nearest_similarity,
    normalise,
    wilson_interval,
)
from synthgen.audit.stream import embed_stream

REFERENCE_MAX = 10_000  # training images used as queries for the real-vs-real threshold


def check_memorisation(
    synthetic: Sequence,
    t2i_rows: np.ndarray,
    synth_unit: torch.Tensor,
    sources: Sequence,
    source_unit: torch.Tensor,
    source_patient: np.ndarray,
    holdout: Sequence,
    embedder: Embedder,
    *,
    batch_size: int,
    quantile: float,
    count: int,
    device: str,
    progress: bool,
) -> tuple[dict[str, Any], list[audit_report.Pair]]:
    """Nearest-training similarity of T2I rows, the share above the real-vs-real threshold, and
    (with a holdout) the share nearer to training than to holdout; plus the closest pairs."""
    queries = synth_unit[t2i_rows]
    nearest, where = nearest_similarity(queries, source_unit, device=device)
    nearest, where = nearest[:, 0], where[:, 0]
    rng = np.random.default_rng(0)
    reference = np.arange(len(sources))
    if len(reference) > REFERENCE_MAX:
        reference = np.sort(rng.choice(reference, REFERENCE_MAX, replace=False))
    real_nn = nearest_similarity(
        source_unit[reference],
        source_unit,
        query_patient=source_patient[reference],
        gallery_patient=source_patient,
        device=device,
    )[0][:, 0]
    real_nn = real_nn[np.isfinite(real_nn)]
    report: dict[str, Any] = {
        "n_synthetic": len(t2i_rows),
        "nearest_training_similarity": mean_estimate(
            nearest.astype(np.float64), "lower is more private"
        ).to_dict(),
    }
    threshold = float(np.quantile(real_nn, quantile)) if len(real_nn) else None
    if threshold is None:
        report["above_threshold"] = {
            "computed": False,
            "reason": "the training cohort has a single patient: no real-vs-real reference",
        }
        above = np.zeros(len(t2i_rows), dtype=bool)
    else:
        above = nearest > threshold
        hits = int(above.sum())
        report["threshold"] = {
            "value": threshold,
            "quantile": quantile,
            "reference": "nearest training neighbour of a different patient, per training image",
            "n_reference": len(real_nn),
        }
        report["above_threshold"] = Estimate(
            hits / len(t2i_rows),
            wilson_interval(hits, len(t2i_rows)),
            len(t2i_rows),
            f"lower is more private ({1 - quantile:.3g} expected by chance)",
            "Wilson",
        ).to_dict()
    report["closer_to_training_than_holdout"] = _versus_holdout(
        queries, source_unit, holdout, embedder, batch_size, device, progress, rng
    )
    order = np.argsort(-nearest)[:count]
    report["closest"] = [
        {
            "key": synthetic[t2i_rows[i]].key,
            "similarity": float(nearest[i]),
            "above": bool(above[i]),
        }
        for i in order
    ]
    pairs = [
        audit_report.Pair(
            synthetic[t2i_rows[i]].image,
            sources[where[i]].image,
            f"{synthetic[t2i_rows[i]].key}\nnearest training sim {nearest[i]:.3f}",
        )
        for i in order
    ]
    return report, pairs


def _versus_holdout(
    queries: torch.Tensor,
    source_unit: torch.Tensor,
    holdout: Sequence,
    embedder: Embedder,
    batch_size: int,
    device: str,
    progress: bool,
    rng: np.random.Generator,
) -> dict[str, Any]:
    if not holdout:
        return {"computed": False, "reason": "no holdout cohort was given"}
    holdout_feats = embed_stream(
        [(item.image, f"holdout #{i}") for i, item in enumerate(holdout)],
        embedder,
        batch_size=batch_size,
        desc="embedding holdout",
        progress=progress,
    ).features
    training = np.arange(source_unit.shape[0])
    if len(training) > len(holdout):
        training = np.sort(rng.choice(training, len(holdout), replace=False))
    to_train = nearest_similarity(queries, source_unit[training], device=device)[0][:, 0]
    to_holdout = nearest_similarity(queries, normalise(holdout_feats), device=device)[0][:, 0]
    hits, n = int((to_train > to_holdout).sum()), len(to_train)
    return Estimate(
        hits / n,
        wilson_interval(hits, n),
        n,
        "0.5 = no memorisation; higher suggests memorisation",
        f"Wilson; training subsampled to {len(training)} to match the holdout",
    ).to_dict()
