"""A run of a recipe into OUT: take the lease, claim the directory, find which shards are committed
and intact, render the rest, finalize.

Resume, multi-GPU, ranks and Ray are all "run the shards not yet committed": this module finds
those shards; an executor decides where they run; finalize runs once all are committed.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from synthgen.errors import SynthgenError
from synthgen.output.lock import Lease, hold
from synthgen.output.outdir import MANIFEST, OutDir, files_in, writable_out
from synthgen.output.records import ShardRecord
from synthgen.plan import Plan, ShardTask
from synthgen.recipe.schema import Recipe
from synthgen.run.claim import DamagedRecord, check_fresh, claim_output, read_run_record
from synthgen.run.executors import make_executor, rank_share
from synthgen.run.finalize import finalize
from synthgen.run.launch import Execution, rank_in_world
from synthgen.run.ownership import finalize_paths, own_paths
from synthgen.run.planning import build_plan, plan_for_out
from synthgen.run.worker import WorkerFactory


@dataclass(frozen=True)
class RunState:
    done: list[ShardTask]
    todo: list[ShardTask]
    complete: bool  # every shard committed and intact, and everything finalize writes in place


def _hashes_match(out: OutDir, record: ShardRecord) -> bool:
    for path, digest in record.files.items():
        if not out.exists(path) or hashlib.sha256(out.read_bytes(path)).hexdigest() != digest:
            return False
    return True


def _intact(
    out: OutDir, name: str, record: ShardRecord | None, on_disk: dict[str, int], verify: bool
) -> bool:
    """Whether a committed shard's files are as its commit record says; a commit record that
    cannot be read (None), or whose files are lost, cut short or (`verify`) altered, is removed."""
    if record is None:
        intact = False
    elif verify or not record.sizes:  # records from before sizes were kept: hash
        intact = _hashes_match(out, record)
    else:
        intact = all(on_disk.get(path) == size for path, size in record.sizes.items())
    if not intact:
        out.remove(out.commit_path(name))
    return intact


def _finalized(out: OutDir, recipe: Recipe, tasks: list[ShardTask], on_disk: dict) -> bool:
    """Whether finalize's files are all there and the manifest lists this run's shards."""
    if not all(path in on_disk for path in finalize_paths(recipe, [t.split for t in tasks])):
        return False
    try:
        manifest = out.manifest()
    except SynthgenError:  # damaged: finalize writes it again
        return False
    return manifest.complete and [s.name for s in manifest.shards] == [t.name for t in tasks]


def run_state(
    out: OutDir,
    recipe: Recipe,
    tasks: list[ShardTask],
    verify: bool = False,
    listing: dict[str, dict] | None = None,
) -> RunState:
    """Split the plan into intact and to-do shards; a damaged shard is to do again, also in an
    OUT that was complete.

    A shard's files were complete when its commit record was written (they are renamed into
    place first), so what can go wrong later is a file lost or cut short: checking names and
    sizes from one listing catches that without reading terabytes. `verify` re-hashes every
    file, for damage that keeps the size. `listing`: OUT's `listing()`, if the caller has just
    taken one (on an object store, listing 10^4 shards' files is the check's main cost).
    """
    listing = out.listing() if listing is None else listing
    on_disk = files_in(listing)
    records = out.readable_commit_records(
        [task.name for task in tasks if out.commit_path(task.name) in on_disk], listing
    )
    done, todo = [], []
    for task in tasks:
        committed = task.name in records
        intact = committed and _intact(out, task.name, records[task.name], on_disk, verify)
        (done if intact else todo).append(task)
    if todo:
        out.remove(MANIFEST)  # a damaged shard: the dataset is not complete any more
    complete = not todo and _finalized(out, recipe, tasks, on_disk)
    return RunState(done=done, todo=todo, complete=complete)


@dataclass(frozen=True)
class RunResult:
    total: int
    rendered: int
    seconds: float
    already_complete: bool
    resumed_shards: int
    skipped_rows: int
    finalized: bool
    failed: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # the plan's (Plan.split_warnings)


def progress_bar(total: int, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, unit="img", desc="generating", file=sys.stderr,
        dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip


def check_rank(execution: Execution) -> None:
    """A rank outside the world would render nothing and exit 0: refused (the CLI checked its
    options and variables already; this guards an Execution made in code)."""
    if execution.ranked:
        rank_in_world(execution.rank, execution.world_size or 0, "RANK", "WORLD_SIZE")


def launch_id(execution: Execution, recipe: Recipe) -> str | None:
    """Ranks share OUT when they run the same recipe in a world of the same size (their shares
    are then disjoint, whoever launched them: torchrun, a SLURM array, jobs given --rank by
    hand); any other process is a second run. None: this process alone."""
    if not execution.ranked:
        return None
    return f"ranks-{execution.world_size}-{recipe.sha256()[:16]}"


def generate(
    recipe: Recipe,
    out_url: str,
    execution: Execution | None = None,
    *,
    overwrite: bool = False,
    verify: bool = False,
) -> RunResult:
    """Render every shard of `recipe` not yet committed in OUT; finalize once all are.

    `verify` re-hashes the committed shards (else names and sizes are checked), also of a
    complete OUT; `execution` says where the shards run (default: in this process, on the CPU).
    While it runs, OUT is leased to this run (or the ranks of its launch): another is refused.
    """
    execution = execution or Execution()
    check_rank(execution)
    # A t2i plan needs only the recipe: what it refuses (a split left empty) leaves no OUT behind.
    early = build_plan(recipe) if recipe.generation.mode == "t2i" else None
    out = writable_out(out_url)
    record = read_run_record(out)
    if record is None:  # read-only, before the lease writes anything into a folder not ours
        check_fresh(out, out.all_files())
    with hold(out, launch_id(execution, recipe)) as lease:
        if isinstance(record, DamagedRecord) and overwrite:
            plan = build_plan(recipe, check_images=True)  # nothing of the old run can be used
        elif early is not None and (overwrite or record is None):
            plan = early  # what plan_for_out would build: nothing earlier to keep
        else:
            plan = plan_for_out(out, recipe, fresh=overwrite)
        return _run(out, recipe, plan, execution, lease, overwrite=overwrite, verify=verify)


def _run(
    out: OutDir,
    recipe: Recipe,
    plan: Plan,
    execution: Execution,
    lease: Lease,
    *,
    overwrite: bool,
    verify: bool,
) -> RunResult:
    follower = execution.ranked and execution.rank != 0
    listing = claim_output(out, recipe, plan, overwrite=overwrite, follower=follower)
    tasks = plan.tasks
    skipped = len(plan.cohort.skipped) if plan.cohort is not None else 0
    if listing is None:  # the claim changed OUT
        listing = out.listing()  # removing leftovers changes nothing the resume check looks at
    if not execution.ranked:  # ranks leave them: another rank may be writing one right now
        own = own_paths(recipe, [t.name for t in tasks], [t.split for t in tasks])
        out.remove_temporaries(own.__contains__, files=list(files_in(listing)))
    state = run_state(out, recipe, tasks, verify=verify, listing=listing)
    if state.complete:
        return RunResult(
            plan.total, 0, 0.0, True, len(tasks), skipped, True, {}, plan.split_warnings()
        )
    mine = rank_share(tasks, execution.rank, execution.world_size) if execution.ranked else tasks
    todo = [task for task in mine if task in state.todo]
    started = time.perf_counter()
    share = sum(t.size for t in mine)
    with progress_bar(share, initial=share - sum(t.size for t in todo)) as bar:
        outcome = make_executor(WorkerFactory(plan, out.url), execution).run(todo, bar.update)
    seconds = time.perf_counter() - started
    rendered = sum(t.size for t in todo if t.name in outcome.committed)
    committed = out.committed_names()  # other ranks may have committed shards this one did not
    finalized = all(task.name in committed for task in tasks)
    lease.check()
    if finalized:
        finalize(out)
    return RunResult(
        plan.total,
        rendered,
        seconds,
        False,
        len(state.done),
        skipped,
        finalized,
        outcome.failed,
        plan.split_warnings(),
    )
