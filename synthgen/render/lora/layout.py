"""LoRA files as they exist: the key layout of a file, its low-rank pairs and the alpha it states,
read from the safetensors header alone (torch-free; no weight is loaded).

Layouts read:

| layout | keys | alpha in the file |
|---|---|---|
| diffusers | `unet.<module>.lora_A.weight` / `lora_B` (`save_lora_weights`) | PEFT metadata |
| diffusers, pre-PEFT | `unet.<module>.lora.down.weight`, `….processor.to_q_lora.down.weight` | none |
| attention processors | `down_blocks.….processor.to_k_lora.down.weight` (`unet.save_attn_procs`) | none |
| kohya | `lora_unet_<module_with_underscores>.lora_down.weight`, `lora_te_…` | `.alpha` tensors |
| PEFT folder | `base_model.model.<module>.lora_A.weight` (`save_pretrained`) | adapter_config.json |

A key no layout reads is kept as `unrecognised`: it is counted, never silently dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthgen.errors import ModelError
from synthgen.render.lora.base_modules import text_module
from synthgen.weight_files import RefusedWeightFile, read_safetensors_header, read_scalar

DIFFUSERS = "diffusers (PEFT keys)"
DIFFUSERS_OLD = "diffusers, pre-PEFT (lora.down/lora.up keys)"
ATTN_PROCS = "attention processors (unet.save_attn_procs, no component prefix)"
KOHYA = "kohya (lora_unet_/lora_te_ keys)"
PEFT_FOLDER = "PEFT save_pretrained (adapter_model.safetensors + adapter_config.json)"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors __metadata__
_COMPONENT = {"unet": "unet", "text_encoder": "text_encoder", "te": "text_encoder"}
_PROCESSOR = {  # attention-processor names -> the module they wrap
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_UNET_ROOTS = r"(?:down_blocks|up_blocks|mid_block)\."
# (layout, pattern): groups are component, module, [processor,] part ("A"/"down" | "B"/"up").
_KEY_PATTERNS = [
    (DIFFUSERS, r"(unet|text_encoder)\.(.+)\.lora_([AB])\.weight"),
    (DIFFUSERS_OLD, r"(unet|text_encoder)\.(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight"),
    (DIFFUSERS_OLD, r"(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight"),
    (ATTN_PROCS, rf"()({_UNET_ROOTS}.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight"),
    (ATTN_PROCS, rf"()({_UNET_ROOTS}.+)\.lora_([AB])\.weight"),
    (KOHYA, r"lora_(unet|te)_(.+)\.lora_(down|up)\.weight"),
    (PEFT_FOLDER, r"()base_model\.model\.(.+)\.lora_([AB])\.weight"),
]  # fmt: skip
_ALPHA_PATTERNS = [r"lora_(unet|te)_(.+)\.alpha", r"(unet|text_encoder)\.(.+)\.alpha"]
_UNSUPPORTED = {"dora_scale": "a DoRA adapter", "lora_magnitude_vector": "a DoRA adapter",
                "lokr_": "a LoKr adapter", "hada_": "a LoHa adapter"}  # fmt: skip


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update: `up @ down` added to the weight of `module` in `component`."""

    component: str  # "unet" | "text_encoder"
    module: str  # module path; kohya's has "_" for "." until resolved against the model
    down: str  # key of the (rank, in[, kh, kw]) tensor
    up: str  # key of the (out, rank[, 1, 1]) tensor
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    underscored: bool = False  # kohya names: resolved against the base model's module names

    @property
    def rank(self) -> int:
        return self.down_shape[0]


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layout: str
    pairs: list[LoraPair]
    unrecognised: list[str]  # keys that no layout reads
    file_alpha: dict[tuple[str, str], float] = field(default_factory=dict)  # by (component, module)
    alpha_source: str | None = None  # "PEFT metadata" | ".alpha tensors" | "adapter_config.json"


