"""Where a run's shards go: devices of a local pool, a launcher's rank, or a Ray cluster.

Reads what launchers set (RANK/WORLD_SIZE under torchrun, SLURM array variables, LOCAL_RANK) so
the CLI only parses options; knows nothing of images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from synthgen.errors import SynthgenError
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


def parse_devices(value: str | None, workers_per_device: int) -> tuple[str, ...]:
    """`all` / `0,1,3` / `cpu` / `cuda:1` → one entry per worker process."""
    import torch  # only for a device count: `validate` and `schema` never get here

    if value is None:
        value = "all" if torch.cuda.is_available() else "cpu"
    if value == "all":
        count = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    elif value == "cpu" or value.startswith("cuda"):
        devices = [value]
    else:
        try:
            devices = [f"cuda:{int(part)}" for part in value.split(",")]
        except ValueError:
            raise SynthgenError(
                "use all, cpu, cuda, cuda:N or a list like 0,1,3", where="--devices"
            ) from None
    return tuple(device for device in devices for _ in range(workers_per_device))


def launcher_rank(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, world size) from torchrun/accelerate or a SLURM array job, if launched by one."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
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
    """The execution the options and the launcher's environment ask for."""
    if rank is None and world_size is None:
        rank, world_size = launcher_rank() or (None, None)
    elif rank is None or world_size is None or not 0 <= rank < world_size:
        raise SynthgenError(
            "give both --rank and --world-size, with 0 <= rank < world size", where="--rank"
        )
    device_list = parse_devices(devices, workers_per_device)
    local_rank = os.environ.get("LOCAL_RANK")
    if rank is not None and local_rank and devices is None and device_list[0] != "cpu":
        device_list = (f"cuda:{local_rank}",)  # torchrun: one GPU per process
    return Execution(
        device_list, executor, address, rank, world_size, max_retries, local_log_dir(out)
    )
