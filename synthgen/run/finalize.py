"""Finalize: once every shard is committed, write the previews, the card, the wids indexes and,
last of all, `manifest.json` — the file that says OUT is complete.

The manifest is removed before anything else is written, so from the first write to the last OUT
does not say it is complete: a kill at any instant leaves an OUT the next run finalizes again (two
ranks finalizing at once write the same bytes). Idempotent and driven only by what is in OUT (the
recipe as run, the run, commit and model records), so `synthgen finalize OUT` can redo it at any
time. No image byte is read but those the contact sheet shows.
"""

from __future__ import annotations

from synthgen.errors import OutputError
from synthgen.output.card import SHEET, CardInputs, render_card
from synthgen.output.croissant import croissant_bytes
from synthgen.output.label_summary import labels_markdown
from synthgen.output.lock import hold
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
    CROISSANT,
    MANIFEST,
    PARQUET,
    PREVIEWS,
    WEBDATASET,
    OutDir,
    files_in,
    writable_out,
)
from synthgen.output.read import ShardReader
from synthgen.output.records import Manifest, ShardEntry
from synthgen.output.wids_index import write_wids_index
from synthgen.preview.plots import label_plots
from synthgen.preview.sheet import contact_sheet, png_bytes, sample_committed
from synthgen.recipe.label_stats import LabelStats
from synthgen.recipe.schema import Recipe
from synthgen.run.ownership import own_paths, recorded_ownership

PROGRESS_FROM = 500  # shards: reading that many commit records shows a progress bar


def finalize(out: OutDir, audit_section: str | None = None) -> Manifest:
    """Write everything derived from the committed shards (with `audit_section`, the audit's
    card section first); returns the manifest."""
    recipe = out.recipe()
    run = out.run_record()
    if run is None:
        raise OutputError("no run record: this is not a synthgen output directory", file=out.url)
    listing = out.listing()  # one listing for the records and the leftovers
    try:
        records = out.committed_records(len(run.tasks) >= PROGRESS_FROM, listing)
        shards = committed_in_order(run.tasks, records)
    except OutputError as error:
        raise OutputError(error.message, file=out.url) from None
    model = out.model_record()  # every record is read before a complete OUT stops saying so
    out.remove(MANIFEST)  # from here until the last write, OUT says it is not complete
    if audit_section is not None:
        out.write_atomic(AUDIT_SECTION, audit_section.encode())
    # Shard leftovers only: another rank may be finalizing too, with its own README tmp file.
    own = own_paths(recipe, [t.name for t in run.tasks], [t.split for t in run.tasks])
    shard_folders = (f"{WEBDATASET}/", f"{PARQUET}/", f"{COMMITS}/")
    out.remove_temporaries(own.__contains__, shard_folders, list(files_in(listing)))
    reader = ShardReader(out, label_encodings(recipe))
    stats = merged_label_stats(recipe, shards, reader)
    manifest = build_manifest(recipe, run, shards, model)
    previews = write_previews(out, recipe, reader, manifest.shards, stats)
    audit = out.read_text(AUDIT_SECTION) if out.exists(AUDIT_SECTION) else None
    table = labels_markdown(recipe, stats, merged_cells(shards))
    card = render_card(CardInputs(recipe, manifest, table, previews, audit))
    out.write_atomic(CARD, card.encode())
    if "webdataset" in recipe.output.formats:
        write_wids_index(out, manifest)
    if "parquet" in recipe.output.formats:
        out.write_atomic(CROISSANT, croissant_bytes(recipe, manifest))
    out.write_atomic(MANIFEST, manifest.to_json())  # last: it is what says OUT is complete
    return manifest


def finalize_alone(url: str, audit_section: str | None = None) -> Manifest:
    """`synthgen finalize` (and the audit's card section): under the lease, so it is refused
    while a run writes into OUT, and then alone in OUT, so every leftover of synthgen's goes."""
    out = writable_out(url, create=False)
    out.recipe()  # not an output directory: refused before the lease writes into it
    with hold(out):
        out.remove_temporaries(recorded_ownership(out, out.all_files()).__contains__)
        return finalize(out, audit_section)


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
