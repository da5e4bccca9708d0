"""Captioned contact sheets: a grid of thumbnails, each with `label=value` lines below it.

Captions are built from the recipe's declared labels and nothing else (i2i adds the sample's
opaque key), so no source id, file name or cohort column can reach a sheet.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir
from synthgen.output.read import ShardReader
from synthgen.output.records import ShardEntry
from synthgen.recipe.schema import Recipe

PAD = 6  # pixels around every tile and between a thumbnail and its caption
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)

Item = tuple[Image.Image, list[str]]


def caption(recipe: Recipe, key: str, labels: Mapping[str, object]) -> list[str]:
    """`label=value` lines of the declared labels; for i2i the opaque key first."""
    lines = [f"key={key}"] if recipe.generation.mode == "i2i" else []
    for name, spec in recipe.labels.items():
        if name in labels:
            lines.append(f"{name}={spec.caption(labels[name])}")  # type: ignore[arg-type]
    return lines


# --- contact sheet --------------------------------------------------------------------------


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, which has no sizes
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """`text`, cut with `...` where it would run past `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    items: Sequence[Item],
    columns: int = 4,
    thumb: int | tuple[int, int] = 160,
    title: str | None = None,
) -> Image.Image:
    """A grid of thumbnails (fit into `thumb` pixels, a side or width × height) with each one's
    caption lines below it, under an optional title line."""
    if not items:
        raise ValueError("a contact sheet needs at least one image")
    width, height = thumb if isinstance(thumb, tuple) else (thumb, thumb)
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    font = _font()
    left, top, right, bottom = font.getbbox("Ag|=")
    line_height = bottom - min(top, 0) + 2
    caption_height = max(len(lines) for _, lines in items) * line_height
    tile_height = height + (PAD + caption_height if caption_height else 0)
    head = line_height + PAD if title else 0
    sheet = Image.new(
        "RGB",
        (PAD + columns * (width + PAD), PAD + head + rows * (tile_height + PAD)),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _fit(title, font, sheet.width - 2 * PAD), fill=INK, font=font)
    for i, (image, lines) in enumerate(items):
        row, column = divmod(i, columns)
        x, y = PAD + column * (width + PAD), PAD + head + row * (tile_height + PAD)
        small = ImageOps.contain(image.convert("RGB"), (width, height))
        sheet.paste(small, (x + (width - small.width) // 2, y + (height - small.height) // 2))
        for n, line in enumerate(lines):
            text_y = y + height + PAD + n * line_height
            draw.text((x, text_y), _fit(line, font, width), fill=INK, font=font)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sample_committed(
    reader: ShardReader, recipe: Recipe, shards: Sequence[ShardEntry], n: int = 16, seed: int = 0
) -> list[Item]:
    """`n` consecutive committed samples of `shards` (in plan order) from a start chosen by
    `seed` alone.

    Consecutive, because samples are independent draws dealt evenly to cells: a run of them is
    as fair a sample as scattered ones, and it lies in one or two row groups, so a preview reads
    the same few image bytes whatever the corpus's size (scattered picks read a row group each).
    """
    total = sum(shard.count for shard in shards)
    if total == 0:
        raise OutputError("no committed samples to preview; run `synthgen generate`")
    first = int(np.random.default_rng(seed).integers(total - min(n, total) + 1))
    picks = list(range(first, first + min(n, total)))
    items, start = [], 0
    for shard in shards:
        wanted = [p - start for p in picks if start <= p < start + shard.count]
        start += shard.count
        if wanted:
            for sample in reader.read(shard, wanted):
                image = Image.open(io.BytesIO(sample.image or b""))
                items.append((image, caption(recipe, sample.key, sample.labels)))
    return items


def committed_in_plan_order(out: OutDir) -> list[ShardEntry]:
    run = out.run_record()
    if run is None:  # nothing was ever generated here
        return []
    committed = out.committed_records()
    return [committed[task.name] for task in run.tasks if task.name in committed]


def preview_from_out(out: OutDir, n: int = 16, seed: int = 0, columns: int = 4) -> Image.Image:
    recipe = out.recipe()
    reader = ShardReader(out, {name: spec.encoding() for name, spec in recipe.labels.items()})
    try:
        items = sample_committed(reader, recipe, committed_in_plan_order(out), n, seed)
    except OutputError as error:
        raise OutputError(error.message, file=out.url) from None
    return contact_sheet(items, columns=columns)
