"""Image embedders (and predictors) for the audit, loaded offline from a small name syntax.

Names:

    pixels[:SIZE]                 downsampled RGB pixels, SIZE x SIZE (default 16), standardised
                                  per image, so cosine similarity is pixel correlation; no weights
    torchvision:ARCH[@WEIGHTS]    a torchvision model by name (torchvision:resnet50); WEIGHTS is a
                                  safetensors state dict; without it, torchvision's file must be in
                                  the torch hub cache and be safetensors (its own .pth downloads are
                                  pickles: convert them once, see below)
    timm:ARCH[@WEIGHTS]           a timm model by name; without WEIGHTS, its model.safetensors must
                                  already be in the Hugging Face cache
    PATH | torchscript:PATH       your own model: a TorchScript module (torch.jit.save) or a
                                  torch.export program (torch.export.save, with a dynamic batch
                                  dimension), told apart by its bytes, whatever its name; e.g. a
                                  re-identification network trained on your cohort, the strongest
                                  attacker

Any name may end in `?size=N` (network input side, default 224; for pixels, same as `:N`).
Backbones get ImageNet-normalised RGB at N x N and lose their classifier head when used as
embedders (a predictor keeps it). TorchScript and exported modules get float RGB in [0, 1], shape
(B, 3, N, N), and do their own normalisation; they must return (B, D).

Networks are loaded by synthgen.render.networks (the quality gate loads its checks there too),
which opens weight files by their bytes: a state dict must be safetensors, a program TorchScript
or an exported program without pickles; a `torch.save` pickle is refused under any name. To convert a pickled state dict you trust:
`safetensors.torch.save_file(torch.load(PATH, weights_only=True), "weights.safetensors")`.

Nothing is ever downloaded. The default embedders are generic: they give a lower bound on
re-identification risk, since an attacker with a network trained on the cohort can do better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.render import networks
from synthgen.render.networks import NetworkError, load_network

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PIXELS_SIZE = 16  # 768 features: FID's matrix square root stays cheap on a CPU
DEFAULT_NETWORK_SIZE = 224


class AuditError(SynthgenError):
    """The audit cannot run as asked (bad input, an embedder that cannot be loaded offline).

    Defined here, the audit's lowest module, and re-exported by `synthgen.audit.engine`.
    """


@dataclass
class Embedder:
    """Turns PIL images into (B, D) float32 features on the CPU, batch by batch.

    `name` is the name it was loaded from; `weights_sha256` the sha256 of its weights file, or
    "none" when it has no weights.
    """

    name: str
    weights_sha256: str
    size: int
    model: Callable[[torch.Tensor], torch.Tensor]
    normalise_imagenet: bool
    device: str

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to size x size RGB and stack as float (B, 3, S, S) in [0, 1]."""
        arrays = [
            np.asarray(
                image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
            for image in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        if self.normalise_imagenet:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            batch = (batch - mean) / std
        return batch

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.zeros((0, 0), dtype=torch.float32)
        batch = self.to_tensor(images).to(self.device)
        try:
            out = self.model(batch)
        except Exception as exc:  # a user's module failing on our input is a user mistake
            raise AuditError(
                f"{self.name!r} failed on a batch of shape {tuple(batch.shape)}: {exc}; "
                "it must accept float RGB (B, 3, S, S) and return (B, D)"
            ) from exc
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape[0] != batch.shape[0]:
            raise AuditError(f"{self.name!r} must return a (B, D) tensor for a batch of B")
        return out.reshape(out.shape[0], -1).float().cpu()


def _standardised_pixels(batch: torch.Tensor) -> torch.Tensor:
    flat = batch.reshape(batch.shape[0], -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-6)


def _split_options(name: str) -> tuple[str, int | None]:
    base, _, query = name.partition("?")
    size = None
    for option in filter(None, query.split("&")):
        key, _, value = option.partition("=")
        if key != "size" or not value.isdigit() or int(value) < 1:
            raise AuditError(f"embedder {name!r}: unknown option {option!r} (only ?size=N)")
        size = int(value)
    return base, size


def load_embedder(name: str, device: str = "cpu", *, keep_head: bool = False) -> Embedder:
    """Load an embedder (or, with keep_head=True, a predictor) by name; see the module docstring."""
    base, size = _split_options(name.strip())
    if base == "pixels" or base.startswith("pixels:"):
        side = base.partition(":")[2]
        if side and not side.isdigit():
            raise AuditError(f"embedder {name!r}: pixels:SIZE needs an integer SIZE")
        size = size or (int(side) if side else DEFAULT_PIXELS_SIZE)
        return Embedder(name, "none", size, _standardised_pixels, False, device)
    if base.startswith("xrv:"):
        raise AuditError(f"embedder {name!r}: TorchXRayVision models are for the quality gate")
    with _as_audit_error():
        network = load_network(base, device, keep_head=keep_head, noun="embedder")
    return Embedder(name, network.weights_sha256, size or DEFAULT_NETWORK_SIZE, network.module,
                    network.expects == "imagenet", device)  # fmt: skip


def read_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A backbone's state dict, from a file whose bytes are safetensors (never a pickle)."""
    with _as_audit_error():
        return networks.read_state_dict(f"embedder {name!r}", path)


@contextmanager
def _as_audit_error() -> Iterator[None]:
    """The network loader's errors, as the audit's own (the CLI prints them the same way)."""
    try:
        yield
    except NetworkError as error:
        raise AuditError(error.message) from error.__cause__
