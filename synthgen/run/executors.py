"""Executors decide which worker renders which shard; they know nothing about images.

All three share one signature, `run(tasks, progress) -> Outcome`, are picked by one table from
the `Execution`, and get the worker as a factory (device -> worker) they call where it runs:
- in process: one worker, shard after shard (one device, or a rank of torchrun/SLURM);
- local pool: one spawned process per device slot, pulling shards from a shared queue;
- Ray: one actor per GPU (or CPU slot) on an existing or local cluster.
A failed shard is retried up to `max_retries` times by one rule (`Attempts`); the others carry on.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from synthgen.errors import SynthgenError
from synthgen.output.records import ShardRecord
from synthgen.plan import ShardTask
from synthgen.run.launch import Execution

log = logging.getLogger("synthgen")
Progress = Callable[[int], None]  # images rendered (+n), or taken back when a shard fails (-n)


class ShardWorker(Protocol):
    def run_shard(self, task: ShardTask, progress: Progress | None = None) -> ShardRecord: ...

    def close(self) -> None: ...


WorkerFactory = Callable[[str], ShardWorker]  # device -> a worker with its pipeline loaded


@dataclass
class Outcome:
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> last error


class Executor(Protocol):
    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> Outcome: ...


def short_error(exc: BaseException) -> str:
    if isinstance(exc, SynthgenError):
        return exc.describe()
    return f"{exc.__class__.__name__}: {exc}"


class Attempts:
    """The one retry rule: a failed shard goes again until it has failed `max_retries + 1` times."""

    def __init__(self, tasks: Sequence[ShardTask], max_retries: int):
        self.tasks = list(tasks)
        self.max_retries = max_retries
        self.counts = [0] * len(self.tasks)
        self.outcome = Outcome()

    def succeeded(self, index: int) -> None:
        name = self.tasks[index].name
        self.outcome.failed.pop(name, None)
        self.outcome.committed.append(name)

    def failed(self, index: int, error: str) -> bool:
        """Record a failure; True when the shard should be tried again."""
        self.counts[index] += 1
        self.outcome.failed[self.tasks[index].name] = error
        log.warning("shard %s failed (attempt %d): %s", self.tasks[index].name,
                    self.counts[index], error)  # fmt: skip
        return self.counts[index] <= self.max_retries

    def unfinished(self, reason: str) -> Outcome:
        """The outcome, with every shard neither committed nor failed marked as not rendered."""
        for task in self.tasks:
            if task.name not in self.outcome.committed and task.name not in self.outcome.failed:
                self.outcome.failed[task.name] = f"not rendered: {reason}"
        return self.outcome


# --- in process --------------------------------------------------------------------------------


class InProcess:
    """One worker in this process, shard after shard."""

    def __init__(self, make_worker: WorkerFactory, execution: Execution):
        self.make_worker = make_worker
        self.device = execution.devices[0]
        self.max_retries = execution.max_retries

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> Outcome:
        attempts = Attempts(tasks, self.max_retries)
        if not tasks:
            return attempts.outcome
        worker = self.make_worker(self.device)
        try:
            for index, task in enumerate(attempts.tasks):
                while True:
                    shown: list[int] = []
                    try:
                        worker.run_shard(task, lambda n, s=shown: (s.append(n), progress(n)))
                    except Exception as exc:  # noqa: BLE001 - any failure of a shard is retried
                        progress(-sum(shown))
                        if attempts.failed(index, short_error(exc)):
                            continue
                    else:
                        attempts.succeeded(index)
                    break
        finally:
            worker.close()
        return attempts.outcome


# --- local pool --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolEvent:
    """What a pool worker tells its parent."""

    kind: Literal["start", "progress", "done", "failed", "dead"]
    slot: int
    index: int | None = None  # the shard's position in the task list
    images: int = 0  # progress: how many more were rendered
    error: str | None = None  # failed / dead: why


@dataclass(frozen=True)
class _Slot:
    number: int
    device: str
    parent: int  # the parent's pid: a worker whose parent died stops
    log_dir: str | None
    log_prefix: str


def _pool_worker(slot: _Slot, make_worker: WorkerFactory, tasks, todo, events) -> None:
    """Body of one spawned worker process: pull shard indices until told to stop."""
    if slot.log_dir:
        logging.basicConfig(
            filename=str(Path(slot.log_dir) / f"worker-{slot.log_prefix}{slot.number}.log"),
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
        )  # fmt: skip
    try:
        worker = make_worker(slot.device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put(PoolEvent("dead", slot.number, error=short_error(exc)))
        return
    log.info("worker %d ready on %s", slot.number, slot.device)
    try:
        while True:
            try:
                index = todo.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != slot.parent:  # the parent was killed: stop rather than render
                    return
                continue
            if index is None or os.getppid() != slot.parent:
                return
            task = tasks[index]
            events.put(PoolEvent("start", slot.number, index))
            try:
                worker.run_shard(
                    task, lambda n, i=index: events.put(PoolEvent("progress", slot.number, i, n))
                )
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which retries
                log.error("shard %s failed:\n%s", task.name, traceback.format_exc())
                events.put(PoolEvent("failed", slot.number, index, error=short_error(exc)))
            else:
                log.info("shard %s committed", task.name)
                events.put(PoolEvent("done", slot.number, index))
    finally:
        worker.close()


class LocalPool:
    """One spawned process per entry of `devices`; a shared queue hands out shards."""

    def __init__(self, make_worker: WorkerFactory, execution: Execution):
        self.make_worker = make_worker
        self.devices = execution.devices
        self.max_retries = execution.max_retries
        self.log_dir = execution.log_dir
        self.log_prefix = f"r{execution.rank}-" if execution.ranked else ""

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> Outcome:
        attempts = Attempts(tasks, self.max_retries)
        if not tasks:
            return attempts.outcome
        if self.log_dir:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        context = mp.get_context("spawn")
        todo, events = context.Queue(), context.Queue()
        for index in range(len(attempts.tasks)):
            todo.put(index)
        processes = [
            context.Process(
                target=_pool_worker,
                args=(
                    _Slot(n, device, os.getpid(), self.log_dir, self.log_prefix),
                    self.make_worker,
                    attempts.tasks,
                    todo,
                    events,
                ),
                daemon=True,
            )  # fmt: skip
            for n, device in enumerate(self.devices)
        ]
        for process in processes:
            process.start()
        run = _PoolRun(attempts, todo, processes, progress)
        try:
            run.until_done(events)
        finally:
            for _ in processes:
                todo.put(None)
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        reason = run.start_errors[0] if run.start_errors else "no worker was left to take it"
        return attempts.unfinished(reason)


class _PoolRun:
    """The parent's side of a pool run: events in, retries and the progress bar out."""

    def __init__(self, attempts: Attempts, todo, processes: list, progress: Progress):
        self.attempts = attempts
        self.todo = todo
        self.processes = processes
        self.progress = progress
        self.shown = [0] * len(attempts.tasks)  # images of each shard's attempt on the bar
        self.running: dict[int, int] = {}  # slot -> task index
        self.remaining = len(attempts.tasks)
        self.start_errors: list[str] = []

    def until_done(self, events) -> None:
        while self.remaining:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not self._check_processes():
                    return
                continue
            self._handle(event)

    def _handle(self, event: PoolEvent) -> None:
        if event.kind == "start":
            self.running[event.slot] = event.index
        elif event.kind == "progress":
            self.shown[event.index] += event.images
            self.progress(event.images)
        elif event.kind == "done":
            self.running.pop(event.slot, None)
            self.attempts.succeeded(event.index)
            self.remaining -= 1
        elif event.kind == "failed":
            self.running.pop(event.slot, None)
            self._retry_or_fail(event.index, event.error or "failed")
        elif event.kind == "dead":
            log.error("worker %d could not start: %s", event.slot, event.error)
            self.start_errors.append(event.error or "could not start")

    def _check_processes(self) -> bool:
        """Retry the shard of a worker that died mid-shard; False once no worker is left."""
        for slot, process in enumerate(self.processes):
            if not process.is_alive() and process.exitcode not in (None, 0):
                if slot in self.running:  # killed, out of memory, …
                    error = f"worker process died (exit code {process.exitcode})"
                    self._retry_or_fail(self.running.pop(slot), error)
        return any(p.is_alive() for p in self.processes)

    def _retry_or_fail(self, index: int, error: str) -> None:
        self.progress(-self.shown[index])
        self.shown[index] = 0
        if self.attempts.failed(index, error):
            self.todo.put(index)
        else:
            self.remaining -= 1


