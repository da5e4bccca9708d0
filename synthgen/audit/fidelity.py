"""Utility side of the audit: pair fidelity, distribution fidelity and label agreement.

Pair fidelity compares each synthetic image with its source as RGB in [0, 1] at the smaller of
their two sizes: the larger image is downsampled (Lanczos), never the smaller one upsampled.
PSNR is capped at 100 dB (identical images). Distribution fidelity uses the audit's embedder as
the feature extractor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from synthgen.audit.reid import (
    Z95,
    Estimate,
    hanley_mcneil_interval,
    mean_estimate,
    nearest_similarity,
    wilson_interval,
)

PSNR_CAP_DB = 100.0
KID_SUBSETS = 25  # torchmetrics uses 100; a quarter of the time, the spread still gives an interval


def to_pair_tensors(
    synthetic: Image.Image, source: Image.Image
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images at the smaller of their two sizes; (3, H, W) float in [0, 1] each."""
    synthetic_rgb, source_rgb = synthetic.convert("RGB"), source.convert("RGB")
    if synthetic_rgb.size != source_rgb.size:
        # Downsample the larger one (antialiased) rather than invent detail by upsampling.
        if synthetic_rgb.size[0] * synthetic_rgb.size[1] > source_rgb.size[0] * source_rgb.size[1]:
            synthetic_rgb = synthetic_rgb.resize(source_rgb.size, Image.Resampling.LANCZOS)
        else:
            source_rgb = source_rgb.resize(synthetic_rgb.size, Image.Resampling.LANCZOS)
    return _chw(synthetic_rgb), _chw(source_rgb)


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def psnr_ssim(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """PSNR (dB) and SSIM per pair; pairs of the same size are scored as one batch."""
    psnr = np.empty(len(pairs), dtype=np.float64)
    ssim = np.empty(len(pairs), dtype=np.float64)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (_, source) in enumerate(pairs):
        by_size.setdefault(tuple(source.shape[1:]), []).append(i)
    for members in by_size.values():
        preds = torch.stack([pairs[i][0] for i in members])
        target = torch.stack([pairs[i][1] for i in members])
        mse = (preds - target).pow(2).flatten(1).mean(1).clamp_min(10 ** (-PSNR_CAP_DB / 10))
        psnr[members] = (-10 * torch.log10(mse)).numpy()
        ssim[members] = ssim_batch(preds, target).numpy()
    return psnr, ssim


@torch.no_grad()
def ssim_batch(
    x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, window: int = 11
) -> torch.Tensor:
    """SSIM of (B, C, H, W) images in [0, 1] (Wang et al. 2004): Gaussian window 11, sigma 1.5,
    K1 = 0.01, K2 = 0.03, mean over the valid region (as scikit-image; torchmetrics also averages
    reflect-padded borders, a difference of ~0.003 at 64 px) and channels. The window shrinks
    (odd) for images smaller than it; under 3 pixels, NaN."""
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2
    if window < 3:
        return torch.full((x.shape[0],), float("nan"))
    # Blurring as products with banded matrices: several times faster than conv2d on a CPU.
    rows, cols = (
        _band(x.shape[-2], window, sigma, x.dtype),
        _band(x.shape[-1], window, sigma, x.dtype),
    )
    maps = torch.stack([x, y, x * x, y * y, x * y])
    mu_x, mu_y, xx, yy, xy = rows.T @ maps @ cols
    var_x = (xx - mu_x**2).clamp_min(0)
    var_y = (yy - mu_y**2).clamp_min(0)
    cov = xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1)


