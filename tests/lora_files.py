"""Write SD-1.x LoRA files for the tiny model in the layouts found in the wild.

diffusers' layout is written by diffusers itself (`save_lora_weights`, with PEFT metadata when an
alpha is given) and the PEFT folder by PEFT itself (`save_pretrained`); the kohya and the older
attention-processor layouts, whose writers are not installed here, by their key naming.
`render_pair` draws the two seeded images the LoRA tests compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_PROCESSOR_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora",
                    "to_out.0": "to_out_lora"}  # fmt: skip


def _lora_state(model, targets, prefix: str, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.3
            up = torch.randn(module.out_features, rank, generator=generator) * 0.3
            state[f"{prefix}.{name}.lora_A.weight"] = down
            state[f"{prefix}.{name}.lora_B.weight"] = up
    return state


def peft_lora_state(unet, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA matrices on the UNet's attention projections, in diffusers/PEFT naming."""
    return {k: v for k, v in _lora_state(unet, TARGETS, "unet", rank, seed).items() if ".attn" in k}


def text_encoder_lora_state(text_encoder, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random LoRA matrices on the text encoder's attention projections."""
    return _lora_state(text_encoder, TEXT_TARGETS, "text_encoder", rank, seed)


def _component(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def _peft_metadata(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict:
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    return {"r": rank, "lora_alpha": alpha, "target_modules": modules}


def write_peft_layout(
    state: dict[str, torch.Tensor], path: Path, alpha: float | None = None, rank: int | None = None
) -> Path:
    """diffusers' `save_lora_weights` layout: `unet.<module>.lora_A.weight` / `lora_B`; with an
    alpha, the PEFT metadata diffusers ≥ 0.34 writes (`unet_lora_adapter_metadata`) and reads."""
    from diffusers import StableDiffusionPipeline

    layers, metadata = {}, {}
    for prefix in ("unet", "text_encoder"):
        part = _component(state, prefix)
        if part:
            layers[prefix] = part
            if alpha is not None:
                metadata[prefix] = _peft_metadata(part, rank or _rank(part), alpha)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name,
        unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
    )  # fmt: skip
    return path


def _rank(state: dict[str, torch.Tensor]) -> int:
    return next(v.shape[0] for k, v in state.items() if "lora_A" in k)


def write_kohya_layout(
    state: dict[str, torch.Tensor], path: Path, rank: int = 4, alpha: float | None = None
) -> Path:
    """kohya-ss / A1111 layout: `lora_unet_<module_with_underscores>.lora_down.weight` + `.alpha`
    (alpha None: alpha == rank, scale 1, as PEFT)."""
    kohya = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        base = prefix + module.replace(".", "_")
        part = "lora_down" if kind.startswith("A") else "lora_up"
        kohya[f"{base}.{part}.weight"] = tensor.contiguous()
        kohya[f"{base}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    save_file(kohya, str(path))
    return path


def write_attn_procs_layout(state: dict[str, torch.Tensor], path: Path) -> Path:
    """The file `unet.save_attn_procs()` wrote before diffusers moved to PEFT: no `unet.` prefix,
    `…attn1.processor.to_k_lora.down.weight`, no alpha."""
    procs = {}
    for key, tensor in _component(state, "unet").items():
        module, kind = key.rsplit(".lora_", 1)
        target = next(t for t in TARGETS if module.endswith(t))
        block = module[: -len(target) - 1]
        part = "down" if kind.startswith("A") else "up"
        procs[f"{block}.processor.{_PROCESSOR_NAMES[target]}.{part}.weight"] = tensor.contiguous()
    save_file(procs, str(path))
    return path


def write_peft_folder(unet, state: dict[str, torch.Tensor], folder: Path, rank: int, alpha: float):
    """A PEFT `save_pretrained` folder (adapter_model.safetensors + adapter_config.json) of the
    UNet holding exactly `state`, written by PEFT itself."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(unet), LoraConfig(r=rank, lora_alpha=alpha,
                                                           target_modules=TARGETS))  # fmt: skip
    unet_state = _component(state, "unet")
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.copy_(unet_state[f"{name}.lora_A.weight"])
                module.lora_B["default"].weight.copy_(unet_state[f"{name}.lora_B.weight"])
    model.save_pretrained(str(folder))
    return folder


def render_pair(pipe, steps: int = 4) -> np.ndarray:
    """Two 64² images of two fixed prompts on seeds 1 and 2."""
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    return pipe(
        ["retina right eye", "retina left eye"], num_inference_steps=steps, height=64, width=64,
        generator=generators, output_type="np",
    ).images  # fmt: skip