# --- Ray ---------------------------------------------------------------------------------------


class _RayShardWorker:
    """A Ray actor holding one worker (so one pipeline load per GPU) for many shards."""

    def __init__(self, make_worker: WorkerFactory, device: str):
        self.worker = make_worker(device)

    def run(self, task: ShardTask) -> tuple[int, str]:
        """The shard's sample count, and the Ray node that rendered it (for the log)."""
        import ray  # optional dependency: only ever imported inside a Ray actor

        return self.worker.run_shard(task).count, ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.worker.close()


class RayActors:
    """One actor per GPU of the cluster (or one CPU actor per `--devices` entry without GPUs)."""

    def __init__(self, make_worker: WorkerFactory, execution: Execution):
        self.make_worker = make_worker
        self.max_retries = execution.max_retries
        self.address = execution.ray_address
        cpu_only = all(device == "cpu" for device in execution.devices)
        self.cpu_actors = len(execution.devices) if cpu_only else None

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> Outcome:
        import ray  # optional dependency: synthgen[ray]

        attempts = Attempts(tasks, self.max_retries)
        if not tasks:
            return attempts.outcome
        self._connect(ray)
        make_actor = self._actor_class(ray)
        idle = [make_actor() for _ in range(self._actor_count(ray))]
        pending = list(range(len(attempts.tasks)))
        running = {}  # object ref -> (actor, task index)
        while pending or running:
            while pending and idle:
                actor, index = idle.pop(), pending.pop(0)
                running[actor.run.remote(attempts.tasks[index])] = (actor, index)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ready[0])
            try:
                count, node = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:  # the actor died: replace it
                retry = attempts.failed(index, f"Ray actor died: {exc.__class__.__name__}")
                actor = make_actor()
            except Exception as exc:  # noqa: BLE001 - a RayTaskError wraps the shard's own error
                retry = attempts.failed(index, short_error(getattr(exc, "cause", None) or exc))
            else:
                progress(count)
                log.info("shard %s committed on Ray node %s", attempts.tasks[index].name, node)
                attempts.succeeded(index)
                retry = False
            if retry:
                pending.append(index)
            idle.append(actor)
        self._close(ray, idle)
        return attempts.outcome

    @staticmethod
    def _close(ray, actors: list) -> None:
        """Let every actor close its worker (its last records are packed then); one that died
        closing loses only that."""
        for ref in [actor.close.remote() for actor in actors]:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - the shards are committed; only a pack is lost
                log.warning("a Ray actor died while closing its worker")

    def _connect(self, ray) -> None:
        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            # "local": a new cluster of this process's own, never one another session left
            # running on the machine (ray.init would join it, and refuse num_cpus).
            cpus = self.cpu_actors or os.cpu_count()
            ray.init(address="local", num_cpus=cpus, log_to_driver=False, include_dashboard=False)

    def _actor_count(self, ray) -> int:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return gpus or self.cpu_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _actor_class(self, ray):
        if int(ray.cluster_resources().get("GPU", 0)):
            remote = ray.remote(num_gpus=1)(_RayShardWorker)
            return lambda: remote.remote(self.make_worker, "cuda")
        # Actors on other nodes do not inherit this environment: hand the thread count over.
        threads = {"SYNTHGEN_CPU_THREADS": os.environ.get("SYNTHGEN_CPU_THREADS", "1")}
        remote = ray.remote(num_cpus=1, runtime_env={"env_vars": threads})(_RayShardWorker)
        return lambda: remote.remote(self.make_worker, "cpu")


EXECUTORS: dict[str, Callable[[WorkerFactory, Execution], Executor]] = {
    "in-process": InProcess,
    "pool": LocalPool,
    "ray": RayActors,
}


def make_executor(make_worker: WorkerFactory, execution: Execution) -> Executor:
    return EXECUTORS[execution.kind](make_worker, execution)


def rank_share(tasks: Sequence[ShardTask], rank: int, world_size: int) -> list[ShardTask]:
    """Shards for one of `world_size` independent processes: every world_size-th from `rank`."""
    return [task for i, task in enumerate(tasks) if i % world_size == rank]
