"""The benchmark's environment (device, versions, command) and its BENCHMARKS.md section."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import zlib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import torch
from timing import COMPONENTS

ROOT = Path(__file__).resolve().parents[1]
SPLIT = (*COMPONENTS, "other", "total")
# CPU seconds per image come from the whole process (every thread), beside the wall-clock split.


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    """The commit, with `+changes` when tracked files differ from it."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty=+changes", "--exclude=*"],
            cwd=ROOT, text=True, capture_output=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    from PIL import features

    from synthgen.output.manifest import (
        library_versions,  # what the manifest records, plus image codecs
    )

    versions = {"python": platform.python_version(), **library_versions()}
    versions.update(pillow=metadata.version("pillow"), numpy=metadata.version("numpy"))
    versions["zlib (PIL)"] = features.version("zlib") or "?"
    versions["zlib (python)"] = zlib.ZLIB_VERSION
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": f"{_cpu_name()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "synthgen": _git_revision(),
        "versions": versions,
        "command": "python benchmarks/bench.py " + shlex.join(sys.argv[1:]),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    return env


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(caption: str | None, columns: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table after a blank line, under its caption if it has one."""
    lines = ["", caption, ""] if caption else [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _model_row(r: dict) -> list[str]:
    seed, ours = r["seed_loop"], r["synthgen"]
    return [
        r["case"], f"{r['model']} {r['dtype']}", f"{r['size']}²", r["steps"], _fmt(r["strength"]),
        r["count"], r["batch_size"], _fmt(seed["images_per_s"]), _fmt(ours["images_per_s"]),
        f"{_fmt(r['speedup'])}×", f"{_fmt(r['speedup_cpu_time'])}×", _fmt(seed.get("mfu")),
        _fmt(ours.get("mfu")), _fmt(ours.get("non_model_share")),
        _fmt(ours["compile_s"]) if r.get("compile") else "–",
        _fmt(r.get("check", {}).get("max_abs_pixel_diff")),
    ]  # fmt: skip


def _split_row(r: dict, path: str) -> list[str]:
    split = r[path]["s_per_image"]
    marks = {name: "*" for name in r[path].get("overlapped", [])}
    cells = [_fmt(split[name]) + marks.get(name, "") for name in SPLIT]
    return [r["case"], path, *cells, _fmt(r[path]["cpu_s_per_image"])]


def markdown(env: dict, results: list[dict]) -> str:
    """A BENCHMARKS.md section: where and how it ran, the headline table, the splits, PNG."""
    lines = [f"### {env['date']} — {env['device']}: {env.get('gpu', env['cpu'])}", ""]
    lines.append(f"- command: `{env['command']}`")
    lines.append(
        f"- synthgen {env['synthgen']}; torch threads {env['torch_threads']}; "
        f"load average at start {env['load_average']}"
    )
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    models = [r for r in results if r["case"] in ("t2i", "i2i")]
    if models:
        columns = [
            "case", "model", "size", "steps", "strength", "images", "batch", "seed loop img/s",
            "synthgen img/s", "speedup", "speedup in CPU time", "MFU seed", "MFU synthgen",
            "non-model share synthgen", "compile s", "max abs px diff",
        ]  # fmt: skip
        lines += _table(None, columns, map(_model_row, models))
        splits = [_split_row(r, path) for r in models for path in ("seed_loop", "synthgen")]
        lines += _table("Seconds per image:", ["case", "path", *SPLIT, "CPU s"], splits)
        lines += [
            "",
            "\\* in synthgen's encoder and source-reader threads, overlapped with rendering; "
            "`other` = total − the unstarred columns. Non-model share: 1 − (text encoder + VAE "
            "+ UNet loop) / wall; the UNet loop includes the scheduler steps. Compile seconds "
            "(one warm-up batch, once per worker) are not in the per-image rates.",
        ]
        if models[0].get("peak_tflop_per_s"):
            lines += [
                "",
                f"MFU: UNet FLOPs over the UNet loop's time, against a measured "
                f"{models[0]['peak_tflop_per_s']} TFLOP/s {models[0]['dtype']} matmul.",
            ]
        checked = [r for r in models if "check" in r]
        if checked:
            keys = ("images", "max_abs_pixel_diff", "mean_abs_pixel_diff", "identical_images",
                    "pixels_off_by_more_than_1")  # fmt: skip
            lines += _table(
                "Pixel agreement with the seed-style loop on the same per-sample seeds (0-255):",
                ["case", "images", "max abs diff", "mean abs diff", "identical images",
                 "share of pixels off by > 1"],
                ([r["case"], *(r["check"][key] for key in keys)] for r in checked),
            )  # fmt: skip
    gates = [r for r in results if r["case"] == "gate"]
    if gates:
        lines += _table(
            "Quality gate (a ResNet-18-shaped check judging every batch before it is encoded):",
            ["check input", "images rendered", "acceptance", "render s/img", "gate s/img",
             "gate / render", "s on rejected images"],
            ([f"{r['input']}²", r["images_rendered"], r["acceptance"], r["render_s_per_image"],
              r["gate_s_per_image"], f"{r['gate_share_of_render']:.1%}", r["rejected_s"]]
             for r in gates),
        )  # fmt: skip
    pngs = [r for r in results if r["case"] == "png"]
    if pngs:
        target = pngs[0]["target_per_core"]
        lines += _table(
            f"PNG encoding, {pngs[0]['size']}² RGB, one core (target {target:g}/s):",
            ["image", "level", "strategy", "img/s per core (CPU time)", "img/s (wall)", "bytes",
             "ratio", "meets target"],
            ([r["image"], r["compress_level"], r["strategy"], r["images_per_cpu_s"],
              r["images_per_wall_s"], r["bytes"], r["ratio"], "yes" if r["meets_target"] else "no"]
             for r in pngs),
        )  # fmt: skip
    return "\n".join(lines) + "\n"
