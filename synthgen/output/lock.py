"""The lease on OUT: one run (or the ranks of one launch) writes into an output directory at a time.

Every process that writes into OUT keeps its own small file, `.synthgen/leases/OWNER.json`: its
launch, machine, pid and the time its lease runs out. A thread renews it while the process lives,
so the lease of a run killed on another machine runs out after `ttl` seconds, and on this machine
at once (its pid is gone). To take OUT a process writes its file first, then lists the folder: a
live lease of another launch means OUT is taken, and it withdraws. Of two processes starting at
the same instant at least one sees the other (each writes before it lists, and local disks, S3 and
GCS list what was written), so two launches never both go on. That needs no conditional write,
which not every object store has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from synthgen.errors import OutputError
from synthgen.output.outdir import LEASES, STATE, OutDir, is_temporary

log = logging.getLogger("synthgen")
DEFAULT_TTL = 120.0  # seconds a lease lasts unless renewed (SYNTHGEN_LEASE_SECONDS)
ATTEMPTS = 3  # two processes that start together both withdraw, then try again apart


def lease_ttl() -> float:
    value = os.environ.get("SYNTHGEN_LEASE_SECONDS", str(DEFAULT_TTL))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 1:  # also NaN
        raise OutputError("must be a number of seconds, at least 1", where="SYNTHGEN_LEASE_SECONDS")
    return seconds


def _machine() -> str:
    """Where a pid means something: host, boot and pid namespace (containers share hosts)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def _started(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), so a reused pid is not taken for
    it; None where /proc cannot say, or the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, started: str) -> bool:
    if Path("/proc/self/stat").exists():
        return _started(pid) == started
    try:
        os.kill(pid, 0)  # no /proc: the pid alone
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LeaseRecord:
    owner: str  # this process's lease
    launch: str  # shared by the ranks of one launch, which write into OUT together
    host: str
    machine: str
    pid: int
    started: str
    expires: float  # unix time

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for a damaged file (which then holds nothing)."""
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None

    def is_live(self, now: float, machine: str) -> bool:
        if self.expires < now:
            return False
        return self.machine != machine or _alive(self.pid, self.started)

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S", time.localtime(self.expires))
        return f"pid {self.pid} on {self.host}, lease renewed until {until}"


class Lease:
    """This process's hold on OUT; `release` (or leaving a `with` block) lets go of it."""

    def __init__(self, out: OutDir, launch: str, ttl: float):
        self.out = out
        self.ttl = ttl
        self.machine = _machine()
        pid = os.getpid()
        self.record = LeaseRecord(
            owner=uuid.uuid4().hex[:12], launch=launch, host=socket.gethostname(),
            machine=self.machine, pid=pid, started=_started(pid) or "", expires=0.0,
        )  # fmt: skip
        self.path = f"{LEASES}/{self.record.owner}.json"
        self.lost = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, daemon=True)
        self._made_folders = not out.exists(LEASES)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _write(self) -> None:
        self.record = LeaseRecord(**{**asdict(self.record), "expires": time.time() + self.ttl})
        self.out.write_atomic(self.path, self.record.to_json())

    def take(self) -> None:
        """Write the lease, then look for another launch's; refuses OUT while one is live."""
        for attempt in range(ATTEMPTS):
            self._write()
            holder = self._other_holder()
            if holder is None:
                self._renewer.start()
                return
            self._remove_own()
            if attempt + 1 < ATTEMPTS:
                time.sleep(random.uniform(0.2, 1.0))  # apart, if both started at once
        self._remove_empty_folders()
        raise OutputError(
            f"is in use by another synthgen run ({holder.describe()}); wait for it to end (a run "
            f"that was killed elsewhere lets go when its lease runs out, {self.ttl:g} s after "
            "its last renewal)",
            file=self.out.url,
        )

    def _other_holder(self) -> LeaseRecord | None:
        """A live lease of another launch, if any; leases that ran out are removed."""
        now = time.time()
        self._forget_listing()
        for name in self.out.listdir(LEASES):
            relative = f"{LEASES}/{name}"
            if relative == self.path or is_temporary(name) or not name.endswith(".json"):
                continue
            try:
                other = LeaseRecord.from_json(self.out.read_bytes(relative))
            except FileNotFoundError:
                continue  # released while we looked
            if other is None or not other.is_live(now, self.machine):
                with contextlib.suppress(OSError):
                    self.out.remove(relative)
            elif other.launch != self.record.launch:
                return other
        return None

    def _forget_listing(self) -> None:
        """Object-store file systems cache listings: what other processes wrote must be seen."""
        self.out.forget_listings(LEASES)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._forget_listing()
            if not self.out.exists(self.path):
                # Taken as run out (this process was paused past its lease): another run may
                # own OUT now, so this one must not finish it.
                self.lost = True
                log.error("the lease on %s was lost; this run will not finalize", self.out.url)
                return
            try:
                self._write()
            except OutputError as error:  # a network blip: try again at the next renewal
                log.warning("could not renew the lease: %s", error.message)

    def check(self) -> None:
        """Refuse to go on once the lease is lost."""
        if self.lost:
            raise OutputError(
                "another run took OUT over while this one was paused past its lease; nothing "
                "more was written; run the command again once that run has ended",
                file=self.out.url,
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        self._remove_own()
        self._remove_empty_folders()

    def _remove_own(self) -> None:
        with contextlib.suppress(OSError):
            self.out.remove(self.path)

    def _remove_empty_folders(self) -> None:
        """The folders the lease made, when nothing else came to be in them (rmdir refuses a
        folder that is not empty)."""
        if self._made_folders and self.out.is_local:
            for folder in (LEASES, STATE):
                with contextlib.suppress(OSError):
                    os.rmdir(self.out.path(folder))


def hold(out: OutDir, launch: str | None = None) -> Lease:
    """Take the lease on OUT for this process; `launch` is shared by ranks of one launch (None:
    this process alone). Use it as a context manager."""
    lease = Lease(out, launch or uuid.uuid4().hex, lease_ttl())
    lease.take()
    return lease
