"""Which files of OUT are synthgen's, by its own records: the one answer to what a run may clean up,
what `--overwrite` may remove and what a run may write over.

A file is synthgen's when the layout's fixed names, the run record's shard list or the recipe as
run (its labels and splits) say synthgen writes it there, or when it is a temporary of such a file
(the exact rule of `outdir.is_temporary`). Anything else in OUT is the user's: synthgen never
removes it and never writes over it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from synthgen.errors import SynthgenError
from synthgen.output.card import SHEET
from synthgen.output.outdir import (
    AUDIT_SECTION,
    CARD,
    COMMIT_FILE,
    COMMITS,
    CROISSANT,
    LEASES,
    LOGS,
    MANIFEST,
    MODEL_RECORD,
    PACKS,
    PREVIEWS,
    RECIPE,
    RUN_RECORD,
    WIDS_INDEX,
    OutDir,
    final_name,
    shard_files,
)
from synthgen.output.record_packs import PACK
from synthgen.preview.plots import plot_name
from synthgen.recipe.schema import Recipe

FIXED = (CARD, RECIPE, MANIFEST, RUN_RECORD, MODEL_RECORD, AUDIT_SECTION, SHEET)
_BY_PATTERN = re.compile(
    rf"{re.escape(LOGS)}/worker-(r\d+-)?\d+\.log"  # the pool's worker logs
    rf"|{re.escape(LEASES)}/[0-9a-f]{{12}}\.json"  # synthgen.output.lock
    rf"|{re.escape(PACKS)}/{PACK.pattern}"  # synthgen.output.record_packs
)


def finalize_paths(recipe: Recipe, splits: Iterable[str]) -> list[str]:
    """Every file finalize writes, in the order it writes them (`splits` in plan order), with
    manifest.json last."""
    paths = [SHEET, *(f"{PREVIEWS}/{plot_name(label)}" for label in recipe.labels), CARD]
    if "webdataset" in recipe.output.formats:
        paths += [WIDS_INDEX.format(split=split) for split in dict.fromkeys(splits)]
    if "parquet" in recipe.output.formats:
        paths.append(CROISSANT)
    return [*paths, MANIFEST]


@dataclass(frozen=True)
class Ownership:
    paths: frozenset[str]

    def __contains__(self, relative: object) -> bool:
        name = final_name(str(relative))
        return name in self.paths or _BY_PATTERN.fullmatch(name) is not None


def own_paths(
    recipe: Recipe | None, shard_names: Iterable[str], splits: Iterable[str]
) -> Ownership:
    """What a run of `recipe` with these shards writes into OUT (no recipe: its fixed names and
    shards only)."""
    splits = set(splits)
    paths = set(FIXED) | {WIDS_INDEX.format(split=split) for split in splits}
    for name in shard_names:
        paths |= {f"{COMMITS}/{name}.json", *shard_files(name)}
    if recipe is not None:
        paths |= set(finalize_paths(recipe, splits))
    return Ownership(frozenset(paths))


def recorded_ownership(out: OutDir, files: Iterable[str]) -> Ownership:
    """What OUT's own records say synthgen wrote there. A record that cannot be read adds
    nothing: a damaged run record leaves the shards named by their commit records, a damaged
    recipe.yaml leaves the label plots (which are then kept)."""
    try:
        run = out.run_record()
    except SynthgenError:
        run = None
    try:
        recipe = out.recipe() if out.exists(RECIPE) else None
    except SynthgenError:
        recipe = None
    names = {match.group(1) for path in files if (match := COMMIT_FILE.fullmatch(path))}
    splits: set[str] = set(recipe.splits) if recipe is not None else set()
    if run is not None:
        names |= {task.name for task in run.tasks}
        splits |= {task.split for task in run.tasks}
    return own_paths(recipe, names, splits)
