"""Where a model's files are: presets, local paths, the Hub cache. No torch, so it is quick.

`synthgen validate` uses it to catch a missing model or LoRA file, or a weight file that is not
safetensors by its bytes, before any heavy import.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache

from synthgen.errors import ModelError
from synthgen.recipe.schema import PRESETS, LoraConfig, ModelConfig, looks_local
from synthgen.weight_files import RefusedWeightFile, read_safetensors_header, what_it_is

DEFAULT_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Components synthgen never loads (the pipeline is built with safety_checker=None).
_NOT_LOADED = ("safety_checker",)


def lora_field(lora: LoraConfig) -> str:
    """The recipe field that names the LoRA file, for messages about the file."""
    return "model.lora.weight_name" if lora.weight_name else "model.lora.path"


def lora_file(lora: LoraConfig) -> Path:
    """The LoRA file on disk: a local file, a file in a local dir, or the Hub cache (downloading).

    A PEFT `save_pretrained` folder's adapter_config.json is fetched beside its weights."""
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
    name = lora.weight_name or DEFAULT_LORA_NAME
    try:
        downloaded = Path(hf_hub_download(lora.path, name))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types for "not reachable"
        raise ModelError(
            f"cannot fetch LoRA '{lora.path}' ({exc.__class__.__name__}); download it where there "
            "is internet or point model.lora.path at a local .safetensors file",
            where="model.lora.path",
        ) from None
    if downloaded.name == PEFT_WEIGHTS:
        try:
            hf_hub_download(lora.path, str(Path(name).with_name(PEFT_CONFIG)))
        except Exception:  # noqa: BLE001 - a PEFT folder without its config states no alpha
            pass
    return downloaded


def local_lora_file(lora: LoraConfig) -> Path | None:
    """The LoRA file if it is on disk already (local, or in the Hub cache); never downloads."""
    if looks_local(lora.path) or Path(lora.path).expanduser().exists():
        return lora_file(lora)
    cached = try_to_load_from_cache(lora.path, lora.weight_name or DEFAULT_LORA_NAME)
    return Path(cached) if isinstance(cached, str) else None


def _refuse(component: str, name: str, found: str) -> ModelError:
    return ModelError(
        f"'{component}/{name}' is {found}: synthgen loads model weights only from files whose "
        "bytes are safetensors, whatever their name; convert the component "
        "(save_pretrained(..., safe_serialization=True))",
        where="model.base",
    )


def _loaded_components(folder: Path) -> list[str]:
    """The component folders from_pretrained loads weights from: those with a model config.json."""
    index = folder / "model_index.json"
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(
            f"'{folder}' is not a diffusers pipeline directory (no readable model_index.json)",
            where="model.base",
        ) from None
    if not isinstance(entries, dict):
        raise ModelError(f"'{folder}': model_index.json is not a JSON object", where="model.base")
    return [
        name
        for name in entries
        if not name.startswith("_") and name not in _NOT_LOADED
        and (folder / name / "config.json").is_file()
    ]  # fmt: skip


def check_pipeline_folder(folder: Path) -> None:
    """Refuse a local diffusers folder unless every weight file diffusers and transformers open in
    it is safetensors by its bytes.

    With use_safetensors=True they open only `*.safetensors` files (sharded ones through their
    index; tests/test_weight_files.py plants pickles under every other name to show it), so each
    of those is checked, and a `.bin` beside them stays unopened. A component with no safetensors
    weights is refused, naming what it holds instead."""
    for component in _loaded_components(folder):
        files = sorted(p for p in (folder / component).iterdir() if p.is_file())
        weights = [p for p in files if p.name.endswith(".safetensors")]
        for path in weights:
            try:
                read_safetensors_header(path)
            except RefusedWeightFile as refused:
                raise _refuse(component, path.name, str(refused)) from None
        if not weights:
            others = [p for p in files if not p.name.endswith(".json")]
            found = what_it_is(others[0]) if others else "missing"
            name = others[0].name if others else "diffusion_pytorch_model.safetensors"
            raise _refuse(component, name, found)


def check_model_reference(config: ModelConfig, file: str | None = None) -> None:
    """Catch a missing local model or LoRA file, or a local model whose weights are not
    safetensors, at validation time, before any loading."""
    try:
        if config.base not in PRESETS and (looks_local(config.base) or Path(config.base).is_dir()):
            if not Path(config.base).is_dir():
                raise ModelError(f"directory '{config.base}' not found", where="model.base")
            check_pipeline_folder(Path(config.base))
        lora = config.lora
        if lora is None or not (looks_local(lora.path) or Path(lora.path).expanduser().exists()):
            return
        path = lora_file(lora)
        if not path.is_file():
            raise ModelError(f"LoRA file '{path}' not found", where=lora_field(lora))
    except ModelError as exc:
        raise ModelError(exc.message, file=file, where=exc.where) from None
