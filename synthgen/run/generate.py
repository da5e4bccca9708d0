"""A run of a recipe into OUT: claim the directory, find what is already committed, render the rest.

Resume, multi-GPU, ranks and Ray are all "run the shards not yet committed": this module finds
those shards; an executor decides where they run; finalize runs once all are committed.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from synthgen.errors import OutputError
from synthgen.output.outdir import MANIFEST, OWN_PATHS, RECIPE, RUN_RECORD, OutDir, final_name
from synthgen.output.records import RunRecord, ShardRecord
from synthgen.plan import PLAN_VERSION, Plan, ShardTask
from synthgen.recipe.schema import Recipe
from synthgen.run.executors import make_executor, rank_share
from synthgen.run.finalize import finalize
from synthgen.run.launch import Execution
from synthgen.run.linkage import write_linkage
from synthgen.run.planning import plan_for_out
from synthgen.run.worker import WorkerFactory


@dataclass(frozen=True)
class RunState:
    done: list[ShardTask]
    todo: list[ShardTask]
    complete: bool  # every shard committed and the manifest written


def claim_output(out: OutDir, recipe: Recipe, plan: Plan, overwrite: bool = False) -> None:
    """OUT must be empty, or hold a run of this very recipe (which then resumes), or a smaller
    run of the same corpus (which then grows: its shards stay, the new ones are planned after)."""
    record = out.run_record()
    if record is not None and record.recipe_sha256 == recipe.sha256():
        return
    if record is not None and not overwrite and _grows(record, recipe, plan):
        out.remove(MANIFEST)  # no longer complete: finalize writes it again for the whole corpus
        _write_run(out, recipe, plan)
        return
    if record is not None and not overwrite:
        grown = "; a corpus grows only by num_samples (t2i), per_cell (balance), or strengths "
        grown += "appended and repeats raised (i2i, with the same cohort rows)"
        raise OutputError(
            "holds a run of a different recipe; pass --overwrite to replace it, "
            f"or choose another output directory{grown}",
            file=out.url,
        )
    # a kill during an earlier claim can leave recipe.yaml.tmp-*: ours too
    foreign = [p for p in out.all_files() if final_name(p.split("/")[0]) not in OWN_PATHS]
    if foreign:
        raise OutputError(
            f"is not empty and holds files synthgen did not write (e.g. {foreign[0]}); "
            "choose an empty or new directory",
            file=out.url,
        )
    if overwrite:
        for relative in OWN_PATHS:
            out.remove(relative)
    # Nothing else is removed: ranks started together all claim OUT at once, with the same bytes.
    if recipe.privacy is not None:
        write_linkage(plan, recipe.privacy.linkage, out)
    _write_run(out, recipe, plan)


def _grows(record: RunRecord, recipe: Recipe, plan: Plan) -> bool:
    """True when `plan` is `record`'s corpus grown: every recorded shard is planned as it was."""
    same = record.corpus_sha256 == recipe.corpus_sha256() and record.plan_version == PLAN_VERSION
    kept = plan.layout_sha256(record.layout_size) == record.layout_sha256  # i2i rows and noise
    return same and kept and plan.tasks[: len(record.tasks)] == record.tasks


def _write_run(out: OutDir, recipe: Recipe, plan: Plan) -> None:
    out.write_atomic(RECIPE, recipe.shareable().to_yaml().encode())
    skipped = plan.cohort.skipped if plan.cohort is not None else []
    record = RunRecord(
        recipe.sha256(), plan.tasks, skipped, recipe.corpus_sha256(), blocks=plan.blocks,
        layout_sha256=plan.layout_sha256(), layout_size=plan.total if plan.i2i else 0,
    )  # fmt: skip
    out.write_atomic(RUN_RECORD, record.to_json())


def _hashes_match(out: OutDir, record: ShardRecord) -> bool:
    for path, digest in record.files.items():
        if not out.exists(path) or hashlib.sha256(out.read_bytes(path)).hexdigest() != digest:
            return False
    return True


def run_state(out: OutDir, tasks: list[ShardTask], verify: bool = False) -> RunState:
    """Split the plan into committed and to-do shards; a damaged shard is to do again.

    A shard's files were complete when its commit record was written (they are renamed into
    place first), so what can go wrong later is a file lost or cut short: checking names and
    sizes from one listing catches that without reading terabytes. `verify` re-hashes every
    file, for damage that keeps the size.
    """
    records = out.committed_records()
    if out.exists(MANIFEST) and all(t.name in records for t in tasks):
        return RunState(done=list(tasks), todo=[], complete=True)
    on_disk = out.file_sizes()
    done, todo = [], []
    for task in tasks:
        record = records.get(task.name)
        if record is None:
            intact = False
        elif verify or not record.sizes:  # records from before sizes were kept: hash
            intact = _hashes_match(out, record)
        else:
            intact = all(on_disk.get(path) == size for path, size in record.sizes.items())
        if intact:
            done.append(task)
        else:
            if record is not None:
                out.remove(out.commit_path(task.name))
            todo.append(task)
    if todo:
        out.remove(MANIFEST)  # a damaged shard: the dataset is not complete any more
    return RunState(done=done, todo=todo, complete=False)


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


def progress_bar(total: int, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, unit="img", desc="generating", file=sys.stderr,
        dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip


def generate(
    recipe: Recipe,
    out_url: str,
    execution: Execution | None = None,
    *,
    overwrite: bool = False,
    verify: bool = False,
) -> RunResult:
    """Render every shard of `recipe` not yet committed in OUT; finalize once all are.

    `verify` re-hashes the committed shards before resuming (else names and sizes are checked);
    `execution` says where the shards run (default: in this process, on the CPU).
    """
    execution = execution or Execution()
    out = OutDir(out_url)
    plan = plan_for_out(out, recipe, fresh=overwrite)
    claim_output(out, recipe, plan, overwrite=overwrite)
    tasks = plan.tasks
    skipped = len(plan.cohort.skipped) if plan.cohort is not None else 0
    state = run_state(out, tasks, verify=verify)
    if state.complete:
        return RunResult(plan.total, 0, 0.0, True, len(tasks), skipped, True, {})
    if not execution.ranked:
        out.remove_temporaries()  # ranks leave them: another rank may be writing one right now
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
    if finalized:
        finalize(out)
    return RunResult(
        plan.total, rendered, seconds, False, len(state.done), skipped, finalized, outcome.failed
    )
