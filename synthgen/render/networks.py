"""A user's own network, loaded offline from a small name syntax: the audit's embedders and
predictors and the quality gate's checks load through here.

    PATH | torchscript:PATH       a TorchScript module (torch.jit.save) or a torch.export program
                                  (torch.export.save, with a dynamic batch dimension), told apart
                                  by its bytes, whatever its name
    torchvision:ARCH[@WEIGHTS]    a torchvision model by name; WEIGHTS is a safetensors state dict;
                                  without it, torchvision's file must be in the torch hub cache and
                                  be safetensors (its own .pth downloads are pickles)
    timm:ARCH[@WEIGHTS]           a timm model by name; without WEIGHTS, its model.safetensors must
                                  already be in the Hugging Face cache
    xrv:NAME@WEIGHTS              a TorchXRayVision DenseNet by its weights name
                                  (densenet121-res224-all, …) with a safetensors state dict: the
                                  package's own weight files are pickles, never opened

Weight files are opened by their bytes (synthgen.weight_files, which says why TorchScript is
acceptable for a model the user names as theirs and how exported programs are kept from
unpickling): a state dict must be safetensors, a program TorchScript or an exported program
without pickles; a `torch.save` pickle is refused under any name. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file

from synthgen.errors import SynthgenError
from synthgen.hashing import file_sha256
from synthgen.weight_files import (
    RefusedWeightFile,
    exported_program,
    program_kind,
    read_safetensors_header,
)

Expects = Literal["unit", "imagenet", "xrv"]  # the input a network of this kind was trained on


class NetworkError(SynthgenError):
    """A network cannot be loaded as named; callers re-raise it as their own error type or with
    the recipe field that named it."""


@dataclass(frozen=True)
class Network:
    """A loaded network in eval mode on its device. `expects` is how its input is normalised
    when nobody says otherwise: programs take [0, 1], named backbones ImageNet statistics."""

    module: torch.nn.Module
    weights_sha256: str
    expects: Expects


def load_network(name: str, device: str, *, keep_head: bool, noun: str = "model") -> Network:
    """Load `name` (the module docstring's syntax); messages begin `{noun} 'NAME'`.
    `keep_head=False` swaps a named backbone's classifier for the identity (an embedder)."""
    label = f"{noun} {name!r}"
    for prefix, load in (("torchvision:", _load_torchvision), ("timm:", _load_timm),
                         ("xrv:", _load_xrv)):  # fmt: skip
        if name.startswith(prefix):
            arch, _, weights = name.removeprefix(prefix).partition("@")
            model, sha = load(label, arch, weights or None, keep_head)
            expects: Expects = "xrv" if prefix == "xrv:" else "imagenet"
            return Network(model.eval().to(device), sha, expects)
    path = Path(name.removeprefix("torchscript:")).expanduser()
    if path.is_file():
        return _load_program(label, path, device)
    if name.startswith("torchscript:") or path.suffix or "/" in name:
        raise NetworkError(f"{label}: no such file {path}")
    raise NetworkError(
        f"unknown {noun} {name!r}: use torchvision:ARCH[@WEIGHTS], timm:ARCH[@WEIGHTS], "
        "xrv:NAME@WEIGHTS, or the path of your own TorchScript or exported program"
    )


def _load_program(label: str, path: Path, device: str) -> Network:
    """A user's own model file, told apart by its bytes: TorchScript or an exported program."""
    try:
        kind = program_kind(path)
    except RefusedWeightFile as refused:
        if _is_safetensors(path):
            raise NetworkError(
                f"{label}: a safetensors file holds weights only; name its architecture, e.g. "
                f"torchvision:resnet18@{path} or timm:ARCH@{path}"
            ) from None
        raise NetworkError(
            f"{label}: {path} is {refused}; give a TorchScript (torch.jit.save) or exported "
            "(torch.export.save) program, or for a safetensors state dict name its "
            "architecture: torchvision:ARCH@PATH or timm:ARCH@PATH"
        ) from None
    load = _load_torchscript if kind == "torchscript" else _load_exported
    return Network(load(label, path, device), file_sha256(path), "unit")


def _is_safetensors(path: Path) -> bool:
    try:
        read_safetensors_header(path)
    except RefusedWeightFile:
        return False
    return True


def _load_torchscript(label: str, path: Path, device: str) -> torch.nn.Module:
    """Its layout was checked by program_kind; its pickles are read by TorchScript's own
    unpickler, which calls no Python function (synthgen.weight_files says why that is enough)."""
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise NetworkError(
            f"{label}: {path} does not load as TorchScript ({exc.__class__.__name__}); "
            "save one with torch.jit.save(torch.jit.script(model), path)"
        ) from exc
    return module.eval()


def _load_exported(label: str, path: Path, device: str) -> torch.nn.Module:
    try:
        archive = exported_program(path)  # checked free of pickles; its sample inputs emptied
    except RefusedWeightFile as refused:
        raise NetworkError(
            f"{label}: {path} is {refused}; synthgen loads an exported program only when torch "
            "would unpickle nothing in it"
        ) from None
    try:
        return torch.export.load(archive).module().to(device)
    except Exception as exc:
        raise NetworkError(
            f"{label}: {path} is not a torch.export program ({exc.__class__.__name__}); save one "
            "with torch.export.save(torch.export.export(model, (example,), dynamic_shapes=...), "
            "path)"
        ) from exc


def read_state_dict(label: str, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, from a file whose bytes are safetensors (never a pickle)."""
    if not path.is_file():
        raise NetworkError(f"{label}: no such file {path}")
    try:
        read_safetensors_header(path)
    except RefusedWeightFile as refused:
        raise NetworkError(
            f"{label}: the weights {path} are {refused}; synthgen reads state dicts only from "
            "safetensors files: convert one you trust with safetensors.torch.save_file"
            "(torch.load(PATH, weights_only=True), 'weights.safetensors')"
        ) from None
    try:
        return load_file(str(path))
    except Exception as exc:
        raise NetworkError(f"{label}: cannot read weights {path}: {exc}") from exc


def _fit(label: str, model: torch.nn.Module, arch: str, path: Path) -> str:
    try:
        model.load_state_dict(read_state_dict(label, path))
    except RuntimeError as exc:
        raise NetworkError(f"{label}: {path} does not fit {arch}: {exc}") from exc
    return file_sha256(path)


def _optional_package(label: str, package: str, instead: str):
    """A package synthgen does not depend on, imported only when a network name needs it;
    `instead` tells the user how to install it or do without it."""
    try:
        return importlib.import_module(package)
    except Exception as exc:
        raise NetworkError(
            f"{label} needs {package}, which cannot be imported here ({exc}); {instead}"
        ) from exc


def _load_torchvision(
    label: str, arch: str, weights: str | None, keep_head: bool
) -> tuple[torch.nn.Module, str]:
    torchvision = _optional_package(
        label,
        "torchvision",
        "install the torchvision that matches your torch, or export the model with "
        "torch.jit.save and pass its path",
    )
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except Exception as exc:
        raise NetworkError(f"{label}: torchvision has no model {arch!r}") from exc
    if weights:
        path = Path(weights).expanduser()
    else:
        default = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
        if not path.is_file():
            raise NetworkError(
                f"{label}: weights are not in the torch hub cache ({path}) and nothing is "
                f"downloaded; fetch them where there is a network, or pass a file: "
                f"torchvision:{arch}@/path/weights.safetensors"
            )
    sha = _fit(label, model, arch, path)
    if not keep_head:
        for head in ("fc", "classifier", "heads", "head"):
            if hasattr(model, head):
                setattr(model, head, torch.nn.Identity())
                break
    return model, sha


def _load_timm(
    label: str, arch: str, weights: str | None, keep_head: bool
) -> tuple[torch.nn.Module, str]:
    timm = _optional_package(
        label, "timm", "pip install timm, or export the model to TorchScript and pass its path"
    )
    try:
        model = timm.create_model(arch, pretrained=False)
    except Exception as exc:
        raise NetworkError(f"{label}: timm has no model {arch!r}") from exc
    if weights:
        path = Path(weights).expanduser()
    else:
        hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
        if not isinstance(cached, str):
            raise NetworkError(
                f"{label}: weights are not in the Hugging Face cache and nothing is downloaded; "
                f"pass a file: timm:{arch}@/path/model.safetensors"
            )
        path = Path(cached)
    sha = _fit(label, model, arch, path)
    if not keep_head:
        model.reset_classifier(0)
    return model, sha


def _load_xrv(
    label: str, arch: str, weights: str | None, keep_head: bool
) -> tuple[torch.nn.Module, str]:
    """A TorchXRayVision DenseNet built by its weights name (its output columns are that name's
    pathologies, in the package's order), with the calibration (`op_threshs`) the package
    applies to those weights, and its state dict from a safetensors file."""
    xrv = _optional_package(
        label,
        "torchxrayvision",
        "pip install torchxrayvision, or save the model with torch.jit.save and give its path",
    )
    if not weights:
        raise NetworkError(
            f"{label}: TorchXRayVision's own weight files are pickles, which synthgen never "
            "opens; convert them once where you trust them: safetensors.torch.save_file("
            f"xrv.models.get_model('{arch}').state_dict(), 'w.safetensors'), then name "
            f"xrv:{arch}@w.safetensors"
        )
    known = getattr(xrv.models, "model_urls", {})
    if arch not in known or "densenet" not in arch:
        names = ", ".join(n for n in known if "densenet" in n) or "none"
        raise NetworkError(f"{label}: {arch!r} is not a TorchXRayVision DenseNet ({names})")
    info = known[arch]
    model = xrv.models.DenseNet(weights=None, num_classes=len(info["labels"]))
    model.op_threshs = info.get("op_threshs")
    model.pathologies = list(info["labels"])
    return model, _fit(label, model, arch, Path(weights).expanduser())
