"""`synthgen preview`: a contact sheet of a recipe's first samples, rendered exactly as
`generate` renders them, or of samples already committed in an OUT."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import torch
from PIL import Image

from synthgen.cohort.rows import source_image_loader
from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir, reason, temporary_name
from synthgen.plan import SampleSpec
from synthgen.preview.sheet import Item, caption, contact_sheet, preview_from_out
from synthgen.recipe.schema import Recipe, load_recipe
from synthgen.render.pipeline import load_pipeline
from synthgen.render.renderer import Renderer
from synthgen.run.planning import build_plan


def render_first(recipe: Recipe, n: int = 8, device: str | None = None) -> list[Item]:
    """The plan's first `n` samples; `device` defaults to the first GPU, else the CPU."""
    plan = build_plan(recipe, check_images=False)
    batches: list[list[SampleSpec]] = []  # one per shard: an i2i batch shares one strength
    remaining = n
    for task in plan.tasks:
        if remaining <= 0:
            break
        specs = plan.specs(task)[:remaining]
        batches.append(specs)
        remaining -= len(specs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, _ = load_pipeline(recipe.model, mode=recipe.generation.mode, device=device)
    load_source = None
    if plan.cohort is not None:
        load_source = source_image_loader(plan.cohort, recipe.source.preprocess)
    # Each sample has its own generator, so a smaller batch renders the same pixels, faster.
    generation = recipe.generation.model_copy(
        update={"batch_size": max(1, min(n, recipe.generation.batch_size))}
    )
    renderer = Renderer(pipe, generation, device, load_source)
    try:
        return [
            (image, caption(recipe, spec.key, spec.labels))
            for specs in batches
            for spec, image in renderer.render(specs)
        ]
    finally:
        renderer.close()


def make_preview(
    source: str, n: int | None = None, seed: int = 0, device: str | None = None, columns: int = 4
) -> Image.Image:
    """SOURCE is a recipe file (renders a few) or an output directory or URL (samples it)."""
    if Path(source).is_file() or source.endswith((".yaml", ".yml")):
        return contact_sheet(render_first(load_recipe(source), n or 8, device), columns=columns)
    return preview_from_out(OutDir(source), n or 16, seed, columns)


def save_sheet(sheet: Image.Image, output: Path) -> None:
    """Write the sheet (in the format `output`'s suffix names, else PNG) through a temporary
    sibling: a write that fails (a file where a folder should be, a full disk) is one
    OutputError naming `output`, and leaves neither a temporary nor half an image."""
    image_format = Image.registered_extensions().get(output.suffix.lower(), "PNG")
    temporary = output.with_name(temporary_name(output.name))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(temporary, format=image_format)
        os.replace(temporary, output)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = reason(error)
        if error.errno in (errno.ENOTDIR, errno.EEXIST):
            cause = "a folder above it is a file"
        raise OutputError(
            f"cannot be written ({cause}); choose another place", file=str(output)
        ) from None
