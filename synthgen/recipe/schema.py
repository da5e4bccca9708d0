"""Recipe schema: load a YAML recipe, validate it, and hash it.

Every mistake becomes a `RecipeError` naming the file and the YAML field path, so the CLI can print
one line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from synthgen.errors import FieldError, RecipeError
from synthgen.recipe.balance import BalanceConfig, Cell, quota_cells
from synthgen.recipe.conditional import LabelSpec
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.numbers import MAX_SAMPLES, MAX_SHARDS, Flag, Probability, integer, real
from synthgen.recipe.prompts import render_prompt, template_fields
from synthgen.recipe.quality import QualityConfig, bind_checks, grouping
from synthgen.recipe.recipe_yaml import YamlProblem, load_yaml
from synthgen.recipe.schedulers import MIN_STEPS

REDACTED = "<redacted: protected path>"
PRESETS = ("tiny", "sd14-random")  # built-in models, made offline in synthgen.render.pipeline
# (section, field) of every path to real patients' data: made absolute on load, redacted in OUT.
PROTECTED_PATHS = (("source", "manifest"), ("source", "images_root"), ("privacy", "linkage"),
                   ("labels_from", "table"))  # fmt: skip


def looks_local(path: str) -> bool:
    """A path the user means as a file (not a Hub repo id `org/name`)."""
    return path.startswith((".", "/", "~")) or path.endswith(".safetensors") or path.count("/") > 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(Strict):
    """A LoRA to fuse into the base model. Whether its file is safetensors is decided by its bytes
    when it is opened (synthgen.weight_files), never by its name.

    `alpha` is what the adapter was trained with (the update is scale × alpha / rank, rank read
    from the file); a file that states its own alpha must agree with it. `allow_partial` loads a
    file whose keys do not all land on the base model (the dropped keys are counted).
    """

    path: str
    weight_name: str | None = None
    scale: real(ge=-10, le=10) = 1.0  # far outside [-2, 2] an adapter only wrecks the image
    alpha: real(gt=0, le=1e6) | None = None
    allow_partial: Flag = False


class ModelConfig(Strict):
    base: str = "tiny"
    revision: str | None = None
    lora: LoraConfig | None = None
    scheduler: Literal["ddim", "pndm", "euler", "dpm"] = "ddim"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: Flag = False  # torch.compile the UNet: pays off over hundreds of images on a GPU


class GenerationConfig(Strict):
    mode: Literal["t2i", "i2i"] = "t2i"
    strength: Probability | list[Probability] | None = None
    repeats: integer(ge=1, le=100) = 1
    steps: integer(ge=1, le=1000) = 50
    guidance_scale: real(ge=0, le=100) = 7.5
    negative_prompt: str | None = None
    height: integer(ge=8, le=4096, multiple_of=8) = 512
    width: integer(ge=8, le=4096, multiple_of=8) = 512
    batch_size: integer(ge=1, le=1024) = 8

    @model_validator(mode="after")
    def _strengths(self) -> GenerationConfig:
        if self.mode == "t2i":
            if self.strength is not None or self.repeats != 1:
                raise FieldError("strength", "strength and repeats apply to mode i2i only")
            return self
        values = self.strengths()
        if not values:
            raise FieldError("strength", "mode i2i needs a strength (a number or a list)")
        if len(set(values)) != len(values):
            raise FieldError("strength", "strength lists a value twice")
        for value in values:
            if not 0 < value <= 1:
                raise FieldError("strength", f"strength {value} must be in (0, 1]")
            if int(self.steps * value) < 1:  # diffusers denoises int(steps × strength) steps
                raise FieldError(
                    "strength", f"strength {value} × {self.steps} steps leaves no denoising step"
                )
        return self

    def strengths(self) -> list[float]:
        if self.strength is None:
            return []
        return list(self.strength) if isinstance(self.strength, list) else [self.strength]


class PreprocessConfig(Strict):
    size: integer(ge=8, le=4096, multiple_of=8) = 512
    fit: Literal["center_crop", "pad", "resize"] = "center_crop"


class SourceConfig(Strict):
    """A real cohort for i2i: a table of image paths and metadata.

    Image paths are relative to `images_root` (default: the table's folder) and must lie inside
    it once symlinks are resolved, so a manifest cannot make synthgen read any other file.
    """

    manifest: str
    images_root: str | None = None  # where the images live when not beside the table
    image_column: str
    id_column: str
    patient_column: str | None = None
    labels: dict[str, str] = {}
    preprocess: PreprocessConfig = PreprocessConfig()
    on_error: Literal["fail", "skip"] = "fail"
    max_rows: integer(ge=1, le=MAX_SAMPLES) | None = None

    @model_serializer(mode="wrap")
    def _without_unset_images_root(self, handler: Callable[[Any], dict]) -> dict:
        # Unset, it is left out: a recipe written before the field keeps its sha256 (and its OUT).
        data = handler(self)
        if data.get("images_root") is None:
            data.pop("images_root", None)
        return data


class LabelsFromConfig(Strict):
    """T2I labels drawn by resampling rows of a real metadata table (keeps the joint)."""

    table: str
    columns: dict[str, str]


class PrivacyConfig(Strict):
    linkage: str


class OutputConfig(Strict):
    formats: list[Literal["webdataset", "parquet"]] = ["webdataset", "parquet"]
    grayscale: Flag = False
    image_format: Literal["png", "jpg", "webp"] = "png"
    jpeg_quality: integer(ge=1, le=100) = 95
    png_compress_level: integer(ge=0, le=9) = 1

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
    seed: integer(ge=0, lt=2**63) = 0
    num_samples: integer(ge=1, le=MAX_SAMPLES) | None = None
    shard_size: integer(ge=1, le=MAX_SAMPLES) = 1000
    splits: dict[str, Probability] = {"train": 1.0}
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    prompt: str
    labels: dict[str, LabelSpec] = {}
    balance: BalanceConfig | None = None
    labels_from: LabelsFromConfig | None = None
    source: SourceConfig | None = None
    privacy: PrivacyConfig | None = None
    output: OutputConfig = OutputConfig()
    quality: QualityConfig | None = None  # the quality gate (synthgen.recipe.quality)

    @field_validator("splits")
    @classmethod
    def _valid_splits(cls, splits: dict[str, float]) -> dict[str, float]:
        if not splits:
            raise ValueError("at least one split is needed")
        for split in splits:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", split):
                raise ValueError(f"split name '{split}' must be lowercase letters, digits, _")
            if split == "all":  # datasets.Split.ALL: load_dataset(split="all") is every split
                raise ValueError("split name 'all' is reserved by datasets for all splits together")
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
    def _mode_fits(self) -> Recipe:
        if self.generation.mode == "t2i":
            if self.num_samples is None and self.balance is None:
                raise FieldError("num_samples", "num_samples is required for mode t2i")
            if self.source is not None:
                raise FieldError("source", "source applies to mode i2i; set generation.mode: i2i")
        else:
            if self.source is None:
                raise FieldError("source", "mode i2i needs a source cohort (source.manifest …)")
            if self.num_samples is not None:
                raise FieldError(
                    "num_samples",
                    "an i2i recipe takes its sample count from the cohort; remove num_samples "
                    "(use --num-samples on the command line for a trial run)",
                )
            if self.privacy is None:
                raise FieldError(
                    "privacy.linkage",
                    "mode i2i needs privacy.linkage: where the key → source id table goes",
                )
            unmapped = [name for name in self.labels if name not in self.source.labels]
            if unmapped:
                raise FieldError("source.labels", f"label '{unmapped[0]}' has no cohort column")
            extra = [name for name in self.source.labels if name not in self.labels]
            if extra:
                raise FieldError("source.labels", f"'{extra[0]}' is not a declared label")
        if self.labels_from is not None:
            missing = [name for name in self.labels if name not in self.labels_from.columns]
            extra = [name for name in self.labels_from.columns if name not in self.labels]
            if missing or extra:
                raise FieldError("labels_from.columns", "must map exactly the declared labels")
        return self

    @model_validator(mode="after")
    def _steps_fit_scheduler(self) -> Recipe:
        least, steps = MIN_STEPS[self.model.scheduler], self.generation.steps
        if steps < least:  # else every shard fails at render time
            raise FieldError(
                "generation.steps",
                f"{steps} is too few: scheduler {self.model.scheduler} needs at least {least} steps",
            )
        return self

    @model_validator(mode="after")
    def _labels_fit_together(self) -> Recipe:
        LabelModel(self.labels)  # dependencies: parents exist, no cycle, cases and bins fit
        if self.balance is None:
            return self
        if self.generation.mode != "t2i":
            raise FieldError(
                "balance", "an i2i dataset's labels are its cohort's: there is nothing to balance"
            )
        if self.labels_from is not None:
            raise FieldError(
                "balance", "labels resampled from a table (labels_from) cannot also be balanced"
            )
        self.cells()
        return self

    @model_validator(mode="after")
    def _quality_fits_labels(self) -> Recipe:
        if self.quality is not None:
            bind_checks(self.quality, self.labels)
            balance = self.balance
            grouping(self.quality, self.labels, balance.by if balance else (),
                     balance.bins if balance else None)  # fmt: skip
        return self

    @model_validator(mode="after")
    def _sizes_fit(self) -> Recipe:
        if self.generation.mode == "t2i":
            samples = self.sample_count()  # balance quotas: the cells are counted once
            shards = -(-samples // self.shard_size) + len(self.splits) - 1
            if shards > MAX_SHARDS:
                raise FieldError(
                    "shard_size",
                    f"{samples} samples in shards of {self.shard_size} make up to "
                    f"{shards} shards; at most {MAX_SHARDS}: raise shard_size",
                )
        return self

    def cells(self) -> list[Cell]:
        """The balance cells with their counts (empty without a balance section)."""
        if self.balance is None:
            return []
        try:
            return quota_cells(self.balance, self.labels, self.num_samples)
        except FieldError as error:
            raise FieldError(f"balance.{error.field}", str(error)) from None

    def sample_count(self) -> int:
        """num_samples, or what the balance quotas add up to (t2i)."""
        if self.num_samples is not None:
            return self.num_samples
        return sum(cell.count for cell in self.cells())

    @model_validator(mode="after")
    def _prompt_names_known_labels(self) -> Recipe:
        try:
            names = template_fields(self.prompt)
        except ValueError as exc:
            raise FieldError("prompt", str(exc)) from None
        for name in names:
            if name not in self.labels:
                known = ", ".join(sorted(self.labels)) or "none"
                raise FieldError(
                    "prompt",
                    f"the template names '{{{name}}}', which is not a label (labels: {known})",
                )
        # A label's type is fixed by its declaration: one trial fill catches a spec it cannot take.
        drawn = LabelModel(self.labels).draw(np.random.default_rng(0))
        trial = {name: self.labels[name].prompt_form(value) for name, value in drawn.items()}
        try:
            render_prompt(self.prompt, trial)
        except (ValueError, TypeError) as exc:
            raise FieldError("prompt", f"cannot be filled in: {exc}") from None
        return self

    def sha256(self) -> str:
        """Hash of the validated recipe, so reformatting the YAML does not change it."""
        # Key order is kept: the order of labels, categories and splits changes the samples.
        # Unset optional fields are left out, so a field added later leaves old hashes as they are.
        dump = self.model_dump(mode="json", exclude_none=True)
        canonical = json.dumps(dump, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def corpus_sha256(self) -> str:
        """What the corpus is whatever its size: the shareable recipe without `num_samples`, the
        balance's `per_cell` or an i2i sweep's strengths, repeats and row limit. Raising those extends a
        corpus; any other change starts a new one."""
        dump = self.shareable().model_dump(mode="json", exclude_none=True)
        dump.pop("num_samples", None)
        dump.get("balance", {}).pop("per_cell", None)
        for grows in ("strength", "repeats"):  # an i2i sweep grows by strengths and repeats
            dump["generation"].pop(grows, None)
        dump.get("source", {}).pop("max_rows", None)  # and by rows (a trial run's limit)
        canonical = json.dumps(dump, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def _map_protected_paths(self, change: Callable[[str], str]) -> dict[str, Any]:
        """`change` applied to every path that points at real patients' data."""
        changes: dict[str, Any] = {}
        for section, field in PROTECTED_PATHS:
            config = changes.get(section, getattr(self, section))
            if config is not None and getattr(config, field) is not None:
                changes[section] = config.model_copy(update={field: change(getattr(config, field))})
        return changes

    def shareable(self) -> Recipe:
        """The recipe as written into OUT: cohort and linkage paths are protected information."""
        return self.model_copy(update=self._map_protected_paths(lambda _: REDACTED))

    def resolve_paths(self, base: Path) -> Recipe:
        """Make local model, LoRA, cohort and linkage paths absolute, from the recipe's folder."""

        def absolute(value: str) -> str:
            return value if "://" in value else str((base / Path(value).expanduser()).resolve())

        changes = self._map_protected_paths(absolute)
        model = self.model
        if model.base not in PRESETS and looks_local(model.base):
            model = model.model_copy(update={"base": absolute(model.base)})
        if model.lora is not None and looks_local(model.lora.path):
            model = model.model_copy(
                update={"lora": model.lora.model_copy(update={"path": absolute(model.lora.path)})}
            )
        changes["model"] = model
        if self.quality is not None:
            changes["quality"] = self.quality.resolve_paths(absolute)
        return self.model_copy(update=changes)


def _field_path(error: Any, data: Any) -> list[str]:
    """The path the user wrote: pydantic's location also names union members (`normal`,
    `function-after[…]`, `int`, `dict[str,…]`), which are not keys of the data and are dropped;
    a missing field keeps its name."""
    parts: list[str] = []
    loc = error["loc"]
    for i, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif not (i == len(loc) - 1 and error["type"] == "missing" and isinstance(data, dict)):
            continue
        parts.append(str(part))
    return parts


def _first_error(errors: list[Any], data: Any) -> tuple[Any, list[str]]:
    """The first error, or a deeper one under the same field: a union's first member often fails
    on the type alone (`mean` is not a float) where a later one names the real problem
    (`mean.base` is not finite)."""
    paths = [_field_path(error, data) for error in errors]
    first = paths[0]
    best = max(
        range(len(errors)), key=lambda i: (paths[i][: len(first)] == first, len(paths[i]), -i)
    )
    return errors[best], paths[best]


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    if isinstance(error.get("input"), bool) and error["type"] in ("int_type", "float_type"):
        return "a boolean (true/false) where a number goes"
    return error["msg"].removeprefix("Value error, ")


def recipe_from_dict(data: Any, file: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping of fields", file=file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error, parts = _first_error(exc.errors(), data)
        where = ".".join(parts) or None
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            where = f"{where}.{cause.field}" if where else cause.field
        raise RecipeError(_message(error), file=file, where=where) from None


def load_recipe(path: str | Path, num_samples: int | None = None) -> Recipe:
    """Read and validate a recipe. `num_samples` overrides the count for a trial run: the
    number of samples for t2i, the number of cohort rows (from the top) for i2i."""
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
        data = load_yaml(text)
    except YamlProblem as exc:
        raise RecipeError(str(exc), file=str(path), where=f"line {exc.line}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"YAML syntax error: {problem}", file=str(path), where=where) from None
    if num_samples is not None and isinstance(data, dict):
        generation = data.get("generation") or {}
        if isinstance(generation, dict) and generation.get("mode") == "i2i":
            data = {**data, "source": {**(data.get("source") or {}), "max_rows": num_samples}}
        else:
            data = {**data, "num_samples": num_samples}
    return recipe_from_dict(data, file=str(path)).resolve_paths(path.parent)
