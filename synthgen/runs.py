"""A run of a recipe into OUT: claim the directory, find what is already committed, render the rest.

Resume, multi-GPU and Ray are all "run the shards not yet committed": this module finds those
shards; an executor decides where they run.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from synthgen.card import finalize, read_recipe
from synthgen.errors import OutputError, RecipeError
from synthgen.outdir import COMMITS, OutDir
from synthgen.plan import ShardTask, plan_shards
from synthgen.recipe import Recipe

OWN_PATHS = ("README.md", "recipe.yaml", "manifest.json", "webdataset", "parquet", "previews",
             ".synthgen")  # fmt: skip


@dataclass(frozen=True)
class RunState:
    done: list[ShardTask]
    todo: list[ShardTask]
    complete: bool  # every shard committed and the manifest written


def claim_output(out: OutDir, recipe: Recipe, overwrite: bool = False) -> None:
    """OUT must be empty, or hold a run of this very recipe (which then resumes)."""
    if out.exists("recipe.yaml"):
        try:
            same = read_recipe(out).sha256() == recipe.sha256()
        except RecipeError:
            same = False
        if same:
            return
        if not overwrite:
            raise OutputError(
                "holds a run of a different recipe; pass --overwrite to replace it, "
                "or choose another output directory",
                file=out.url,
            )
    foreign = [p for p in out.all_files() if p.split("/")[0] not in OWN_PATHS]
    if foreign:
        raise OutputError(
            f"is not empty and holds files synthgen did not write (e.g. {foreign[0]}); "
            "choose an empty or new directory",
            file=out.url,
        )
    if overwrite:
        for relative in OWN_PATHS:
            out.remove(relative)
    out.write_atomic("recipe.yaml", recipe.to_yaml().encode())


def _intact(out: OutDir, record: dict) -> bool:
    for path, digest in record["files"].items():
        if not out.exists(path) or hashlib.sha256(out.read_bytes(path)).hexdigest() != digest:
            return False
    return True


def run_state(out: OutDir, recipe: Recipe, tasks: list[ShardTask], verify: bool = True) -> RunState:
    """Split the plan into committed and to-do shards; a damaged shard is to do again."""
    records = out.committed_records()
    manifest_ok = out.exists("manifest.json") and all(t.name in records for t in tasks)
    if manifest_ok:
        return RunState(done=list(tasks), todo=[], complete=True)
    done, todo = [], []
    for task in tasks:
        record = records.get(task.name)
        if record is not None and (not verify or _intact(out, record)):
            done.append(task)
        else:
            if record is not None:
                out.remove(f"{COMMITS}/{task.name}.json")
            todo.append(task)
    return RunState(done=done, todo=todo, complete=False)


@dataclass(frozen=True)
class RunResult:
    total: int
    rendered: int
    seconds: float
    already_complete: bool
    resumed_shards: int


def generate(recipe: Recipe, out_url: str, *, device: str, overwrite: bool = False) -> RunResult:
    """Render every shard of `recipe` not yet committed in OUT, then finalize."""
    from synthgen.executors import progress_bar, run_in_process

    out = OutDir(out_url)
    claim_output(out, recipe, overwrite=overwrite)
    tasks = plan_shards(recipe)
    state = run_state(out, recipe, tasks)
    total = sum(t.size for t in tasks)
    if state.complete:
        return RunResult(total, 0, 0.0, True, len(state.done))
    out.remove_temporaries()
    done = sum(t.size for t in state.done)
    started = time.perf_counter()
    with progress_bar(total, initial=done) as bar:
        run_in_process(recipe, out, state.todo, device, bar)
    seconds = time.perf_counter() - started
    finalize(out, tasks)
    return RunResult(total, total - done, seconds, False, len(state.done))
