"""Claiming OUT for a recipe: a new run into an empty folder, a resume of the same recipe, a
larger run of the same corpus (which grows it: its shards stay), or (`--overwrite`) a run that
replaces another recipe's — removing only what that run's records say synthgen wrote, and never
writing where a user's file is.

The run record is written before recipe.yaml, so whatever a kill leaves is accounted for: with no
run record, only the temporary of one (or a lease) can be in OUT; with one, everything synthgen
writes is named by it. The previous run's record is replaced, not removed, so an overwrite killed
half way is finished by running it again.
"""

from __future__ import annotations

import time

from synthgen.errors import OutputError, SynthgenError
from synthgen.output.outdir import (
    LEASES,
    MANIFEST,
    RECIPE,
    RUN_RECORD,
    STATE,
    OutDir,
    files_in,
    final_name,
    is_temporary,
)
from synthgen.output.records import RunRecord
from synthgen.plan import PLAN_VERSION, Plan
from synthgen.recipe.schema import Recipe
from synthgen.run.linkage import write_linkage
from synthgen.run.ownership import own_paths, recorded_ownership

# A claim killed before its run record was in place leaves at most a temporary of these (the
# second: an older synthgen wrote recipe.yaml first).
CLAIM_LEFTOVERS = (RUN_RECORD, RECIPE)
RANK_WAIT_S = 600.0  # ranks other than 0 wait this long for rank 0 to replace another recipe's run


class DamagedRecord:
    """A run record that exists but cannot be read: only --overwrite goes past it."""

    def __init__(self, error: SynthgenError):
        self.error = error


def read_run_record(out: OutDir) -> RunRecord | DamagedRecord | None:
    try:
        return out.run_record()
    except SynthgenError as error:
        return DamagedRecord(error)


def check_fresh(out: OutDir, files: list[str]) -> None:
    """An OUT without a run record may hold only what a killed claim leaves and leases: a
    user's README.md, a recipe kept as recipe.yaml, or a home folder given by mistake is refused."""
    foreign = [
        path for path in files
        if not (is_temporary(path) and final_name(path) in CLAIM_LEFTOVERS)
        and not path.startswith(f"{LEASES}/")
    ]  # fmt: skip
    if any(path.startswith(f"{STATE}/") for path in foreign):  # commit records, packs, logs
        raise OutputError(
            f"holds a synthgen run whose run record ({RUN_RECORD}) is gone: without it synthgen "
            "cannot tell its files from anyone else's, so it writes nothing here, not with "
            "--overwrite either; move the folder away or choose another directory",
            file=out.url,
        )
    if foreign:
        raise OutputError(
            f"is not empty and holds files synthgen did not write (e.g. {foreign[0]}); choose "
            "an empty or new directory",
            file=out.url,
        )


def claim_output(
    out: OutDir, recipe: Recipe, plan: Plan, overwrite: bool = False, *, follower: bool = False
) -> dict[str, dict] | None:
    """OUT must be empty, hold a run of this very recipe (which then resumes), or, with
    `overwrite`, a run of another recipe (or a damaged run record).

    `follower`: a rank other than 0, which leaves replacing another recipe's run to rank 0 and
    waits for it, so no rank removes what another has already rendered.
    Returns OUT's `listing()` where the claim wrote and removed nothing (a resume of this very
    recipe), so the resume check need not list 10^4 shards' files again; else None.
    """
    # Listed before the record is read: a file a rank claiming at the same time wrote after its
    # run record is then seen together with that record.
    listing = out.listing()
    files = sorted(files_in(listing))
    record = read_run_record(out)
    same_recipe = isinstance(record, RunRecord) and record.recipe_sha256 == recipe.sha256()
    if same_recipe and plan.tasks == record.tasks:
        if out.exists(RECIPE):
            return listing
        out.write_atomic(RECIPE, recipe.shareable().to_yaml().encode())  # killed before it
        return None
    if record is None:
        check_fresh(out, files)
    elif not overwrite:
        if isinstance(record, DamagedRecord):
            raise record.error
        if grows(record, recipe, plan):  # a larger recipe, or the same one over an i2i cohort grown
            grow(out, recipe, plan)
            return None
        raise OutputError(
            "holds a run of a different recipe; pass --overwrite to replace it, or choose another "
            "output directory (a corpus grows only by num_samples (t2i), per_cell (balance), or "
            "strengths appended, repeats raised and rows added at the manifest's end (i2i))",
            file=out.url,
        )
    elif follower:
        wait_for_rank_zero(out, recipe)
        return None
    else:
        clear_previous_run(out, files, recipe, plan)
    if recipe.privacy is not None:
        write_linkage(plan, recipe.privacy.linkage, out)
    write_run(out, recipe, plan)
    return None


