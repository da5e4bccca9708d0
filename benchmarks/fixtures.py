"""What both contenders run on: a random LoRA file, a photo-like cohort, the recipe, the seed pipes.

The seed-style pipelines are built the way the SynthMed model card's Quick Start builds them
(DDIM, safety checker off, `load_lora_weights` left unfused), through synthgen's loader without
the worker's tuning; synthgen builds its own from the recipe in a `Worker`, as a real run does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from synthgen.cohort.demo import write_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # lora_files: the random-LoRA writer the tests use

from lora_files import peft_lora_state, write_peft_layout  # noqa: E402
from png_speed import smooth_image  # noqa: E402

PROMPT = "retina fundoscopy {laterality} eye dilated age={age} gender={sex} bp systolic={sbp}"
LABELS = {
    "laterality": {"dist": "categorical", "values": {"right": 0.5, "left": 0.5}},
    "sex": {"dist": "categorical", "values": {"male": 0.5, "female": 0.5}},
    "age": {"dist": "normal", "mean": 52, "std": 11, "min": 40, "max": 75, "dtype": "int"},
    "sbp": {"dist": "normal", "mean": 122, "std": 15, "min": 85, "max": 200, "dtype": "int"},
}
SEED = 20261125


@dataclass(frozen=True)
class Settings:
    """One benchmark run's knobs, shared by both contenders."""

    device: str
    model: str
    dtype: str  # auto | float32 | float16 | bfloat16, as in a recipe
    size: int
    steps: int
    guidance_scale: float
    strength: float
    count: int
    batch_size: int
    lora_rank: int
    check: bool
    compile: bool = False  # torch.compile synthgen's UNet (the seed loop stays eager)

    @property
    def torch_dtype(self) -> torch.dtype:
        from synthgen.render.pipeline import resolve_dtype

        return resolve_dtype(self.dtype, self.device)


def write_lora(unet, rank: int, path: Path) -> Path:
    """A random rank-`rank` LoRA on to_q/to_k/to_v/to_out.0 of every attention block.

    The test writer's matrices are scaled down so the update stays small beside the base weights
    (std about 0.005): a random update as large as the weights overflows float16.
    """
    state = peft_lora_state(unet, rank=rank)
    factor = (0.005 / (0.09 * rank**0.5)) ** 0.5  # each matrix has std 0.3 in the test writer
    return write_peft_layout({k: v * factor for k, v in state.items()}, path)


def write_cohort(folder: Path, count: int, size: int) -> Path:
    """`count` photo-like RGB PNGs at the model's size, one patient each, and manifest.csv."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"images/{i:05d}.png"
        Image.fromarray(smooth_image(size, seed=i)).save(folder / name)
        rows.append(
            {
                "image_file": name,
                "study_id": f"s{i}",
                "patient_id": f"p{i}",
                "Eye": ("right", "left")[i % 2],
                "AgeYears": str(40 + i % 35),
                "Sex": ("male", "female")[i % 2],
                "SBP": str(100 + i % 60),
            }
        )
    return write_table(folder / "manifest.csv", rows)


def bench_recipe(settings: Settings, mode: str, lora: Path | None, folder: Path):
    """The recipe that asks synthgen for what the seed-style loop does: one shard, PNG out."""
    from synthgen.recipe.schema import recipe_from_dict

    s = settings
    model = {"base": s.model, "scheduler": "ddim", "dtype": s.dtype, "compile": s.compile}
    if lora is not None:
        model["lora"] = {"path": str(lora)}
    generation = {
        "mode": mode,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "batch_size": s.batch_size,
    }
    data = {
        "name": f"bench-{mode}",
        "seed": SEED,
        "shard_size": s.count,
        "splits": {"train": 1.0},
        "model": model,
        "generation": generation,
        "prompt": PROMPT,
        "labels": LABELS,
        "output": {"formats": ["webdataset", "parquet"], "image_format": "png"},
    }
    if mode == "t2i":
        generation.update(height=s.size, width=s.size)
        data["num_samples"] = s.count
    else:
        generation["strength"] = s.strength
        manifest = write_cohort(folder / "cohort", s.count, s.size)
        data["source"] = {
            "manifest": str(manifest),
            "image_column": "image_file",
            "id_column": "study_id",
            "patient_column": "patient_id",
            "labels": {"laterality": "Eye", "age": "AgeYears", "sex": "Sex", "sbp": "SBP"},
            "preprocess": {"size": s.size, "fit": "center_crop"},
        }
        data["privacy"] = {"linkage": str(folder / "linkage.csv")}
    return recipe_from_dict(data, file="<benchmark recipe>")


def seed_pipelines(settings: Settings, folder: Path) -> tuple[dict, Path | None]:
    """The model card's pipelines for t2i and i2i (one set of weights), and the LoRA file."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from synthgen.recipe.schema import ModelConfig
    from synthgen.render.pipeline import load_pipeline

    # synthgen's loader without its worker tuning: diffusers' own DDIM, the safety checker off
    base = ModelConfig(base=settings.model, scheduler="ddim", dtype=settings.dtype)
    pipe, _ = load_pipeline(base, device=settings.device)
    lora = None
    if settings.lora_rank:
        lora = write_lora(pipe.unet, settings.lora_rank, folder / "lora.safetensors")
        pipe.load_lora_weights(str(lora))  # left unfused, as the Quick Start leaves it
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    return {"t2i": pipe, "i2i": i2i}, lora
