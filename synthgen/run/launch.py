"""Where a run's shards go: devices of a local pool, a launcher's rank, or a Ray cluster.

Reads what launchers set (RANK/WORLD_SIZE under torchrun, SLURM array variables, LOCAL_RANK) so
the CLI only parses options; knows nothing of images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from synthgen.errors import OptionError
from synthgen.output.outdir import LOGS


@dataclass(frozen=True)
class Execution:
    devices: tuple[str, ...] = ("cpu",)  # one entry per worker process
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    rank: int | None = None
    world_size: int | None = None
    max_retries: int = 2
    log_dir: str | None = None

    @property
    def kind(self) -> str:
        """Which executor runs the shards: in-process, pool or ray."""
        if self.executor == "ray":
            return "ray"
        return "pool" if len(self.devices) > 1 else "in-process"

    @property
    def ranked(self) -> bool:
        return self.rank is not None


_DEVICE_FORMS = "use all, cpu, cuda, cuda:N or a list like 0,1,3"


def cuda_device_count() -> int:
    return torch.cuda.device_count()


def parse_devices(
    value: str | None, workers_per_device: int, cuda_count: int, *, check: bool = True
) -> tuple[str, ...]:
    """`all` / `0,1,3` / `cpu` / `cuda:1` → one entry per worker process.

    With `check`, a GPU this machine lacks is refused here: torch would fail in every shard.
    Ray's actors run on the cluster's GPUs, not this machine's, so it passes check=False.
    """
    if value is None:
        value = "all" if cuda_count else "cpu"
    if value == "all":
        devices = [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    elif value == "cpu":
        devices = ["cpu"]
    else:
        indices = [cuda_index(part) for part in value.split(",")]  # a typo is named first
        checked = cuda_count if check else None
        devices = [gpu(index, checked, "--devices") for index in indices]
    return tuple(device for device in devices for _ in range(workers_per_device))


def cuda_index(text: str) -> int | None:
    """The GPU index of `cuda:N` or `N` in --devices (None: plain `cuda`, torch's current one)."""
    match = re.fullmatch(r"cuda(?::([0-9]+))?|([0-9]+)", text.strip())
    if match is None:
        raise OptionError(_DEVICE_FORMS, where="--devices")
    index = match.group(1) or match.group(2)
    return None if index is None else int(index)


def gpu(index: int | None, cuda_count: int | None, where: str) -> str:
    """`cuda:INDEX` (None: torch's current `cuda`), refused naming `where` if this machine has
    no such GPU (`cuda_count` None: not checked)."""
    device = "cuda" if index is None else f"cuda:{index}"
    if cuda_count is not None and not 0 <= (index or 0) < cuda_count:
        if cuda_count == 0:
            have = "no CUDA device is available (torch sees none); use --devices cpu"
        else:
            plural = "s" if cuda_count > 1 else ""
            have = f"this machine has {cuda_count} CUDA device{plural} (cuda:0 to cuda:{cuda_count - 1})"
        raise OptionError(f"asks for {device}, but {have}", where=where)
    return device


def env_int(env: Mapping[str, str], name: str) -> int:
    """A launcher variable as a whole number; anything else is refused naming the variable."""
    text = env[name].strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        raise OptionError(f"is '{env[name]}', not a whole number", where=name)
    return int(text)


def rank_in_world(rank: int, world_size: int, rank_name: str, size_name: str) -> tuple[int, int]:
    """(rank, world size) if the rank is one of the world's; a rank outside it would render
    nothing and exit 0, so it is refused naming where it came from."""
    if world_size < 1:
        raise OptionError(f"is {world_size}; a world has at least 1 rank", where=size_name)
    if not 0 <= rank < world_size:
        raise OptionError(
            f"this process is rank {rank} of a world of {world_size}, so no shard is its "
            f"(ranks run from 0 to {world_size - 1})",
            where=rank_name,
        )
    return rank, world_size


def launcher_rank(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, world size) from torchrun/accelerate or a SLURM array job, if launched by one."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
            if name not in env:
                raise OptionError(f"is not set, but {other} is: a launcher sets both", where=name)
        return rank_in_world(env_int(env, "RANK"), env_int(env, "WORLD_SIZE"), "RANK", "WORLD_SIZE")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        rank = env_int(env, "SLURM_ARRAY_TASK_ID") - first  # an array's indices: --array=4-5
        count = env_int(env, "SLURM_ARRAY_TASK_COUNT")
        return rank_in_world(rank, count, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    return None


def local_log_dir(out: str) -> str | None:
    """Worker logs go to OUT/.synthgen/logs when OUT is on this machine's disk."""
    if "://" not in out or out.startswith("file://"):
        return os.path.join(out.removeprefix("file://"), LOGS)
    return None


def resolve_execution(
    out: str,
    devices: str | None,
    workers_per_device: int,
    executor: str,
    address: str | None,
    rank: int | None,
    world_size: int | None,
    max_retries: int,
) -> Execution:
    """The execution the options and the launcher's environment ask for; refused before any
    work if they do not fit together or name a GPU this machine lacks."""
    if rank is None and world_size is None:
        rank, world_size = launcher_rank() or (None, None)
    elif rank is None:
        raise OptionError("is missing: --world-size needs it", where="--rank")
    elif world_size is None:
        raise OptionError("is missing: --rank needs it", where="--world-size")
    else:
        rank_in_world(rank, world_size, "--rank", "--world-size")
    cuda_count = cuda_device_count()
    device_list = parse_devices(devices, workers_per_device, cuda_count, check=executor != "ray")
    if (
        rank is not None
        and os.environ.get("LOCAL_RANK")
        and devices is None
        and device_list[0] != "cpu"
    ):
        local = env_int(os.environ, "LOCAL_RANK")  # torchrun: one GPU per process
        device_list = (gpu(local, cuda_count, "LOCAL_RANK"),)
    return Execution(
        device_list, executor, address, rank, world_size, max_retries, local_log_dir(out)
    )