def _band(size: int, window: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """(size, size - window + 1) matrix whose columns are the shifted Gaussian window."""
    offsets = torch.arange(window, dtype=dtype) - window // 2
    gauss = torch.exp(-(offsets**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    band = torch.zeros((size, size - window + 1), dtype=dtype)
    for k in range(window):
        band.diagonal(-k)[:] = gauss[k]
    return band


class LpipsScorer:
    """LPIPS through torchmetrics, only where torchvision and its backbone weights are present."""

    BACKBONE_FILES = {
        "alex": "alexnet-owt-7be5be79.pth",
        "vgg": "vgg16-397923af.pth",
        "squeeze": "squeezenet1_1-b8a52dc0.pth",
    }

    def __init__(self, net: str, device: str):
        self.net, self.device = net, device
        self.reason: str | None = None
        self.metric = None
        try:
            import torchvision  # noqa: F401  # optional: synthgen does not require it, LPIPS does
        except Exception:
            self.reason = "torchvision is not installed; LPIPS needs it and its backbone weights"
            return
        cached = Path(torch.hub.get_dir()) / "checkpoints" / self.BACKBONE_FILES.get(net, "?")
        if not cached.is_file():
            self.reason = f"LPIPS-{net} backbone weights are not in the torch hub cache ({cached})"
            return
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean")
        self.metric = metric.to(device).eval()

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        out = np.empty(len(pairs))
        for i, (synthetic, source) in enumerate(pairs):
            a = (synthetic[None] * 2 - 1).to(self.device)
            b = (source[None] * 2 - 1).to(self.device)
            out[i] = float(self.metric(a, b))
        return out


class RealFeatures:
    """The real side of FID, accumulated once and shared by every group an audit scores.

    The features were made by the audit's embedder once; a pass-through feature module hands them
    to torchmetrics, so no image is embedded twice.
    """

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.fid = FrechetInceptionDistance(
            feature=_PrecomputedFeatures(features.shape[1]), reset_real_features=False
        )
        self.fid.update(features.double(), real=True)


def fid_kid(
    real: RealFeatures, fake: torch.Tensor, seed: int = 0
) -> tuple[Estimate | None, Estimate | None, str | None]:
    """FID and KID of fake against real features through torchmetrics.

    Returns (fid, kid, reason-if-not-computed).
    """
    if real.features.shape[0] < 2 or fake.shape[0] < 2:
        return None, None, "FID and KID need at least 2 real and 2 synthetic images"
    real.fid.reset()  # the synthetic side only: reset_real_features=False keeps the real one
    real.fid.update(fake.double(), real=False)
    fid_value = float(real.fid.compute())
    subset = min(1000, real.features.shape[0], fake.shape[0])
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # it warns that it keeps all features: so do we, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_PrecomputedFeatures(fake.shape[1]), subsets=KID_SUBSETS, subset_size=subset
        )
    kid.update(real.features, real=True)
    kid.update(fake, real=False)
    kid_mean, kid_std = (float(v) for v in kid.compute())
    note = f"features: the audit embedder; n_real={real.features.shape[0]}, n_fake={fake.shape[0]}"
    return (
        Estimate(fid_value, (math.nan, math.nan), fake.shape[0], "lower is closer", note),
        Estimate(
            kid_mean,
            (kid_mean - Z95 * kid_std, kid_mean + Z95 * kid_std),
            fake.shape[0],
            "lower is closer",
            f"{KID_SUBSETS} subsets of {subset}; interval from their spread",
        ),
        None,
    )


class _PrecomputedFeatures(torch.nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class PRDC:
    precision: Estimate
    recall: Estimate
    density: Estimate
    coverage: Estimate


def kth_similarity(points: torch.Tensor, k: int, device: str = "cpu") -> np.ndarray:
    """Similarity of each point to its k-th nearest other point (the edge of its ball)."""
    return nearest_similarity(points, points, k=k + 1, device=device)[0][:, -1]  # +1: itself


def prdc(
    real: torch.Tensor,
    fake: torch.Tensor,
    real_kth: np.ndarray,
    *,
    k: int = 5,
    device: str = "cpu",
) -> PRDC:
    """Precision, recall, density, coverage (Naeem et al. 2020) on normalised embeddings.

    Euclidean balls on the unit sphere are similarity thresholds: d <= r  <=>  s >= s_k.
    `real_kth` is `kth_similarity(real, k)`, computed once for every group sharing the reals.
    """
    fake_kth = kth_similarity(fake, k, device)
    real_thr = torch.as_tensor(real_kth, device=device)
    fake_thr = torch.as_tensor(fake_kth, device=device)
    real_d, fake_d = real.to(device), fake.to(device)
    inside_count = torch.zeros(fake.shape[0], device=device)
    nearest_fake = torch.full((real.shape[0],), -math.inf, device=device)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=device)
    step = max(1, min(4096, (1 << 24) // max(1, real.shape[0])))
    for start in range(0, fake.shape[0], step):
        sims = fake_d[start : start + step] @ real_d.T  # fakes x reals
        inside_count[start : start + step] = (sims >= real_thr[None, :]).sum(1).float()
        nearest_fake = torch.maximum(nearest_fake, sims.max(0).values)
        recalled |= (sims >= fake_thr[start : start + step, None]).any(0)
    n_fake, n_real = fake.shape[0], real.shape[0]
    precise = int((inside_count > 0).sum())
    recalls = int(recalled.sum())
    covered = int((nearest_fake >= real_thr).sum())
    return PRDC(
        precision=_share(precise, n_fake, "higher is closer"),
        recall=_share(recalls, n_real, "higher is closer"),
        density=mean_estimate((inside_count / k).cpu().numpy(), "higher is closer"),
        coverage=_share(covered, n_real, "higher is closer"),
    )


def _share(hits: int, n: int, direction: str) -> Estimate:
    return Estimate(hits / n if n else math.nan, wilson_interval(hits, n), n, direction, "Wilson")


def pearson(x: np.ndarray, y: np.ndarray, direction: str = "higher is better") -> Estimate:
    """Pearson r with a Fisher-z 95% interval."""
    n = len(x)
    if n < 3 or np.std(x) == 0 or np.std(y) == 0:
        return Estimate(math.nan, (math.nan, math.nan), n, direction, "Pearson r")
    r = float(np.corrcoef(x, y)[0, 1])
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = Z95 / math.sqrt(n - 3) if n > 3 else math.inf
    return Estimate(
        r, (math.tanh(z - half), math.tanh(z + half)), n, direction, "Pearson r, Fisher z"
    )


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> Estimate:
    """Mann-Whitney AUC (ties half) with a Hanley-McNeil interval."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return Estimate(math.nan, (math.nan, math.nan), len(scores), "higher is better", "AUC")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2
    ranks[order] = np.repeat(average, counts)
    auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    ci = hanley_mcneil_interval(float(auc), n_pos, n_neg)
    return Estimate(float(auc), ci, len(scores), "higher is better", "AUC, Hanley-McNeil")


def accuracy(predicted: np.ndarray, truth: np.ndarray, direction: str) -> Estimate:
    hits = int((predicted == truth).sum())
    return Estimate(
        hits / len(truth) if len(truth) else math.nan,
        wilson_interval(hits, len(truth)),
        len(truth),
        direction,
        "share, Wilson",
    )


@dataclass(frozen=True)
class LabelHead:
    """Which predictor output columns belong to a label, in the predictor's column order.

    A numeric label takes one column (the predicted value); a categorical label one column per
    class, in `classes` order (logits or probabilities; argmax is the prediction).
    """

    name: str
    kind: str  # "numeric" | "categorical"
    classes: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.classes)


def label_agreement(
    head: LabelHead, truth: Sequence, on_synthetic: np.ndarray, on_source: np.ndarray
) -> dict[str, Estimate]:
    """Agreement of the source label with the predictor on synthetic (and, as reference, source)."""
    if head.kind == "numeric":
        y = np.asarray(truth, dtype=np.float64)
        syn, src = on_synthetic[:, 0], on_source[:, 0]
        return {
            "label_vs_predicted_on_synthetic": pearson(y, syn),
            "label_vs_predicted_on_source": pearson(y, src, "reference: the real images"),
            "predicted_on_source_vs_on_synthetic": pearson(src, syn),
        }
    index = {name: i for i, name in enumerate(head.classes)}
    y = np.asarray([index[str(value)] for value in truth])
    out = {}
    for where, scores in (("synthetic", on_synthetic), ("source", on_source)):
        direction = "higher is better" if where == "synthetic" else "reference: the real images"
        out[f"accuracy_on_{where}"] = accuracy(scores.argmax(1), y, direction)
        out[f"auc_on_{where}"] = _categorical_auc(scores, y)
    out["agreement_source_vs_synthetic"] = accuracy(
        on_synthetic.argmax(1), on_source.argmax(1), "higher is better"
    )
    return out


def _categorical_auc(scores: np.ndarray, y: np.ndarray) -> Estimate:
    if scores.shape[1] == 2:
        return binary_auc(scores[:, 1] - scores[:, 0], y == 1)
    aucs = [binary_auc(scores[:, c], y == c).value for c in range(scores.shape[1])]
    macro = float(np.nanmean(aucs)) if not all(map(math.isnan, aucs)) else math.nan
    return Estimate(
        macro, (math.nan, math.nan), len(y), "higher is better", "macro one-vs-rest AUC"
    )