def _error(message: str, field_name: str = "model.lora") -> ModelError:
    return ModelError(message, where=field_name)


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, module, "down" | "up") of a LoRA weight key, or None."""
    for layout, pattern in _KEY_PATTERNS:
        match = re.fullmatch(pattern, key)
        if not match:
            continue
        groups = match.groups()
        component = _COMPONENT.get(groups[0], "unet")
        module, part = groups[1], groups[-1]
        if len(groups) == 4:  # an attention processor: the module is the projection it wraps
            module = f"{module}.{_PROCESSOR[component][groups[2]]}"
        if layout == PEFT_FOLDER and module.startswith(("text_model.", "encoder.layers.")):
            component = "text_encoder"
        if component == "text_encoder":
            module = text_module(module)
        return layout, component, module, "down" if part in ("A", "down") else "up"
    return None


def _parse_alpha_key(key: str) -> tuple[str, str] | None:
    for pattern in _ALPHA_PATTERNS:
        match = re.fullmatch(pattern, key)
        if match:
            component = _COMPONENT[match.group(1)]
            module = match.group(2)
            return component, text_module(module) if component == "text_encoder" else module
    return None


def read_lora_file(path: Path, field_name: str = "model.lora.path") -> LoraFile:
    """The file's layout, pairs and stated alpha; ModelError if its bytes are not safetensors."""
    try:
        header = read_safetensors_header(path)
    except RefusedWeightFile as refused:
        raise _error(
            f"'{path.name}' is {refused}: synthgen opens weight files only when their bytes are "
            "safetensors, whatever their name; convert it with safetensors.torch.save_file",
            field_name,
        ) from None
    for marker, what in _UNSUPPORTED.items():
        if any(marker in key for key in header.tensors):
            raise _error(f"'{path.name}' is {what}, not a LoRA; synthgen loads LoRA only")
    halves: dict[tuple[str, str], dict[str, str]] = {}
    layouts: Counter[str] = Counter()
    alpha_keys: dict[tuple[str, str], str] = {}
    unrecognised = []
    for key in header.tensors:
        parsed, alpha = _parse_key(key), _parse_alpha_key(key)
        if parsed:
            layout, component, module, part = parsed
            layouts[layout] += 1
            halves.setdefault((component, module), {})[part] = key
        elif alpha:
            alpha_keys[alpha] = key
        else:
            unrecognised.append(key)
    pairs = []
    for (component, module), parts in halves.items():
        if set(parts) != {"down", "up"}:
            unrecognised.extend(parts.values())
            continue
        down, up = header.tensors[parts["down"]], header.tensors[parts["up"]]
        pairs.append(
            LoraPair(component, module, parts["down"], parts["up"], down.shape, up.shape,
                     underscored=parts["down"].startswith("lora_"))
        )  # fmt: skip
    if not pairs:
        raise _error(
            f"'{path.name}' holds no LoRA weights of a layout synthgen reads (diffusers, "
            "attention processors, kohya or a PEFT folder)"
        )
    layout = layouts.most_common(1)[0][0]
    file = LoraFile(path, layout, sorted(pairs, key=lambda p: (p.component, p.module)),
                    sorted(unrecognised))  # fmt: skip
    return _with_file_alpha(file, header, alpha_keys)


def _with_file_alpha(file: LoraFile, header, alpha_keys: dict) -> LoraFile:
    """The alpha the file itself states: kohya scalars, diffusers metadata or a PEFT config."""
    alphas: dict[tuple[str, str], float] = {}
    source = None
    if alpha_keys:
        source = ".alpha tensors"
        for pair in file.pairs:
            key = alpha_keys.get((pair.component, pair.module))
            if key is None:
                continue
            try:
                alphas[(pair.component, pair.module)] = read_scalar(file.path, header, key)
            except RefusedWeightFile as refused:
                raise _error(f"'{file.path.name}': {refused}") from None
    elif METADATA_KEY in header.metadata:
        source = "PEFT metadata"
        configs = _metadata_configs(file.path, header.metadata[METADATA_KEY])
        alphas = _alphas_from_configs(file, configs, source)
    elif file.layout == PEFT_FOLDER and (file.path.parent / PEFT_CONFIG).is_file():
        source = PEFT_CONFIG
        config = _json_object(file.path.parent / PEFT_CONFIG)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise _error(f"{PEFT_CONFIG} is a PEFT {config['peft_type']} adapter, not LoRA")
        alphas = _alphas_from_configs(file, {"unet": config, "text_encoder": config}, source)
    if not alphas:
        return file
    return LoraFile(file.path, file.layout, file.pairs, file.unrecognised, alphas, source)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _error(f"{path.name} beside the LoRA is not readable JSON") from None
    if not isinstance(data, dict):
        raise _error(f"{path.name} beside the LoRA is not a JSON object")
    return data


def _metadata_configs(path: Path, raw: str) -> dict[str, dict[str, Any]]:
    """diffusers packs each component's LoraConfig as `unet.r`, `unet.lora_alpha`, …"""
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise _error(f"'{path.name}' has damaged LoRA metadata ({METADATA_KEY})") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _alphas_from_configs(file: LoraFile, configs: dict, source: str) -> dict:
    alphas = {}
    for pair in file.pairs:
        config = configs.get(pair.component)
        if not config or config.get("lora_alpha") is None:
            continue
        if config.get("use_rslora") or config.get("use_dora"):
            kind = "rsLoRA" if config.get("use_rslora") else "DoRA"
            raise _error(f"'{file.path.name}' is a {kind} adapter ({source}); synthgen loads LoRA")
        rank = _pattern_value(config.get("rank_pattern"), pair.module, config.get("r", pair.rank))
        if rank != pair.rank:
            raise _error(
                f"'{file.path.name}': its {source} says rank {rank} for {pair.module}, but its "
                f"tensors have rank {pair.rank}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), pair.module, config["lora_alpha"])
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise _error(f"'{file.path.name}': its {source} gives alpha {alpha!r}")
        alphas[(pair.component, pair.module)] = float(alpha)
    return alphas
