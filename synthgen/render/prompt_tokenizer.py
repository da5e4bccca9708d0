"""The model's prompt tokenizer, without its weights: the presets' byte-level CLIP tokenizer, a
local pipeline folder's `tokenizer/`, or a Hub model's from the cache (never downloaded).

No torch: `validate` and `sample` count prompt tokens with it (synthgen.recipe.prompt_length).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from synthgen.recipe.schema import PRESETS, ModelConfig, looks_local

# A CLIP tokenizer as saved: its config beside tokenizer.json (transformers 5) or the vocab and
# merges (older versions, the SD-1.x Hub repos).
_TOKENIZER_FILES = (("tokenizer_config.json", "tokenizer.json"),
                    ("tokenizer_config.json", "vocab.json", "merges.txt"))  # fmt: skip


def byte_level_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over single bytes: no vocabulary download needed, any text encodes."""
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


def prompt_tokenizer(config: ModelConfig):
    """The tokenizer `config`'s pipeline encodes prompts with, or None if it is not on this
    machine (a Hub model not downloaded yet) or states no length."""
    if config.base in PRESETS:
        return byte_level_tokenizer()[0]
    folder = _tokenizer_folder(config)
    if folder is None:
        return None

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return tokenizer if tokenizer.model_max_length < VERY_LARGE_INTEGER else None


def _tokenizer_folder(config: ModelConfig) -> Path | None:
    """The pipeline's `tokenizer/` if its files are all here. Checked before transformers opens
    it: given a folder without them, CLIPTokenizer makes an empty tokenizer instead of failing."""
    if looks_local(config.base) or Path(config.base).is_dir():
        folder = Path(config.base) / "tokenizer"
    else:  # a Hub id: its cached snapshot, never a download
        cached = try_to_load_from_cache(
            config.base, "tokenizer/tokenizer_config.json", revision=config.revision
        )
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    saved = any(all((folder / name).is_file() for name in files) for files in _TOKENIZER_FILES)
    return folder if saved else None


def token_counter(config: ModelConfig) -> tuple[Callable[[str], int], int] | None:
    """A function counting a text's tokens (no start or end token) and how many of them the
    text encoder reads: the tokenizer's length less the special tokens it adds; None without
    a tokenizer."""
    tokenizer = prompt_tokenizer(config)
    if tokenizer is None:
        return None

    def count(text: str) -> int:  # verbose=False: no "longer than the maximum" log line
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    return count, tokenizer.model_max_length - len(tokenizer("").input_ids)
