"""Seed-style loop vs synthgen's generate path: images/s, where the seconds go, MFU, PNG speed.

    python benchmarks/bench.py --device cpu           # tiny model, 64², in a minute or two
    python benchmarks/bench.py --device cuda          # sd14-random + rank-64 LoRA, 512², fp16
    python benchmarks/bench.py --device cpu --check   # also: how far synthgen's pixels are off

Prints one JSON line per case on stdout (t2i, i2i, then one per PNG image and zlib level);
`--markdown FILE` also appends the BENCHMARKS.md section for the run to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # synthgen, when not pip-installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from contenders import compare_images, seed_loop, synthgen_path  # noqa: E402
from fixtures import Settings, bench_recipe, seed_pipelines  # noqa: E402
from gate_cost import gate_case  # noqa: E402
from png_speed import png_cases  # noqa: E402
from report import environment, markdown  # noqa: E402
from timing import matmul_peak, unet_flops  # noqa: E402

# Per-device defaults: a CPU run of the tiny model stays within a couple of minutes on 2 cores.
DEFAULTS = {
    "cpu": {
        "model": "tiny",
        "size": 64,
        "count": 16,
        "batch_size": 8,
        "threads": 1,
        "lora_rank": 8,
    },
    "cuda": {
        "model": "sd14-random",
        "size": 512,
        "count": 32,
        "batch_size": 16,
        "threads": None,
        "lora_rank": 64,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model", help="preset (tiny, sd14-random), Hub id or local directory")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--size", type=int, help="image side in pixels (cpu 64, cuda 512)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--strength", type=float, default=0.5, help="i2i strength")
    parser.add_argument("--count", type=int, help="images per case and path (cpu 16, cuda 32)")
    parser.add_argument("--batch-size", type=int, help="synthgen's batch (cpu 8, cuda 16)")
    parser.add_argument(
        "--lora-rank",
        type=int,
        help="0: no LoRA; cuda 64 as in the seed, cpu 8 (the same share of tiny's "
        "32-64-wide attention as 64 is of SD-1.4's 320-1280)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (cpu default 1)")
    parser.add_argument(
        "--cases", default="t2i,i2i,gate,png", help="comma-separated: t2i,i2i,gate,png"
    )
    parser.add_argument(
        "--gate-size", type=int, default=224, help="gate case: the check network's input side"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="seed loop uses the plan's per-sample seeds; report pixel diffs",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile synthgen's UNet (model.compile); compile seconds are reported apart",
    )
    parser.add_argument("--no-mfu", action="store_true", help="skip FLOP counting and the peak")
    parser.add_argument("--png-size", type=int, default=512)
    parser.add_argument(
        "--png-settings",
        default="0,1,3,6,1:rle",
        help="zlib LEVEL or LEVEL:STRATEGY (default, filtered, huffman, rle, fixed); 0 stores "
        "uncompressed: the floor set by PNG filtering and CRCs",
    )
    parser.add_argument("--png-seconds", type=float, default=0.8, help="CPU seconds per PNG case")
    parser.add_argument("--png-target", type=float, default=40.0, help="images/s per core")
    parser.add_argument("--markdown", type=Path, help="append the run's BENCHMARKS.md section")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def model_case(mode, settings, seed_pipes, lora, peak, folder: Path) -> dict:
    from synthgen.run.planning import build_plan

    case_folder = folder / mode
    case_folder.mkdir()
    plan = build_plan(bench_recipe(settings, mode, lora, case_folder))
    specs = [spec for task in plan.tasks for spec in plan.specs(task)]
    sources = {row: r.image_path for row, r in plan.cohort.by_row.items()} if plan.cohort else {}
    seed = seed_loop(seed_pipes[mode], specs, sources, settings, case_folder / "seed")
    ours, pipe = synthgen_path(plan, settings, case_folder / "synthgen")
    s = settings
    result = {
        "case": mode,
        **asdict(s),
        "dtype": str(s.torch_dtype).removeprefix("torch."),
        "strength": s.strength if mode == "i2i" else None,
        "seed_loop": seed.summary(),
        "synthgen": ours.summary(),
    }
    result["speedup"] = round(seed.wall / seed.images / (ours.wall / ours.images), 3)
    result["speedup_cpu_time"] = round(seed.cpu / seed.images / (ours.cpu / ours.images), 3)
    if peak:
        # Model FLOPs only: the seed's unfused LoRA matmuls are overhead, not model work.
        # Every UNet operation is per sample: count one sample's, scale by the batch.
        per_sample = unet_flops(pipe, 1, s.size)
        for name, timing in (("seed_loop", seed), ("synthgen", ours)):
            flops = per_sample * timing.unet_batch
            achieved = flops * timing.unet_forwards / timing.seconds["unet_loop"]
            result[name].update(
                unet_gflop_per_forward=round(flops / 1e9, 3),
                unet_tflop_per_s=round(achieved / 1e12, 4),
                mfu=round(achieved / peak, 4),
            )
        result["peak_tflop_per_s"] = round(peak / 1e12, 3)
    if s.check:
        result["check"] = compare_images(case_folder / "seed", case_folder / "synthgen")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from synthgen.render.pipeline import quiet_libraries

    quiet_libraries()
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    env = environment(args.device)
    print(json.dumps({"environment": env}), file=sys.stderr)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(cases) - {"t2i", "i2i", "gate", "png"})
    if unknown:
        print(
            f"--cases: unknown case {unknown[0]!r}; choose from t2i, i2i, gate, png",
            file=sys.stderr,
        )
        return 2
    results = []

    def emit(result: dict) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)

    modes = [case for case in cases if case in ("t2i", "i2i")]
    if modes:
        peak = None if args.no_mfu else matmul_peak(args.device, settings.torch_dtype)
        with tempfile.TemporaryDirectory(prefix="synthgen-bench-") as tmp:
            seed_pipes, lora = seed_pipelines(settings, Path(tmp))
            for mode in modes:
                emit(model_case(mode, settings, seed_pipes, lora, peak, Path(tmp)))
    if "gate" in cases:
        emit(gate_case(settings, args.gate_size))
    if "png" in cases:
        png = args.png_settings.split(",")
        for result in png_cases(args.png_size, png, args.png_seconds, args.png_target):
            emit(result)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write("\n" + markdown(env, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
