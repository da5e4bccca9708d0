"""The quality gate's models: each check's network, fed its preprocessing, judging a batch of
images against the labels their samples asked for.

A gate sees an image as it is stored (a grayscale dataset's one channel, else RGB), so running the
checks again over a finished dataset (`synthgen gate`) reproduces the in-run predictions. Batches
are padded to one size, as the renderer's are, so a prediction does not depend on its batch-mates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from synthgen.errors import ModelError
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.quality import BoundCheck, Preprocess, bind_checks
from synthgen.recipe.quality_stats import ImageVerdict
from synthgen.recipe.schema import Recipe
from synthgen.render.networks import Network, NetworkError, load_network

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


def model_field(check: str) -> str:
    return f"quality.checks.{check}.model"


def to_model_input(images: Sequence[Image.Image], preprocess: Preprocess, device: str):
    """(B, C, S, S) float32 on `device`: resized with antialiasing, luma or RGB, normalised."""
    arrays = [np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
              for image in images]  # fmt: skip
    x = torch.from_numpy(np.stack(arrays)).to(device)
    x = (x.unsqueeze(-1) if x.ndim == 3 else x).permute(0, 3, 1, 2).float() / 255.0
    if preprocess.grayscale and x.shape[1] == 3:
        x = (x * torch.tensor(LUMA, device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif not preprocess.grayscale and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = preprocess.size
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                          antialias=True)  # fmt: skip
    if preprocess.normalise == "imagenet":
        channels = x.shape[1]
        mean = torch.tensor(IMAGENET_MEAN[:channels] if channels == 3 else (0.449,), device=device)
        std = torch.tensor(IMAGENET_STD[:channels] if channels == 3 else (0.226,), device=device)
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    elif preprocess.normalise == "xrv":
        x = x * 2048.0 - 1024.0  # TorchXRayVision's range for 8-bit images
    return x.contiguous()


@dataclass
class LoadedCheck:
    check: BoundCheck
    network: Network

    def outputs(self, images: Sequence[Image.Image], device: str) -> np.ndarray:
        """(B, W) float64 model outputs."""
        batch = to_model_input(images, self.check.preprocess, device)
        with torch.inference_mode():
            out = self.network.module(batch)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape[0] != batch.shape[0]:
            raise ModelError(
                f"returns {type(out).__name__}, not a (B, outputs) tensor for a batch of "
                f"{batch.shape[0]}",
                where=model_field(self.check.name),
            )
        return out.reshape(out.shape[0], -1).double().cpu().numpy()


class Gate:
    """Every check of a recipe, loaded on one device. `seconds` adds up the time spent judging."""

    def __init__(
        self, checks: Sequence[LoadedCheck], batch_size: int, device: str, grayscale: bool
    ):
        self.checks = list(checks)
        self.batch_size = batch_size
        self.device = device
        self.grayscale = grayscale  # the dataset stores one channel: judge what it stores
        self.seconds = 0.0

    @classmethod
    def load(cls, recipe: Recipe, device: str = "cpu") -> Gate:
        """Load every check's model and run it once: a model that cannot be loaded, or whose
        outputs do not fit its labels, is a ModelError naming its recipe field."""
        loaded = []
        for check in bind_checks(recipe.quality, recipe.labels):  # type: ignore[arg-type]
            try:
                network = load_network(check.model, device, keep_head=True)
            except NetworkError as error:
                raise ModelError(error.message, where=model_field(check.name)) from None
            one = LoadedCheck(check, network)
            side = check.preprocess.size
            trial = Image.new("L" if check.preprocess.grayscale else "RGB", (side, side))
            try:
                width = one.outputs([trial], device).shape[1]
            except ModelError:
                raise
            except Exception as exc:  # a user's module failing on the input it was promised
                raise ModelError(
                    f"fails on a ({'1' if check.preprocess.grayscale else '3'}, {side}, {side}) "
                    f"input ({exc.__class__.__name__}: {exc}); set the check's preprocess to "
                    "what the model takes",
                    where=model_field(check.name),
                ) from None
            problem = check.width_problem(width)
            if problem:
                raise ModelError(problem, where=model_field(check.name))
            loaded.append(one)
        return cls(loaded, recipe.generation.batch_size, device, recipe.output.grayscale)

    @property
    def weights(self) -> dict[str, str]:
        """Each check's model file sha256 (the accepted images depend on them)."""
        return {c.check.name: c.network.weights_sha256 for c in self.checks}

    def judge(
        self, asked: Sequence[Mapping[str, LabelValue]], images: Sequence[Image.Image]
    ) -> list[ImageVerdict]:
        """Each image's verdict against the labels asked for it, batch by padded batch."""
        started = time.perf_counter()
        verdicts: list[ImageVerdict] = []
        for start in range(0, len(images), self.batch_size):
            part = [self._as_stored(image) for image in images[start : start + self.batch_size]]
            labels = list(asked[start : start + self.batch_size])
            padded = part + part[-1:] * (self.batch_size - len(part))
            verdicts += self._judge_batch(padded, labels)
        self.seconds += time.perf_counter() - started
        return verdicts

    def _as_stored(self, image: Image.Image) -> Image.Image:
        return image.convert("L") if self.grayscale and image.mode != "L" else image

    def _judge_batch(
        self, images: list[Image.Image], labels: list[Mapping[str, LabelValue]]
    ) -> list[ImageVerdict]:
        verdicts: list[ImageVerdict] = [{} for _ in labels]
        for loaded in self.checks:
            outputs = loaded.outputs(images, self.device)[: len(labels)]
            for rule in loaded.check.rules:
                judged = rule.judge(outputs, [values[rule.label] for values in labels])
                for verdict, label_verdict in zip(verdicts, judged):
                    verdict.setdefault(loaded.check.name, {})[rule.label] = label_verdict
        return verdicts
