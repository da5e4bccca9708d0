"""Pipelines: a Hub id, a local diffusers directory or a built-in preset, plus a fused LoRA.

The presets exist because no weights can be downloaded where synthgen is developed: `tiny` is a
random miniature SD-1.x pipeline (seconds on CPU) and `sd14-random` has the real SD-1.4 shapes
with random weights (for speed work). Both go through the same LoRA, scheduler and rendering code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from synthgen.errors import ModelError
from synthgen.hashing import file_sha256
from synthgen.recipe.schema import LoraConfig, ModelConfig
from synthgen.render.model_files import PRESETS, lora_file

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
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _byte_level_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over single bytes: no vocabulary download needed, any text encodes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder = _cache_dir() / "byte-level-clip-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        config = {"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder), len(tokens)


def _cache_dir() -> Path:
    return Path(os.environ.get("SYNTHGEN_CACHE", Path.home() / ".cache" / "synthgen"))


def _preset_components(name: str) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = _byte_level_tokenizer()
    if name == "tiny":
        text = CLIPTextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
            eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        )  # fmt: skip
        unet = dict(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
            norm_num_groups=16,
        )  # fmt: skip
        vae = dict(
            block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8, sample_size=64,
        )  # fmt: skip
    else:  # sd14-random: the configs of CompVis/stable-diffusion-v1-4
        text = CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )  # fmt: skip
        unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random, but the same weights on every machine and run
        return dict(
            unet=UNet2DConditionModel(**unet),
            vae=AutoencoderKL(**vae),
            text_encoder=CLIPTextModel(text),
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**_SD_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
        )


def _load_base(config: ModelConfig, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if config.base in PRESETS:
        return StableDiffusionPipeline(
            **_preset_components(config.base), requires_safety_checker=False
        ).to(dtype=dtype)
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


def apply_lora(pipe, lora: LoraConfig, *, fuse: bool = True) -> str:
    """Load a LoRA (diffusers/PEFT or kohya key layout) and fuse it; return the file's sha256."""
    path = lora_file(lora)
    if not path.is_file():
        raise ModelError(f"LoRA file '{path.name}' not found", where="model.lora.weight_name")
    try:
        pipe.load_lora_weights(str(path), adapter_name="synthgen")
    except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/KeyError/RuntimeError
        raise ModelError(
            f"'{path.name}' is not an SD-1.x LoRA this model accepts ({exc})", where="model.lora"
        ) from None
    pipe.set_adapters(["synthgen"], adapter_weights=[lora.scale])
    if fuse:
        # Fusing folds the low-rank update into the base weights: no extra matmuls per step.
        pipe.fuse_lora(adapter_names=["synthgen"], lora_scale=1.0)
        pipe.unload_lora_weights()
    return file_sha256(path)


def load_pipeline(
    config: ModelConfig, *, mode: str = "t2i", device: str = "cpu", fuse: bool = True
) -> tuple:
    """The ready-to-run pipeline, and the sha256 of its LoRA file (None without one)."""
    quiet_libraries()
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
    )

    pipe = _load_base(config, resolve_dtype(config.dtype, device))
    schedulers = {
        "ddim": DDIMScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    pipe.scheduler = schedulers[config.scheduler].from_config(pipe.scheduler.config)
    lora_sha = apply_lora(pipe, config.lora, fuse=fuse) if config.lora else None
    if mode == "i2i":
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), lora_sha
