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

Weight files are opened by their bytes (synthgen.weight_files, which says why TorchScript is
acceptable for a model you name as yours and how exported programs are kept from unpickling):
a state dict must be safetensors, a program TorchScript or an exported program without pickles;
a `torch.save` pickle is refused under any name. To convert a pickled state dict you trust:
`safetensors.torch.save_file(torch.load(PATH, weights_only=True), "weights.safetensors")`.

Nothing is ever downloaded. The default embedders are generic: they give a lower bound on
re-identification risk, since an attacker with a network trained on the cohort can do better.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.hashing import file_sha256
from synthgen.weight_files import (
    RefusedWeightFile,
    exported_program,
    program_kind,
    read_safetensors_header,
)

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
    size = size or DEFAULT_NETWORK_SIZE
    if base.startswith("torchvision:"):
        arch, _, weights = base.removeprefix("torchvision:").partition("@")
        model, sha = _load_torchvision(name, arch, weights or None, keep_head)
        return Embedder(name, sha, size, _on_device(model, device), True, device)
    if base.startswith("timm:"):
        arch, _, weights = base.removeprefix("timm:").partition("@")
        model, sha = _load_timm(name, arch, weights or None, keep_head)
        return Embedder(name, sha, size, _on_device(model, device), True, device)
    path = Path(base.removeprefix("torchscript:")).expanduser()
    if path.is_file():
        return _load_program(name, path, size, device)
    if base.startswith("torchscript:") or path.suffix or "/" in base:
        raise AuditError(f"embedder {name!r}: no such file {path}")
    raise AuditError(
        f"unknown embedder {name!r}: use pixels, torchvision:ARCH[@WEIGHTS], "
        "timm:ARCH[@WEIGHTS], or the path of your own TorchScript or exported program"
    )


def _load_program(name: str, path: Path, size: int, device: str) -> Embedder:
    """A user's own model file, told apart by its bytes: TorchScript or an exported program."""
    try:
        kind = program_kind(path)
    except RefusedWeightFile as refused:
        if _is_safetensors(path):
            raise AuditError(
                f"embedder {name!r}: a safetensors file holds weights only; name its "
                f"architecture, e.g. torchvision:resnet18@{path} or timm:ARCH@{path}"
            ) from None
        raise AuditError(
            f"embedder {name!r}: {path} is {refused}; give a TorchScript (torch.jit.save) or "
            "exported (torch.export.save) program, or for a safetensors state dict name its "
            "architecture: torchvision:ARCH@PATH or timm:ARCH@PATH"
        ) from None
    load = _load_torchscript if kind == "torchscript" else _load_exported
    return Embedder(name, file_sha256(path), size, load(name, path, device), False, device)


def _is_safetensors(path: Path) -> bool:
    try:
        read_safetensors_header(path)
    except RefusedWeightFile:
        return False
    return True


def _existing(name: str, path: Path) -> Path:
    if not path.is_file():
        raise AuditError(f"embedder {name!r}: no such file {path}")
    return path


def _on_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    return model.eval().to(device)


def _load_torchscript(name: str, path: Path, device: str) -> torch.nn.Module:
    """Its layout was checked by program_kind; its pickles are read by TorchScript's own
    unpickler, which calls no Python function (synthgen.weight_files says why that is enough)."""
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise AuditError(
            f"embedder {name!r}: {path} does not load as TorchScript ({exc.__class__.__name__}); "
            "save one with torch.jit.save(torch.jit.script(model), path)"
        ) from exc
    return module.eval()


def _load_exported(name: str, path: Path, device: str) -> torch.nn.Module:
    try:
        archive = exported_program(path)  # checked free of pickles; its sample inputs emptied
    except RefusedWeightFile as refused:
        raise AuditError(
            f"embedder {name!r}: {path} is {refused}; synthgen loads an exported program only "
            "when torch would unpickle nothing in it"
        ) from None
    try:
        return torch.export.load(archive).module().to(device)
    except Exception as exc:
        raise AuditError(
            f"embedder {name!r}: {path} is not a torch.export program ({exc.__class__.__name__}); "
            "save one with torch.export.save(torch.export.export(model, (example,), "
            "dynamic_shapes=...), path)"
        ) from exc


def read_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A backbone's state dict, from a file whose bytes are safetensors (never a pickle)."""
    _existing(name, path)
    try:
        read_safetensors_header(path)
    except RefusedWeightFile as refused:
        raise AuditError(
            f"embedder {name!r}: the weights {path} are {refused}; synthgen reads state dicts "
            "only from safetensors files: convert one you trust with safetensors.torch.save_file"
            "(torch.load(PATH, weights_only=True), 'weights.safetensors')"
        ) from None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise AuditError(f"embedder {name!r}: cannot read weights {path}: {exc}") from exc


def _load_torchvision(
    name: str, arch: str, weights: str | None, keep_head: bool
) -> tuple[torch.nn.Module, str]:
    try:
        import torchvision
    except Exception as exc:
        raise AuditError(
            f"embedder {name!r} needs torchvision, which cannot be imported here ({exc}); install "
            "the torchvision that matches your torch, or export the model with torch.jit.save "
            "and pass its path"
        ) from exc
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except Exception as exc:
        raise AuditError(f"embedder {name!r}: torchvision has no model {arch!r}") from exc
    if weights:
        path = Path(weights).expanduser()
    else:
        default = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
        if not path.is_file():
            raise AuditError(
                f"embedder {name!r}: weights are not in the torch hub cache ({path}) and nothing "
                f"is downloaded; fetch them where there is a network, or pass a file: "
                f"torchvision:{arch}@/path/weights.safetensors"
            )
    try:
        model.load_state_dict(read_state_dict(name, path))
    except RuntimeError as exc:
        raise AuditError(f"embedder {name!r}: {path} does not fit {arch}: {exc}") from exc
    if not keep_head:
        for head in ("fc", "classifier", "heads", "head"):
            if hasattr(model, head):
                setattr(model, head, torch.nn.Identity())
                break
    return model, file_sha256(path)


def _load_timm(
    name: str, arch: str, weights: str | None, keep_head: bool
) -> tuple[torch.nn.Module, str]:
    try:
        import timm
    except Exception as exc:
        raise AuditError(
            f"embedder {name!r} needs timm, which cannot be imported here ({exc}); "
            "pip install timm, or export the model to TorchScript and pass its path"
        ) from exc
    try:
        model = timm.create_model(arch, pretrained=False)
    except Exception as exc:
        raise AuditError(f"embedder {name!r}: timm has no model {arch!r}") from exc
    if weights:
        path = Path(weights).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
        if not isinstance(cached, str):
            raise AuditError(
                f"embedder {name!r}: weights are not in the Hugging Face cache and nothing is "
                f"downloaded; pass a file: timm:{arch}@/path/model.safetensors"
            )
        path = Path(cached)
    try:
        model.load_state_dict(read_state_dict(name, path))
    except RuntimeError as exc:
        raise AuditError(f"embedder {name!r}: {path} does not fit {arch}: {exc}") from exc
    if not keep_head:
        model.reset_classifier(0)
    return model, file_sha256(path)
