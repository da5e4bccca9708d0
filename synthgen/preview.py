"""Previews: a captioned contact sheet of samples and asked-vs-drawn plots of each label.

The sheet comes from committed shards (cheap, no model) or from a recipe (a few samples rendered
by the same plan, pipeline and Renderer as `generate`). Captions are `label=value` lines of the
recipe's declared labels and nothing else; i2i adds the sample's opaque key, never a source id.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from synthgen.errors import OutputError
from synthgen.labels import Categorical, Constant, Multilabel, Normal, Uniform
from synthgen.outdir import OutDir
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe import Recipe

PREVIEWS = "previews"
SHEET_NAME = "preview.png"
PAD = 6  # pixels around every tile and between a thumbnail and its caption
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
ASKED_COLOR, DRAWN_COLOR = "#9aa5b1", "#1f77b4"

Item = tuple[Image.Image, list[str]]


# --- captions -------------------------------------------------------------------------------


def caption(recipe: Recipe, key: str, labels: Mapping[str, object]) -> list[str]:
    """`label=value` lines of the declared labels; for i2i the opaque key first.

    Built from the recipe's label names, not from what `labels` holds, so nothing undeclared
    (a source id, a file name, a cohort column) can reach a caption.
    """
    lines = [f"key={key}"] if recipe.generation.mode == "i2i" else []
    for name, spec in recipe.labels.items():
        if name not in labels:
            continue
        value = labels[name]
        if isinstance(spec, Multilabel) and not isinstance(value, str):
            value = spec.as_text([str(f) for f in value])  # type: ignore[union-attr]
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{name}={value}")
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


def contact_sheet(items: Sequence[Item], columns: int = 4, thumb: int = 160) -> Image.Image:
    """A grid of thumbnails (fit into `thumb`×`thumb`) with each one's caption lines below it."""
    if not items:
        raise ValueError("a contact sheet needs at least one image")
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    font = _font()
    left, top, right, bottom = font.getbbox("Ag|=")
    line_height = bottom - min(top, 0) + 2
    caption_height = max(len(lines) for _, lines in items) * line_height
    tile_height = thumb + (PAD + caption_height if caption_height else 0)
    sheet = Image.new(
        "RGB",
        (PAD + columns * (thumb + PAD), PAD + rows * (tile_height + PAD)),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(items):
        row, column = divmod(i, columns)
        x, y = PAD + column * (thumb + PAD), PAD + row * (tile_height + PAD)
        small = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        for n, line in enumerate(lines):
            text_y = y + thumb + PAD + n * line_height
            draw.text((x, text_y), _fit(line, font, thumb), fill=INK, font=font)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# --- samples from committed shards ----------------------------------------------------------


def _parquet_samples(
    out: OutDir, recipe: Recipe, path: str, wanted: list[int]
) -> Iterator[tuple[str, bytes, dict]]:
    """Rows `wanted` (positions in the shard), reading only the row groups that hold them."""
    columns = ["key", "image", *recipe.labels]
    with out.fs.open(out.path(path), "rb") as handle:
        parquet = pq.ParquetFile(handle)
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                  for g in range(parquet.num_row_groups)])  # fmt: skip
        groups = sorted({int(np.searchsorted(starts, p, side="right")) - 1 for p in wanted})
        table = parquet.read_row_groups(groups, columns=columns)
    offsets, first = {}, 0
    for group in groups:
        offsets[group] = first
        first += int(starts[group + 1] - starts[group])
    for position in wanted:
        group = int(np.searchsorted(starts, position, side="right")) - 1
        row = table.slice(offsets[group] + position - int(starts[group]), 1).to_pylist()[0]
        labels = {name: spec.from_stored(row[name]) for name, spec in recipe.labels.items()}
        yield row["key"], row["image"]["bytes"], labels


def _tar_samples(
    out: OutDir, recipe: Recipe, path: str, wanted: list[int]
) -> Iterator[tuple[str, bytes, dict]]:
    """Samples `wanted` of a WebDataset tar, streamed and stopped after the last one."""
    targets, found = set(wanted), {}
    keys: list[str] = []
    with (
        out.fs.open(out.path(path), "rb") as handle,
        tarfile.open(fileobj=handle, mode="r|") as tar,
    ):
        for member in tar:
            key, _, extension = member.name.partition(".")
            if not keys or keys[-1] != key:
                if len(keys) > max(targets):
                    break
                keys.append(key)
            if len(keys) - 1 in targets and extension != "txt":
                found.setdefault(key, {})[extension] = tar.extractfile(member).read()
    for position in wanted:
        parts = found[keys[position]]
        image = next(data for extension, data in parts.items() if extension != "json")
        yield keys[position], image, json.loads(parts["json"])["labels"]


