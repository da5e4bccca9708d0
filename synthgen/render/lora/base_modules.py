"""The layers of a base model a LoRA can land on, with their shapes: from the loaded model (every
Linear and Conv2d) or, torch-free for `synthgen validate`, from its `config.json` files.

From a config only the layers LoRAs are trained on are derived: every layer of the UNet's
transformer blocks (proj_in/proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj,
ff.net.2) and of the CLIP text encoder (q/k/v/out_proj, fc1, fc2). A LoRA module elsewhere in the
UNet (resnets, time embedding) is then "not checked" until the model is loaded, where every layer is.
Text-encoder module names drop transformers' older `text_model.` prefix everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from synthgen.recipe.schema import PRESETS, ModelConfig, looks_local
from synthgen.render.presets import PRESET_CONFIGS

Shape = tuple[int, ...]  # (out, in) for a Linear, (out, in, kh, kw) for a Conv2d
# UNet2DConditionModel's defaults (diffusers), for configs that leave keys out.
_UNET_DEFAULTS: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
}


@dataclass(frozen=True)
class BaseModules:
    """component ("unet", "text_encoder") -> module path -> weight shape."""

    components: dict[str, dict[str, Shape]]
    source: str  # what the shapes were read from, for messages
    complete: bool  # every layer (a loaded model), or only those a config describes

    def covers(self, component: str, module: str) -> bool:
        """Whether a module missing from `components` is really missing from the model."""
        return self.complete or component == "text_encoder" or "attentions" in module


def text_module(name: str) -> str:
    """A text-encoder module path without transformers' older `text_model.` prefix."""
    return name.removeprefix("text_model.").removeprefix("text_model_")


def _per_block(value: Any, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def _transformer_layers(prefix: str, channels: int, context: int, depth: int, linear: bool):
    projection: Shape = (channels, channels) if linear else (channels, channels, 1, 1)
    yield f"{prefix}.proj_in", projection
    yield f"{prefix}.proj_out", projection
    for k in range(depth):
        block = f"{prefix}.transformer_blocks.{k}"
        for attn, source in (("attn1", channels), ("attn2", context)):
            yield f"{block}.{attn}.to_q", (channels, channels)
            yield f"{block}.{attn}.to_k", (channels, source)
            yield f"{block}.{attn}.to_v", (channels, source)
            yield f"{block}.{attn}.to_out.0", (channels, channels)
        yield f"{block}.ff.net.0.proj", (channels * 8, channels)  # GEGLU: two halves of 4 × inner
        yield f"{block}.ff.net.2", (channels, channels * 4)


def unet_layers(config: dict[str, Any]) -> dict[str, Shape]:
    """The transformer-block layers of an SD-1.x-style UNet2DConditionModel config."""
    cfg = {**_UNET_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    channels = list(cfg["block_out_channels"])
    blocks = len(channels)
    layers = _per_block(cfg["layers_per_block"], blocks)
    context = _per_block(cfg["cross_attention_dim"], blocks)
    depth = _per_block(cfg["transformer_layers_per_block"], blocks)
    linear = bool(cfg["use_linear_projection"])
    found: dict[str, Shape] = {}

    def add(items: Iterator[tuple[str, Shape]]) -> None:
        found.update(items)

    for i, kind in enumerate(cfg["down_block_types"]):
        if kind.startswith("CrossAttn"):
            for j in range(layers[i]):
                add(_transformer_layers(f"down_blocks.{i}.attentions.{j}", channels[i], context[i],
                                        depth[i], linear))  # fmt: skip
    if cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn":
        add(_transformer_layers("mid_block.attentions.0", channels[-1], context[-1], depth[-1],
                                linear))  # fmt: skip
    rev_channels, rev_layers = channels[::-1], layers[::-1]
    rev_context, rev_depth = context[::-1], depth[::-1]
    for i, kind in enumerate(cfg["up_block_types"]):
        if kind.startswith("CrossAttn"):
            for j in range(rev_layers[i] + 1):
                add(_transformer_layers(f"up_blocks.{i}.attentions.{j}", rev_channels[i],
                                        rev_context[i], rev_depth[i], linear))  # fmt: skip
    return found


def text_layers(config: dict[str, Any]) -> dict[str, Shape]:
    """The linear layers of a CLIP text encoder config."""
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    found: dict[str, Shape] = {}
    for i in range(int(config["num_hidden_layers"])):
        layer = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            found[f"{layer}.self_attn.{proj}"] = (hidden, hidden)
        found[f"{layer}.mlp.fc1"] = (inner, hidden)
        found[f"{layer}.mlp.fc2"] = (hidden, inner)
    return found


def _read_config(path: Path | str | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _component_configs(config: ModelConfig) -> tuple[dict | None, dict | None, str]:
    if config.base in PRESETS:
        preset = PRESET_CONFIGS[config.base]
        return preset.unet, preset.text, f"the {config.base} preset's configs"
    if looks_local(config.base) or Path(config.base).is_dir():
        folder = Path(config.base)
        unet, text = folder / "unet" / "config.json", folder / "text_encoder" / "config.json"
        where = "unet/config.json and text_encoder/config.json of model.base"
        return _read_config(unet), _read_config(text), where

    def cached(name: str) -> str | None:
        found = try_to_load_from_cache(config.base, name, revision=config.revision)
        return found if isinstance(found, str) else None

    unet, text = cached("unet/config.json"), cached("text_encoder/config.json")
    return _read_config(unet), _read_config(text), f"the cached configs of {config.base}"


def modules_from_config(config: ModelConfig) -> BaseModules | None:
    """The base model's LoRA-able layers from its configs, or None where they cannot be read
    without a download."""
    unet, text, source = _component_configs(config)
    if unet is None:
        return None
    try:
        components = {"unet": unet_layers(unet)}
        if text is not None:
            components["text_encoder"] = text_layers(text)
    except (KeyError, TypeError, ValueError, IndexError):
        return None  # a config of another architecture: the check happens when the model loads
    return BaseModules(components, source, complete=False)
