"""Finalize: once every shard is committed, write the previews, the card, the wids indexes and,
last of all, `manifest.json` — the file that says OUT is complete.

Idempotent and driven only by what is in OUT (the recipe as run, the run, commit and model
records), so `synthgen finalize OUT` can redo it at any time, from any process. No image byte is
read but those the contact sheet shows.
"""

from __future__ import annotations

from synthgen.errors import OutputError
from synthgen.output.card import SHEET, CardInputs, render_card
from synthgen.output.label_summary import labels_markdown
from synthgen.output.manifest import (
    build_manifest,
    committed_in_order,
    label_encodings,
    merged_cells,
    merged_label_stats,
)
from synthgen.output.outdir import (
    AUDIT_SECTION,
    CARD,
    COMMITS,
    MANIFEST,
    PARQUET,
    PREVIEWS,
    WEBDATASET,
    OutDir,
)
from synthgen.output.read import ShardReader
from synthgen.output.records import Manifest, ShardEntry
from synthgen.output.wids_index import write_wids_index
from synthgen.preview.plots import label_plots
from synthgen.preview.sheet import contact_sheet, png_bytes, sample_committed
from synthgen.recipe.label_stats import LabelStats
from synthgen.recipe.schema import Recipe


def finalize(out: OutDir) -> Manifest:
    """Write everything derived from the committed shards; returns the manifest."""
    recipe = out.recipe()
    run = out.run_record()
    if run is None:
        raise OutputError("no run record: this is not a synthgen output directory", file=out.url)
    try:
        shards = committed_in_order(run.tasks, out.committed_records())
    except OutputError as error:
        raise OutputError(error.message, file=out.url) from None
    # Shard leftovers only: another rank may be finalizing too, with its own README tmp file.
    out.remove_temporaries((f"{WEBDATASET}/", f"{PARQUET}/", f"{COMMITS}/"))
    reader = ShardReader(out, label_encodings(recipe))
    stats = merged_label_stats(recipe, shards, reader)
    manifest = build_manifest(recipe, run, shards, out.model_record())
    previews = write_previews(out, recipe, reader, manifest.shards, stats)
    audit = out.read_text(AUDIT_SECTION) if out.exists(AUDIT_SECTION) else None
    table = labels_markdown(recipe, stats, merged_cells(shards))
    card = render_card(CardInputs(recipe, manifest, table, previews, audit))
    out.write_atomic(CARD, card.encode())
    if "webdataset" in recipe.output.formats:
        write_wids_index(out, manifest)
    out.write_atomic(MANIFEST, manifest.to_json())  # last: it is what says OUT is complete
    return manifest


def write_previews(
    out: OutDir,
    recipe: Recipe,
    reader: ShardReader,
    shards: list[ShardEntry],
    stats: dict[str, LabelStats],
) -> list[str]:
    """The contact sheet (16 committed samples) and the label plots; paths relative to OUT."""
    sheet = contact_sheet(sample_committed(reader, recipe, shards))
    out.write_atomic(SHEET, png_bytes(sheet))
    plots = label_plots(recipe, stats, OutDir(out.url.rstrip("/") + f"/{PREVIEWS}"))
    return [SHEET, *(f"{PREVIEWS}/{name}" for name in plots)]
