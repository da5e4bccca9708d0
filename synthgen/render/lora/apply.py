"""Load a LoRA into a pipeline through diffusers and fuse it, with the alpha decided in
`synthgen.render.lora.fit`, then check that every pair landed with that alpha.

Every layout is handed to diffusers in one form: diffusers/PEFT keys (`unet.<module>.lora_A.weight`)
and the LoraConfig as PEFT metadata (rank, alpha and target modules), through the same
`load_lora_into_unet` / `load_lora_into_text_encoder` that `load_lora_weights` calls. So the fused
weights equal diffusers' own on the files it reads (tests/test_lora_layouts.py, to 3e-8).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from synthgen.errors import ModelError
from synthgen.hashing import file_sha256
from synthgen.recipe.schema import LoraConfig
from synthgen.render.lora.base_modules import BaseModules, text_module
from synthgen.render.lora.fit import FittedPair, LoraFit, alpha_warning, check_complete, fit_lora
from synthgen.render.lora.layout import read_lora_file
from synthgen.render.model_files import lora_field, lora_file

ADAPTER = "synthgen"
log = logging.getLogger("synthgen")


@dataclass(frozen=True)
class AppliedLora:
    """What the manifest records about the LoRA that was fused."""

    sha256: str
    layout: str
    rank: int  # the most common rank (every pair's own is used)
    alpha: float  # likewise
    alpha_source: str  # "file: PEFT metadata" | "recipe" | "assumed: …"
    modules: int  # pairs that landed
    warnings: tuple[str, ...]  # alpha assumed, keys dropped: the CLI prints them before a run


def loaded_modules(pipe) -> BaseModules:
    """Every Linear and Conv2d of the UNet and text encoder, by module path."""
    components = {}
    for name in ("unet", "text_encoder"):
        shapes = {}
        for path, module in getattr(pipe, name).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                key = text_module(path) if name == "text_encoder" else path
                shapes[key] = tuple(module.weight.shape)
        components[name] = shapes
    return BaseModules(components, "the loaded model", complete=True)


def _module_path(component, name: str) -> str:
    """The real path of a text-encoder module whose name dropped the `text_model.` prefix."""
    return f"text_model.{name}" if hasattr(component, "text_model") else name


def _pattern(counts: dict[str, float]) -> tuple[float, dict[str, float]]:
    """PEFT's (default, pattern) form of a per-module value: the commonest, and the exceptions."""
    common = Counter(counts.values()).most_common(1)[0][0]
    return common, {f"^{re.escape(m)}$": v for m, v in counts.items() if v != common}


def _load_component(pipe, name: str, pairs: list[FittedPair], tensors: dict) -> None:
    component = getattr(pipe, name)
    paths = {p.module: _module_path(component, p.module) for p in pairs}
    state = {}
    for p in pairs:
        state[f"{name}.{paths[p.module]}.lora_A.weight"] = tensors[p.pair.down]
        state[f"{name}.{paths[p.module]}.lora_B.weight"] = tensors[p.pair.up]
    rank, rank_pattern = _pattern({paths[p.module]: p.pair.rank for p in pairs})
    alpha, alpha_pattern = _pattern({paths[p.module]: p.alpha for p in pairs})
    config = dict(r=rank, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  target_modules=sorted(paths.values()))  # fmt: skip
    metadata = {f"{name}.{key}": value for key, value in config.items()}
    if name == "unet":
        pipe.load_lora_into_unet(state, None, component, adapter_name=ADAPTER, _pipeline=pipe,
                                 metadata=metadata)  # fmt: skip
    else:
        pipe.load_lora_into_text_encoder(state, None, component, adapter_name=ADAPTER,
                                         _pipeline=pipe, metadata=metadata)  # fmt: skip
    for p in pairs:  # every pair must have landed, with the rank and alpha decided for it
        layer = component.get_submodule(paths[p.module])
        landed = ADAPTER in getattr(layer, "lora_A", {})
        if not landed or not math.isclose(layer.scaling[ADAPTER], p.alpha / p.pair.rank):
            raise ModelError(f"diffusers did not load the LoRA into {name}.{p.module}",
                             where="model.lora")  # fmt: skip


def apply_lora(pipe, lora: LoraConfig, *, fuse: bool = True) -> AppliedLora:
    """Load a LoRA in any layout synthgen reads, with its decided alpha, and fuse it."""
    path = lora_file(lora)
    if not path.is_file():
        raise ModelError(f"LoRA file '{path.name}' not found", where=lora_field(lora))
    fit: LoraFit = fit_lora(read_lora_file(path, lora_field(lora)), loaded_modules(pipe), lora)
    warnings = tuple(w for w in (check_complete(fit, lora), alpha_warning(fit)) if w)
    for warning in warnings:
        log.info(warning)  # into a worker's log; `synthgen generate` printed it before the run
    tensors = load_file(str(path))  # its bytes were checked to be safetensors by read_lora_file
    try:
        for name in ("unet", "text_encoder"):
            pairs = [p for p in fit.pairs if p.component == name]
            if pairs:
                _load_component(pipe, name, pairs, tensors)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers and PEFT raise many types on a bad file
        raise ModelError(
            f"'{path.name}' does not load into this model ({exc.__class__.__name__}: {exc})",
            where="model.lora",
        ) from None
    pipe.set_adapters([ADAPTER], adapter_weights=[lora.scale])
    if fuse:
        # Fusing folds the low-rank update into the base weights: no extra matmuls per step.
        pipe.fuse_lora(adapter_names=[ADAPTER], lora_scale=1.0)
        pipe.unload_lora_weights()
    return AppliedLora(file_sha256(path), fit.file.layout, fit.rank, fit.alpha, fit.alpha_source,
                       len(fit.pairs), warnings)  # fmt: skip
