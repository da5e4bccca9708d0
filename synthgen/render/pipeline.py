"""Pipelines: a Hub id, a local diffusers directory or a built-in preset, plus a fused LoRA
(synthgen.render.lora).

The presets exist because no weights can be downloaded where synthgen is developed: `tiny` is a
random miniature SD-1.x pipeline (seconds on CPU) and `sd14-random` has the real SD-1.4 shapes
with random weights (for speed work). Both go through the same LoRA, scheduler and rendering code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

from synthgen.errors import ModelError
from synthgen.recipe.schema import PRESETS, ModelConfig
from synthgen.render.lora.apply import AppliedLora, apply_lora
from synthgen.render.model_files import check_pipeline_folder
from synthgen.render.presets import BYTE_VOCAB, PRESET_CONFIGS
from synthgen.render.prompt_tokenizer import byte_level_tokenizer

_SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
)


def quiet_libraries() -> None:
    """Diffusers and transformers warn about things users cannot act on (e.g. the safety checker)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # "Loading weights" of a text-encoder LoRA


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _preset_components(name: str) -> dict:
    tokenizer, vocab = byte_level_tokenizer()
    assert vocab == BYTE_VOCAB, "the preset text configs are sized for the byte-level tokenizer"
    preset = PRESET_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random, but the same weights on every machine and run
        return dict(
            unet=UNet2DConditionModel(**preset.unet),
            vae=AutoencoderKL(**preset.vae),
            text_encoder=CLIPTextModel(CLIPTextConfig(**preset.text)),
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**_SD_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
        )


def _load_base(config: ModelConfig, dtype: torch.dtype):
    # after quiet_libraries(): importing diffusers' pipelines logs transformers warnings
    from diffusers import StableDiffusionPipeline

    if config.base in PRESETS:
        return StableDiffusionPipeline(
            **_preset_components(config.base), requires_safety_checker=False
        ).to(dtype=dtype)
    if Path(config.base).is_dir():
        check_pipeline_folder(Path(config.base))  # before diffusers opens any file in it
    try:
        # Medical images trip the NSFW safety checker, which blanks them: it is always off.
        pipe = StableDiffusionPipeline.from_pretrained(
            config.base,
            revision=config.revision,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        hint = (
            "it is neither a local diffusers directory nor in the Hugging Face cache, and the Hub "
            "cannot be reached; download it where there is internet "
            f"(`huggingface-cli download {config.base}`) or point model.base at a local directory"
        )
        if Path(config.base).exists():
            hint = f"the directory is not a loadable diffusers pipeline ({exc})"
        raise ModelError(f"cannot load '{config.base}': {hint}", where="model.base") from None
    return pipe.to(dtype=dtype)


def load_pipeline(
    config: ModelConfig, *, mode: str = "t2i", device: str = "cpu", fuse: bool = True
) -> tuple[object, AppliedLora | None]:
    """The ready-to-run pipeline, and what was fused of its LoRA (None without one)."""
    quiet_libraries()
    from diffusers import StableDiffusionImg2ImgPipeline  # after quiet_libraries(), as above

    pipe = _load_base(config, resolve_dtype(config.dtype, device))
    schedulers = {
        "ddim": DDIMScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    pipe.scheduler = schedulers[config.scheduler].from_config(pipe.scheduler.config)
    lora = apply_lora(pipe, config.lora, fuse=fuse) if config.lora else None
    if mode == "i2i":
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), lora
