"""The built-in models' configs as plain dicts, torch-free: `synthgen validate` checks a LoRA's
shapes against them and `synthgen.render.pipeline` builds the random models from them.

`tiny` is a random miniature SD-1.x pipeline (seconds on CPU); `sd14-random` has the configs of
CompVis/stable-diffusion-v1-4 with random weights. Keys a config leaves out take diffusers' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTE_VOCAB = 2 * 256 + 2  # the byte-level tokenizer: 256 bytes, each also as a word end, bos, eos


@dataclass(frozen=True)
class PresetConfig:
    unet: dict[str, Any]  # UNet2DConditionModel keyword arguments
    vae: dict[str, Any]  # AutoencoderKL keyword arguments
    text: dict[str, Any]  # CLIPTextConfig keyword arguments


_SPECIAL_TOKENS = dict(bos_token_id=BYTE_VOCAB - 2, eos_token_id=BYTE_VOCAB - 1,
                       pad_token_id=BYTE_VOCAB - 1)  # fmt: skip

PRESET_CONFIGS = {
    "tiny": PresetConfig(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=4,
            norm_num_groups=16,
        ),
        vae=dict(
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8,
            sample_size=64,
        ),
        text=dict(
            vocab_size=BYTE_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **_SPECIAL_TOKENS,
        ),
    ),  # fmt: skip
    "sd14-random": PresetConfig(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        ),
        text=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            **_SPECIAL_TOKENS,
        ),
    ),  # fmt: skip
}
