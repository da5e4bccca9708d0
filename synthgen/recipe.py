"""Recipe schema: load a YAML recipe, validate it, and hash it.

Every mistake becomes a `RecipeError` naming the file and the YAML field path, so the CLI can print
one line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthgen.errors import RecipeError
from synthgen.labels import LABEL_KINDS, LabelSpec
from synthgen.prompts import template_fields

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(Strict):
    path: str
    weight_name: str | None = None
    scale: float = 1.0

    @model_validator(mode="after")
    def _safetensors_only(self) -> LoraConfig:
        for field, value in (("path", self.path), ("weight_name", self.weight_name)):
            if value and value.lower().endswith(PICKLE_SUFFIXES):
                raise ValueError(
                    f"{field} '{value}' is a pickle checkpoint, which can run arbitrary code; "
                    "convert it to .safetensors"
                )
        return self


class ModelConfig(Strict):
    base: str = "tiny"
    revision: str | None = None
    lora: LoraConfig | None = None
    scheduler: Literal["ddim", "pndm", "euler", "dpm"] = "ddim"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class GenerationConfig(Strict):
    mode: Literal["t2i", "i2i"] = "t2i"
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str | None = None
    height: int = Field(512, ge=8, le=4096, multiple_of=8)
    width: int = Field(512, ge=8, le=4096, multiple_of=8)
    batch_size: int = Field(8, ge=1, le=1024)


class OutputConfig(Strict):
    formats: list[Literal["webdataset", "parquet"]] = ["webdataset", "parquet"]
    image_format: Literal["png", "jpg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    png_compress_level: int = Field(6, ge=0, le=9)

    @field_validator("formats")
    @classmethod
    def _not_empty(cls, formats: list[str]) -> list[str]:
        if not formats:
            raise ValueError("at least one format is needed")
        return formats


class Recipe(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
    description: str = ""
    license: str = "cc-by-4.0"
    seed: int = Field(0, ge=0, lt=2**63)
    num_samples: int = Field(ge=1)
    shard_size: int = Field(1000, ge=1)
    splits: dict[str, float] = {"train": 1.0}
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    prompt: str
    labels: dict[str, LabelSpec] = {}
    output: OutputConfig = OutputConfig()

    @field_validator("splits")
    @classmethod
    def _valid_splits(cls, splits: dict[str, float]) -> dict[str, float]:
        if not splits:
            raise ValueError("at least one split is needed")
        for split, share in splits.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", split):
                raise ValueError(f"split name '{split}' must be lowercase letters, digits, _")
            if share <= 0:
                raise ValueError(f"split '{split}' has share {share}; shares must be positive")
        total = sum(splits.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split shares add up to {total:g}, not 1")
        return splits

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, LabelSpec]) -> dict[str, LabelSpec]:
        reserved = {"key", "image", "prompt", "mode", "seed", "steps", "guidance_scale", "strength"}
        for name in labels:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"label name '{name}' must be an identifier")
            if name in reserved:
                raise ValueError(f"label name '{name}' is reserved for a dataset column")
        return labels

    @model_validator(mode="after")
    def _prompt_names_known_labels(self) -> Recipe:
        for name in template_fields(self.prompt):
            if name not in self.labels:
                known = ", ".join(sorted(self.labels)) or "none"
                raise ValueError(
                    f"prompt names '{{{name}}}', which is not a label (labels: {known})"
                )
        return self

    def sha256(self) -> str:
        """Hash of the validated recipe, so reformatting the YAML does not change it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the union's tag in the location (labels.age.normal.std); users wrote labels.age.std
    parts = [str(part) for part in loc]
    if len(parts) > 2 and parts[0] == "labels" and parts[2] in LABEL_KINDS:
        del parts[2]
    return ".".join(parts)


def recipe_from_dict(data: Any, file: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping of fields", file=file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _field_path(error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        raise RecipeError(message, file=file, where=where) from None


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """Read and validate a recipe; `overrides` replace top-level fields (e.g. num_samples)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"cannot read the file ({exc.__class__.__name__})", file=str(path)
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"YAML syntax error: {problem}", file=str(path), where=where) from None
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return recipe_from_dict(data, file=str(path))