def committed_in_plan_order(out: OutDir) -> list[dict]:
    run = out.run_record()
    if run is None:  # nothing was ever generated here
        return []
    committed = out.committed_records()
    names = [ShardTask(**task).name for task in run["tasks"]]
    return [committed[name] for name in names if name in committed]


def sample_committed(
    out: OutDir, recipe: Recipe, n: int = 16, seed: int = 0, records: list[dict] | None = None
) -> list[Item]:
    """`n` committed samples, chosen by `seed` alone, each with its caption, in index order.

    `records`: the committed shards in plan order, when the caller has them (the manifest's).
    """
    if records is None:
        records = committed_in_plan_order(out)
    total = sum(record["count"] for record in records)
    if total == 0:
        raise OutputError("no committed samples to preview; run `synthgen generate`", file=out.url)
    picks = sorted(int(p) for p in np.random.default_rng(seed).choice(total, min(n, total), False))
    items, start = [], 0
    for record in records:
        wanted = [p - start for p in picks if start <= p < start + record["count"]]
        start += record["count"]
        if not wanted:
            continue
        files = sorted(record["files"])
        parquet = [f for f in files if f.endswith(".parquet")]
        reader = _parquet_samples if parquet else _tar_samples
        for key, data, labels in reader(out, recipe, (parquet or files)[0], wanted):
            items.append((Image.open(io.BytesIO(data)), caption(recipe, key, labels)))
    return items


def preview_from_out(out: OutDir, n: int = 16, seed: int = 0, columns: int = 4) -> Image.Image:
    from synthgen.card import read_recipe  # card imports this module to write previews

    return contact_sheet(sample_committed(out, read_recipe(out), n, seed), columns=columns)


# --- samples rendered from a recipe ---------------------------------------------------------


def render_first(recipe: Recipe, n: int = 8, device: str | None = None) -> list[Item]:
    """The plan's first `n` samples, rendered as `generate` would render them.

    `device` defaults to the first GPU when there is one, else the CPU.
    """
    import torch

    from synthgen.cohort import source_image_loader
    from synthgen.models import load_pipeline
    from synthgen.plan import build_plan
    from synthgen.render import Renderer

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
    return [
        (image, caption(recipe, spec.key, spec.labels))
        for specs in batches
        for spec, image in renderer.render(specs)
    ]


def preview_from_recipe(
    recipe: Recipe, n: int = 8, device: str | None = None, columns: int = 4
) -> Image.Image:
    return contact_sheet(render_first(recipe, n, device), columns=columns)


def make_preview(
    source: str,
    n: int | None = None,
    seed: int = 0,
    device: str | None = None,
    columns: int = 4,
) -> Image.Image:
    """The sheet for `synthgen preview`: SOURCE is a recipe file or an output directory/URL."""
    if Path(source).is_file() or source.endswith((".yaml", ".yml")):
        from synthgen.recipe import load_recipe

        return preview_from_recipe(load_recipe(source), n or 8, device, columns)
    return preview_from_out(OutDir(source), n or 16, seed, columns)


# --- label plots ----------------------------------------------------------------------------


def _bars(ax, names: list[str], asked: list[float], drawn: list[float]) -> None:
    x = np.arange(len(names))
    ax.bar(x - 0.2, asked, 0.4, label="asked", color=ASKED_COLOR)
    ax.bar(x + 0.2, drawn, 0.4, label="drawn", color=DRAWN_COLOR)
    ax.set_xticks(
        x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center"
    )
    ax.set_ylabel("share of samples")


def _categorical(ax, spec: Categorical | Constant, column: pd.Series) -> None:
    counts = column.astype(str).value_counts()
    n = max(len(column), 1)
    asked = {str(spec.value): 1.0} if isinstance(spec, Constant) else spec.probabilities()
    _bars(ax, list(asked), list(asked.values()), [counts.get(v, 0) / n for v in asked])


def _multilabel(ax, spec: Multilabel, column: pd.Series) -> None:
    n = max(len(column), 1)
    drawn_lists = [[str(f) for f in findings] for findings in column]
    names = [*spec.values, spec.none]
    # Findings are independent draws, so "none" has probability prod(1 - p); a cap never empties.
    asked = [*spec.values.values(), float(np.prod([1 - p for p in spec.values.values()]))]
    drawn = [sum(name in d for d in drawn_lists) / n for name in spec.values]
    drawn.append(sum(not d for d in drawn_lists) / n)
    _bars(ax, names, asked, drawn)
    ax.set_ylabel("rate per sample")


