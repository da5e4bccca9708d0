"""Executors decide which worker renders which shard; they know nothing about images.

- in process: one worker, shard after shard (one device, or a rank of torchrun/SLURM);
- local pool: one spawned process per device slot, pulling shards from a shared queue;
- Ray: one actor per GPU (or CPU slot) on an existing or local cluster.
A failed shard is retried up to `max_retries` times; the others carry on meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from synthgen.outdir import OutDir
from synthgen.plan import Plan, ShardTask

log = logging.getLogger("synthgen")


@dataclass
class Outcome:
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> last error


def progress_bar(total: int, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, unit="img", desc="generating", file=sys.stderr,
        dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip


def _short_error(exc: BaseException) -> str:
    from synthgen.errors import SynthgenError

    if isinstance(exc, SynthgenError):
        return exc.describe()
    return f"{exc.__class__.__name__}: {exc}"


def run_in_process(
    plan: Plan, out: OutDir, tasks: Sequence[ShardTask], device: str, bar: tqdm, max_retries: int
) -> Outcome:
    """One worker in this process, shard after shard."""
    from synthgen.worker import Worker

    outcome = Outcome()
    if not tasks:
        return outcome
    worker = Worker(plan, out, device)
    for task in tasks:
        for attempt in range(max_retries + 1):
            shown = []
            try:
                worker.run_shard(
                    task, progress=lambda n, shown=shown: (shown.append(n), bar.update(n))
                )
            except Exception as exc:  # noqa: BLE001 - any failure of a shard is retried, then reported
                outcome.failed[task.name] = _short_error(exc)
                log.warning("shard %s failed (attempt %d): %s", task.name, attempt + 1, exc)
                bar.update(-sum(shown))
                continue
            outcome.failed.pop(task.name, None)
            outcome.committed.append(task.name)
            break
    return outcome


def rank_share(tasks: Sequence[ShardTask], rank: int, world_size: int) -> list[ShardTask]:
    """Shards for one of `world_size` independent processes: every world_size-th from `rank`."""
    return [task for i, task in enumerate(tasks) if i % world_size == rank]


def launcher_rank() -> tuple[int, int] | None:
    """(rank, world size) from torchrun/accelerate or a SLURM array job, if launched by one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return None


# --- local pool -------------------------------------------------------------------------------