def grow(out: OutDir, recipe: Recipe, plan: Plan) -> None:
    """Plan the new samples after the committed ones; OUT is not complete until they are."""
    out.remove(MANIFEST)  # finalize writes it again for the whole corpus
    if recipe.privacy is not None:  # the new keys' sources, beside the old ones
        write_linkage(plan, recipe.privacy.linkage, out)
    write_run(out, recipe, plan)


def grows(record: RunRecord, recipe: Recipe, plan: Plan) -> bool:
    """True when `plan` is `record`'s corpus grown: every recorded shard is planned as it was
    (for i2i also the same rows, strengths and noise at every recorded index)."""
    same = record.corpus_sha256 == recipe.corpus_sha256() and record.plan_version == PLAN_VERSION
    kept = plan.layout_sha256(record.layout_size) == record.layout_sha256
    return same and kept and plan.tasks[: len(record.tasks)] == record.tasks


def write_run(out: OutDir, recipe: Recipe, plan: Plan) -> None:
    """The run record first, then recipe.yaml (see the module docstring)."""
    skipped = plan.cohort.skipped if plan.cohort is not None else []
    record = RunRecord(
        recipe.sha256(), plan.tasks, skipped, recipe.corpus_sha256(), blocks=plan.blocks,
        layout_sha256=plan.layout_sha256(), layout_size=plan.total if plan.i2i else 0,
        parts=plan.parts,
    )  # fmt: skip
    out.write_atomic(RUN_RECORD, record.to_json())
    out.write_atomic(RECIPE, recipe.shareable().to_yaml().encode())


def clear_previous_run(out: OutDir, files: list[str], recipe: Recipe, plan: Plan) -> None:
    """Remove what the previous run's records say synthgen wrote, manifest.json first (OUT stops
    saying it is complete), recipe.yaml last; its run record stays until the new one replaces
    it. A user's file where this run will write is refused; any other is left where it is."""
    previous = recorded_ownership(out, files)
    coming = own_paths(recipe, [t.name for t in plan.tasks], [t.split for t in plan.tasks])
    in_the_way = [path for path in files if path not in previous and path in coming]
    if in_the_way:
        raise OutputError(
            f"holds {in_the_way[0]}, which synthgen did not write, where this run writes; move "
            "it away and run again",
            file=out.url,
        )
    ours = [
        path for path in files
        if path in previous and path != RUN_RECORD and not path.startswith(f"{LEASES}/")
    ]  # fmt: skip
    for path in sorted(ours, key=lambda path: (path != MANIFEST, path == RECIPE)):
        out.remove(path)


def wait_for_rank_zero(out: OutDir, recipe: Recipe) -> None:
    deadline = time.monotonic() + RANK_WAIT_S
    while time.monotonic() < deadline:
        record = read_run_record(out)
        if isinstance(record, RunRecord) and record.recipe_sha256 == recipe.sha256():
            return
        time.sleep(1.0)
    raise OutputError(
        f"rank 0 did not replace the other recipe's run within {RANK_WAIT_S:g} s; start rank 0 "
        "too (it alone removes the old run), or run once with --overwrite without ranks",
        file=out.url,
    )