def _asked_density(spec: Normal | Uniform, x: np.ndarray) -> np.ndarray:
    """The density the sampler draws from (ints: the continuous law before rounding)."""
    low, high = spec.sampling_bounds()  # ints: half a unit wider, then rounded
    inside = (x >= low) & (x <= high)
    if isinstance(spec, Uniform):
        return np.where(inside, 1.0 / (high - low), 0.0) if high > low else np.zeros_like(x)
    dist = NormalDist(spec.mean, spec.std)
    mass = dist.cdf(high) - dist.cdf(low)
    return np.array([dist.pdf(v) / mass if ok else 0.0 for v, ok in zip(x, inside)])


def _numeric(ax, spec: Normal | Uniform, column: pd.Series) -> None:
    values = pd.to_numeric(column, errors="coerce").dropna().to_numpy(dtype=float)
    low, high = spec._bounds()
    if isinstance(spec, Normal):
        low, high = max(low, spec.mean - 4 * spec.std), min(high, spec.mean + 4 * spec.std)
    if len(values):
        low, high = min(low, values.min()), max(high, values.max())
    if spec.dtype == "int":
        step = max(1, math.ceil((high - low + 1) / 40))
        edges = np.arange(math.floor(low) - 0.5, math.ceil(high) + 0.5 + step, step)
    else:
        count = int(np.clip(2 * math.sqrt(max(len(values), 1)), 10, 40))
        edges = np.linspace(low, high if high > low else low + 1, count + 1)
    if len(values):
        ax.hist(values, bins=edges, density=True, color=DRAWN_COLOR, alpha=0.8, label="drawn")
    x = np.linspace(edges[0], edges[-1], 400)
    ax.plot(x, _asked_density(spec, x), color="black", linewidth=1.5, label="asked density")
    ax.set_ylabel("density")


def plot_label(name: str, spec, column: pd.Series) -> bytes:
    """One label's asked-vs-drawn figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if isinstance(spec, (Categorical, Constant)):
        _categorical(ax, spec, column)
    elif isinstance(spec, Multilabel):
        _multilabel(ax, spec, column)
    else:
        _numeric(ax, spec, column)
    ax.set_title(f"{name}: asked vs drawn (n={len(column)})", fontsize=10)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.2)  # room for the legend above the data
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    # No version stamp in the file, so a rerun of finalize writes the same bytes.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def plot_name(label: str) -> str:
    return f"labels-{label}.png"


def label_plots(recipe: Recipe, frame: pd.DataFrame, folder: Path | str | OutDir) -> list[str]:
    """Write `labels-NAME.png` for every label into `folder`; return the file names."""
    target = folder if isinstance(folder, OutDir) else OutDir(str(folder))
    names = []
    for name, spec in recipe.labels.items():
        column = frame[name] if name in frame else pd.Series([], dtype=object)
        target.write_atomic(plot_name(name), plot_label(name, spec, column))
        names.append(plot_name(name))
    return names


# --- what finalize writes and the card shows ------------------------------------------------


def write_previews(
    out: OutDir,
    recipe: Recipe,
    frame: pd.DataFrame,
    n: int = 16,
    seed: int = 0,
    records: list[dict] | None = None,
) -> list[str]:
    """`previews/preview.png` from committed shards and the label plots; paths relative to OUT."""
    sheet = contact_sheet(sample_committed(out, recipe, n, seed, records))
    out.write_atomic(f"{PREVIEWS}/{SHEET_NAME}", png_bytes(sheet))
    plots = label_plots(recipe, frame, OutDir(out.url.rstrip("/") + f"/{PREVIEWS}"))
    return [f"{PREVIEWS}/{SHEET_NAME}", *(f"{PREVIEWS}/{name}" for name in plots)]


def sheet_markdown(paths: Sequence[str]) -> str:
    """The card's image of the contact sheet, or nothing when there is none."""
    sheet = f"{PREVIEWS}/{SHEET_NAME}"
    return f"![Samples with their labels]({sheet})\n" if sheet in paths else ""


def plots_markdown(paths: Sequence[str]) -> str:
    """The card's images of the label plots, one per label."""
    plots = [p for p in paths if Path(p).name.startswith("labels-")]
    return "".join(f"![{Path(p).stem}]({p})\n" for p in plots)
