"""Write SD-1.x LoRA safetensors files for the tiny model in the two layouts found in the wild."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_lora_state(unet, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA matrices on the UNet's attention projections, in diffusers/PEFT naming."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS):
            if ".attn" not in name:
                continue
            down = torch.randn(rank, module.in_features, generator=generator) * 0.3
            up = torch.randn(module.out_features, rank, generator=generator) * 0.3
            state[f"unet.{name}.lora_A.weight"] = down
            state[f"unet.{name}.lora_B.weight"] = up
    return state


def write_peft_layout(state: dict[str, torch.Tensor], path: Path) -> Path:
    """diffusers' `save_lora_weights` layout: `unet.<module>.lora_A.weight` / `lora_B`."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_kohya_layout(state: dict[str, torch.Tensor], path: Path, rank: int = 4) -> Path:
    """kohya-ss / A1111 layout: `lora_unet_<module_with_underscores>.lora_down.weight` + alpha."""
    kohya = {}
    for key, tensor in state.items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        part = "lora_down" if kind.startswith("A") else "lora_up"
        kohya[f"{base}.{part}.weight"] = tensor.contiguous()
        kohya[f"{base}.alpha"] = torch.tensor(float(rank))  # alpha == rank: scale 1, as in PEFT
    save_file(kohya, str(path))
    return path
