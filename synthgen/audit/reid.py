"""Re-identification statistics: blocked similarity search over embeddings, and rates from it.

Similarity is cosine similarity of L2-normalised embeddings. Search runs in blocks of queries
against the whole gallery, so no queries x gallery matrix is ever held. Ties count in the
attacker's favour (a rank is 1 + the number of candidates strictly more similar), which errs
towards reporting more risk, not less.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

Z95 = 1.959963984540054
AUC_BINS = 20_000  # histogram bins over [-1, 1] for pooled verification AUC: resolution 1e-4
BLOCK_ELEMENTS = 1 << 24  # similarities per block (64 MiB of float32)


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion hits/n."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exact ends, no rounding residue
    high = 1.0 if hits == n else min(1.0, centre + half)
    return (low, high)


def chance_normalised(rate: float, chance: float) -> float:
    """(rate - chance) / (1 - chance): 0 at chance, 1 at certain re-identification."""
    return (rate - chance) / (1 - chance) if chance < 1 else 0.0


def hanley_mcneil_interval(
    auc: float, n_pos: int, n_neg: int, z: float = Z95
) -> tuple[float, float]:
    """Approximate AUC interval (Hanley & McNeil 1982); treats pairs as independent."""
    if n_pos <= 0 or n_neg <= 0:
        return (0.0, 1.0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    half = z * math.sqrt(max(var, 0.0))
    return (max(0.0, auc - half), min(1.0, auc + half))


def normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def block_rows(n_columns: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    return max(1, min(4096, block_elements // max(1, n_columns)))


def _bins(similarity: torch.Tensor) -> torch.Tensor:
    return ((similarity + 1) * (AUC_BINS / 2)).long().clamp_(0, AUC_BINS - 1)


@dataclass
class RankResult:
    """Per query: where its true source (and true patient) ranks among all sources."""

    image_rank: np.ndarray  # 1-based rank of the true source image among all sources
    patient_rank: np.ndarray  # 1-based rank of the true patient among patients (max over images)
    true_similarity: np.ndarray  # similarity to the true source
    patient_similarity: np.ndarray  # max similarity to any image of the true patient
    image_impostors: np.ndarray  # (groups, AUC_BINS) histogram of query-vs-other-source scores
    patient_impostors: np.ndarray  # (groups, AUC_BINS) histogram of query-vs-other-patient scores


def rank_sources(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    true_index: np.ndarray,
    gallery_patient: np.ndarray,
    query_group: np.ndarray | None = None,
    *,
    device: str = "cpu",
    block_elements: int = BLOCK_ELEMENTS,
    progress: bool = True,
) -> RankResult:
    """Rank every gallery image (and patient) for each query; embeddings must be normalised.

    `true_index[i]` is the gallery row of query i's source; `gallery_patient[j]` the patient
    number (0..P-1) of gallery row j; `query_group[i]` (0..G-1) picks the impostor histogram.
    """
    n_query = queries.shape[0]
    n_patients = int(gallery_patient.max()) + 1 if len(gallery_patient) else 0
    groups = np.zeros(n_query, dtype=np.int64) if query_group is None else query_group
    n_groups = int(groups.max()) + 1 if n_query else 1
    gallery_d = gallery.to(device)
    patient_d = torch.as_tensor(gallery_patient, dtype=torch.long, device=device)
    true_d = torch.as_tensor(true_index, dtype=torch.long, device=device)
    image_rank = np.empty(n_query, dtype=np.int64)
    patient_rank = np.empty(n_query, dtype=np.int64)
    true_sim = np.empty(n_query, dtype=np.float32)
    patient_sim = np.empty(n_query, dtype=np.float32)
    image_hist = torch.zeros((n_groups, AUC_BINS), dtype=torch.long, device=device)
    patient_hist = torch.zeros((n_groups, AUC_BINS), dtype=torch.long, device=device)
    step = block_rows(gallery.shape[0] + n_patients, block_elements)
    starts = range(0, n_query, step)
    for start in tqdm(starts, desc="re-identification", unit="block", disable=not progress):
        stop = min(start + step, n_query)
        rows = torch.arange(stop - start, device=device)
        sims = queries[start:stop].to(device) @ gallery_d.T
        true_block = sims[rows, true_d[start:stop]]
        image_rank[start:stop] = ((sims > true_block[:, None]).sum(1) + 1).cpu().numpy()
        true_sim[start:stop] = true_block.cpu().numpy()
        per_patient = torch.full((stop - start, n_patients), -math.inf, device=device)
        per_patient.scatter_reduce_(1, patient_d.expand_as(sims), sims, "amax")
        true_patient = patient_d[true_d[start:stop]]
        patient_block = per_patient[rows, true_patient]
        patient_rank[start:stop] = ((per_patient > patient_block[:, None]).sum(1) + 1).cpu().numpy()
        patient_sim[start:stop] = patient_block.cpu().numpy()
        group_block = torch.as_tensor(groups[start:stop], device=device)
        for group in torch.unique(group_block).tolist():
            mask = group_block == group
            image_hist[group] += _impostor_histogram(sims[mask], true_block[mask])
            patient_hist[group] += _impostor_histogram(per_patient[mask], patient_block[mask])
    return RankResult(
        image_rank,
        patient_rank,
        true_sim,
        patient_sim,
        image_hist.cpu().numpy(),
        patient_hist.cpu().numpy(),
    )


def _impostor_histogram(scores: torch.Tensor, genuine: torch.Tensor) -> torch.Tensor:
    # Every score in the row minus the genuine one: subtract the genuine scores' own counts.
    hist = torch.bincount(_bins(scores).flatten(), minlength=AUC_BINS)
    return hist - torch.bincount(_bins(genuine), minlength=AUC_BINS)


def verification_auc(genuine: np.ndarray, impostors: np.ndarray) -> float:
    """P(genuine > impostor), ties half, from genuine scores and an impostor histogram."""
    n_imp = int(impostors.sum())
    if len(genuine) == 0 or n_imp == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(impostors)[:-1]])
    bins = _bins(torch.as_tensor(genuine, dtype=torch.float32)).numpy()
    return float(np.mean((below[bins] + 0.5 * impostors[bins]) / n_imp))


@dataclass
class Estimate:
    """A number with its 95% interval, direction and sample size, as the report writes it."""

    value: float
    ci95: tuple[float, float]
    n: int
    direction: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RateEstimate(Estimate):
    """A re-identification rate beside its chance level and chance-normalised risk."""

    chance: float = 0.0
    risk: float = 0.0
    risk_ci95: tuple[float, float] = (0.0, 0.0)

    @property
    def at_chance(self) -> bool:
        """True when the attack is not distinguishable from guessing (interval reaches chance)."""
        return self.ci95[0] <= self.chance


def rate_estimate(hits: int, n: int, chance: float) -> RateEstimate:
    rate = hits / n if n else float("nan")
    low, high = wilson_interval(hits, n)
    return RateEstimate(
        value=rate,
        ci95=(low, high),
        n=n,
        direction="lower is more private",
        method="Wilson score",
        chance=chance,
        risk=chance_normalised(rate, chance),
        risk_ci95=(chance_normalised(low, chance), chance_normalised(high, chance)),
    )


def mean_estimate(values: np.ndarray, direction: str) -> Estimate:
    """Mean with a normal-approximation 95% interval."""
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), (float("nan"), float("nan")), 0, direction, "mean")
    mean = float(np.mean(values))
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return Estimate(mean, (mean - half, mean + half), n, direction, "mean, normal 95% interval")


@dataclass
class LevelSummary:
    """Re-identification at one level (image or patient) for one group of synthetic images."""

    gallery_size: int
    top1: RateEstimate
    top5: RateEstimate
    mean_rank: Estimate
    verification_auc: Estimate

    def to_dict(self) -> dict:
        return {
            "gallery_size": self.gallery_size,
            "top1": self.top1.to_dict(),
            "top5": self.top5.to_dict(),
            "mean_rank": self.mean_rank.to_dict(),
            "verification_auc": self.verification_auc.to_dict(),
        }


def summarise_level(
    ranks: np.ndarray, genuine: np.ndarray, impostors: np.ndarray, gallery_size: int
) -> LevelSummary:
    n = len(ranks)
    auc = verification_auc(genuine, impostors)
    auc_ci = hanley_mcneil_interval(auc, n, int(impostors.sum())) if n else (math.nan, math.nan)
    return LevelSummary(
        gallery_size=gallery_size,
        top1=rate_estimate(int((ranks <= 1).sum()), n, min(1.0, 1 / gallery_size)),
        top5=rate_estimate(int((ranks <= 5).sum()), n, min(1.0, 5 / gallery_size)),
        mean_rank=mean_estimate(ranks.astype(np.float64), "higher is more private"),
        verification_auc=Estimate(
            auc, auc_ci, n, "lower is more private (0.5 = chance)", "pooled, Hanley-McNeil"
        ),
    )


def nearest_similarity(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    *,
    query_patient: np.ndarray | None = None,
    gallery_patient: np.ndarray | None = None,
    k: int = 1,
    device: str = "cpu",
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k highest similarities (B, k) and their gallery rows, searched in blocks.

    With patient arrays given, candidates of the query's own patient are excluded (real-vs-real
    neighbours of different patients).
    """
    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    k = min(k, n_gallery)
    values = np.empty((n_query, k), dtype=np.float32)
    index = np.empty((n_query, k), dtype=np.int64)
    gallery_d = gallery.to(device)
    exclude = query_patient is not None and gallery_patient is not None
    if exclude:
        gallery_p = torch.as_tensor(gallery_patient, device=device)
    step = block_rows(n_gallery, block_elements)
    for start in range(0, n_query, step):
        stop = min(start + step, n_query)
        sims = queries[start:stop].to(device) @ gallery_d.T
        if exclude:
            own = torch.as_tensor(query_patient[start:stop], device=device)
            sims.masked_fill_(own[:, None] == gallery_p[None, :], -math.inf)
        top = torch.topk(sims, k, dim=1)
        values[start:stop] = top.values.cpu().numpy()
        index[start:stop] = top.indices.cpu().numpy()
    return values, index
