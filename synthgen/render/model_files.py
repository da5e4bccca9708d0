"""Where a model's files are: presets, local paths, the Hub cache. No torch, so it is quick.

`synthgen validate` uses it to catch a missing model or LoRA file before any heavy import.
"""

from __future__ import annotations

from pathlib import Path

from synthgen.errors import ModelError
from synthgen.recipe.schema import PRESETS, LoraConfig, ModelConfig, looks_local


def lora_file(lora: LoraConfig) -> Path:
    """The LoRA safetensors file on disk: a local file, a file in a local dir, or the Hub cache."""
    path = Path(lora.path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if lora.weight_name:
            return path / lora.weight_name
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ModelError(
                f"'{lora.path}' holds {len(found)} .safetensors files; set weight_name",
                where="model.lora.weight_name",
            )
        return found[0]
    if looks_local(lora.path):
        raise ModelError(f"'{lora.path}' does not exist", where="model.lora.path")
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(lora.path, lora.weight_name or "pytorch_lora_weights.safetensors")
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types for "not reachable"
        raise ModelError(
            f"cannot fetch LoRA '{lora.path}' ({exc.__class__.__name__}); download it where there "
            "is internet or point model.lora.path at a local .safetensors file",
            where="model.lora.path",
        ) from None


def check_model_reference(config: ModelConfig, file: str | None = None) -> None:
    """Catch a missing local model or LoRA file at validation time, before any loading."""
    if config.base not in PRESETS and looks_local(config.base) and not Path(config.base).is_dir():
        raise ModelError(f"directory '{config.base}' not found", file=file, where="model.base")
    lora = config.lora
    if lora is None or not (looks_local(lora.path) or Path(lora.path).expanduser().exists()):
        return
    try:
        path = lora_file(lora)
    except ModelError as exc:
        raise ModelError(exc.message, file=file, where=exc.where) from None
    if not path.is_file():
        field = "model.lora.weight_name" if lora.weight_name else "model.lora.path"
        raise ModelError(f"LoRA file '{path}' not found", file=file, where=field)
