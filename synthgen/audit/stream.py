"""Streams audit images through the embedder (and predictor) in batches; images are not kept.

Items give a PIL image or a zero-argument loader, so a 10^5-image cohort passes through memory one
batch at a time. Pair fidelity (PSNR, SSIM, LPIPS) is scored on the synthetic batches as they go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from synthgen.audit.embedders import AuditError, Embedder
from synthgen.audit.fidelity import LpipsScorer, psnr_ssim, to_pair_tensors

ImageLike = Image.Image | Callable[[], Image.Image]
BatchHook = Callable[[range, list[Image.Image]], None]


def load_image(image: ImageLike, what: str) -> Image.Image:
    """The image itself, or what its loader returns; `what` names it without a protected id."""
    try:
        loaded = image() if callable(image) else image
    except Exception as exc:
        raise AuditError(f"cannot read the image of {what}: {exc}") from exc
    if not isinstance(loaded, Image.Image):
        raise AuditError(f"the image of {what} is not a PIL image")
    return loaded


@dataclass
class Streamed:
    features: torch.Tensor  # (N, D) float32, the embedder's raw output
    predictions: np.ndarray | None  # (N, W) predictor outputs; NaN rows where not predicted


def embed_stream(
    images: Sequence[tuple[ImageLike, str]],
    embedder: Embedder,
    *,
    batch_size: int,
    desc: str,
    progress: bool,
    predictor: Embedder | None = None,
    predict_rows: np.ndarray | None = None,
    on_batch: BatchHook | None = None,
) -> Streamed:
    """Embed every image; run the predictor on `predict_rows` only; call on_batch per batch."""
    chunks, predictions = [], {}
    wanted = set(predict_rows.tolist()) if predict_rows is not None else set()
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        rows = range(start, min(start + batch_size, len(images)))
        batch = [load_image(*images[row]) for row in rows]
        chunks.append(embedder.embed(batch))
        if predictor is not None and wanted.intersection(rows):
            picked = [row for row in rows if row in wanted]
            outputs = predictor.embed([batch[row - start] for row in picked]).numpy()
            predictions.update(zip(picked, outputs, strict=True))
        if on_batch is not None:
            on_batch(rows, batch)
    features = torch.cat(chunks)
    if predictor is None:
        return Streamed(features, None)
    width = len(next(iter(predictions.values()))) if predictions else 0
    table = np.full((len(images), width), np.nan, dtype=np.float64)
    for row, output in predictions.items():
        table[row] = output
    return Streamed(features, table)


class PairFidelity:
    """A batch hook scoring each synthetic image against its source (read again, one by one).

    `sources_of[row]` is the source image of synthetic row `row`, or None for text-to-image rows.
    """

    def __init__(
        self, sources_of: Sequence[tuple[ImageLike, str] | None], lpips: LpipsScorer | None
    ):
        self.sources_of = sources_of
        self.lpips = lpips if lpips is not None and lpips.metric is not None else None
        self.lpips_reason = "not requested" if lpips is None else lpips.reason
        self.psnr = np.full(len(sources_of), np.nan)
        self.ssim = np.full(len(sources_of), np.nan)
        self.lpips_values = np.full(len(sources_of), np.nan)

    def __call__(self, rows: range, batch: list[Image.Image]) -> None:
        linked = [row for row in rows if self.sources_of[row] is not None]
        pairs = [
            to_pair_tensors(batch[row - rows.start], load_image(*self.sources_of[row]))
            for row in linked
        ]
        if not pairs:
            return
        self.psnr[linked], self.ssim[linked] = psnr_ssim(pairs)
        if self.lpips is not None:
            self.lpips_values[linked] = self.lpips.score(pairs)


@dataclass(frozen=True)
class Embedded:
    """Both sides of an audit after one pass through the embedder; `*_unit` L2-normalised."""

    real: Streamed  # the sources, with predictions on the linked ones
    fake: Streamed  # the synthetic images, with predictions on the image-to-image ones
    pair_scores: PairFidelity  # each image-to-image output against its source
    source_unit: torch.Tensor
    synth_unit: torch.Tensor
    holdout_unit: torch.Tensor | None  # only when text-to-image rows are checked against one