def _pool_worker(slot, device, parent, plan, out_url, tasks, todo, events, log_dir, log_prefix):
    """Body of one spawned worker process: pull shard indices until told to stop."""
    if log_dir:
        logging.basicConfig(
            filename=str(Path(log_dir) / f"worker-{log_prefix}{slot}.log"), level=logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
        )  # fmt: skip
    from synthgen.worker import Worker

    try:
        worker = Worker(plan, OutDir(out_url), device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put(("dead", slot, None, _short_error(exc)))
        return
    log.info("worker %d ready on %s", slot, device)
    while True:
        try:
            index = todo.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed: stop rather than render on
                return
            continue
        if index is None or os.getppid() != parent:
            return
        task = tasks[index]
        events.put(("start", slot, index, None))
        try:
            worker.run_shard(task, progress=lambda n, i=index: events.put(("progress", slot, i, n)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which retries
            log.error("shard %s failed:\n%s", task.name, traceback.format_exc())
            events.put(("failed", slot, index, _short_error(exc)))
        else:
            log.info("shard %s committed", task.name)
            events.put(("done", slot, index, None))


def run_local_pool(
    plan: Plan,
    out: OutDir,
    tasks: Sequence[ShardTask],
    devices: Sequence[str],
    bar: tqdm,
    max_retries: int,
    log_dir: str | None = None,
    log_prefix: str = "",
) -> Outcome:
    """One spawned process per entry of `devices`; a shared queue hands out shards."""
    outcome = Outcome()
    if not tasks:
        return outcome
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    todo, events = context.Queue(), context.Queue()
    tasks = list(tasks)
    for index in range(len(tasks)):
        todo.put(index)
    processes = [
        context.Process(
            target=_pool_worker,
            args=(
                slot,
                device,
                os.getpid(),
                plan,
                out.url,
                tasks,
                todo,
                events,
                log_dir,
                log_prefix,
            ),
            daemon=True,
        )  # fmt: skip
        for slot, device in enumerate(devices)
    ]
    start_errors: list[str] = []
    for process in processes:
        process.start()
    attempts = [0] * len(tasks)
    shown = [0] * len(tasks)  # images of the current attempt already on the progress bar
    running: dict[int, int] = {}  # slot -> task index
    remaining = len(tasks)

    def retry_or_fail(index: int, error: str) -> None:
        nonlocal remaining
        bar.update(-shown[index])
        shown[index] = 0
        attempts[index] += 1
        outcome.failed[tasks[index].name] = error
        if attempts[index] <= max_retries:
            todo.put(index)
        else:
            remaining -= 1

    try:
        while remaining:
            try:
                kind, slot, index, payload = events.get(timeout=1.0)
            except queue.Empty:
                for slot, process in enumerate(processes):
                    if not process.is_alive() and process.exitcode not in (None, 0):
                        if slot in running:  # it died mid-shard (killed, out of memory, …)
                            error = f"worker process died (exit code {process.exitcode})"
                            retry_or_fail(running.pop(slot), error)
                if not any(p.is_alive() for p in processes):
                    break
                continue
            if kind == "start":
                running[slot] = index
            elif kind == "progress":
                shown[index] += payload
                bar.update(payload)
            elif kind == "done":
                running.pop(slot, None)
                outcome.failed.pop(tasks[index].name, None)
                outcome.committed.append(tasks[index].name)
                remaining -= 1
            elif kind == "failed":
                running.pop(slot, None)
                retry_or_fail(index, payload)
            elif kind == "dead":
                log.error("worker %d could not start: %s", slot, payload)
                start_errors.append(payload)
    finally:
        for _ in processes:
            todo.put(None)
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    reason = start_errors[0] if start_errors else "no worker was left to take it"
    for task in tasks:
        if task.name not in outcome.committed and task.name not in outcome.failed:
            outcome.failed[task.name] = f"not rendered: {reason}"
    return outcome


# --- Ray ---------------------------------------------------------------------------------------


class _RayShardWorker:
    """A Ray actor holding one Worker (so one pipeline load per GPU) for many shards."""

    def __init__(self, plan: Plan, out_url: str, device: str):
        from synthgen.worker import Worker

        self.worker = Worker(plan, OutDir(out_url), device)

    def run(self, task: ShardTask) -> int:
        return self.worker.run_shard(task).count


def run_ray(
    plan: Plan,
    out: OutDir,
    tasks: Sequence[ShardTask],
    bar: tqdm,
    max_retries: int,
    address: str | None = None,
    cpu_actors: int | None = None,
) -> Outcome:
    """One actor per GPU of the cluster (or `cpu_actors` CPU actors when it has none)."""
    import ray

    outcome = Outcome()
    if not tasks:
        return outcome
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=cpu_actors or os.cpu_count(), log_to_driver=False, include_dashboard=False
            )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        actor_class = ray.remote(num_gpus=1)(_RayShardWorker)
        actors = [actor_class.remote(plan, out.url, "cuda") for _ in range(gpus)]
    else:
        count = cpu_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Actors on other nodes do not inherit this environment: hand the thread count over.
        threads = {"SYNTHGEN_CPU_THREADS": os.environ.get("SYNTHGEN_CPU_THREADS", "1")}
        actor_class = ray.remote(num_cpus=1, runtime_env={"env_vars": threads})(_RayShardWorker)
        actors = [actor_class.remote(plan, out.url, "cpu") for _ in range(count)]
    pending = list(range(len(tasks)))
    attempts = [0] * len(tasks)
    running = {}  # object ref -> (actor, task index)
    idle = list(actors)
    while pending or running:
        while pending and idle:
            actor, index = idle.pop(), pending.pop(0)
            running[actor.run.remote(tasks[index])] = (actor, index)
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, index = running.pop(ready[0])
        try:
            bar.update(ray.get(ready[0]))
        except ray.exceptions.RayActorError as exc:  # the actor died: replace it
            attempts[index] += 1
            outcome.failed[tasks[index].name] = f"Ray actor died: {exc.__class__.__name__}"
            actor = actor_class.remote(plan, out.url, "cuda" if gpus else "cpu")
        except Exception as exc:  # noqa: BLE001 - a RayTaskError wraps the shard's own error
            attempts[index] += 1
            cause = getattr(exc, "cause", None) or exc
            outcome.failed[tasks[index].name] = _short_error(cause)
        else:
            outcome.failed.pop(tasks[index].name, None)
            outcome.committed.append(tasks[index].name)
        if tasks[index].name in outcome.failed and attempts[index] <= max_retries:
            pending.append(index)
        idle.append(actor)
    return outcome
