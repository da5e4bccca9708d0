"""Lossless PNG encoding speed of one core: 512x512 RGB images at several zlib levels.

PIL encodes a PNG on one thread, so images per CPU-second is the per-core rate; the wall-clock
rate is shown beside it because a shared machine can take the core away mid-measurement.
A setting is `LEVEL` or `LEVEL:STRATEGY`, the strategy being zlib's (PIL's `compress_type`).
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

STRATEGIES = {"default": -1, "filtered": 1, "huffman": 2, "rle": 3, "fixed": 4}


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A photo-like stand-in for a fundus: a smooth colour field, a bright disc, a dark rim."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((size, size), Image.BICUBIC)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    rim = np.clip(1.6 - 3.2 * np.hypot(yy - 0.5, xx - 0.5), 0, 1)[..., None]
    disc = np.exp(-(((yy - 0.45) ** 2 + (xx - 0.62) ** 2) / 0.004))[..., None] * 90
    return np.clip(field * rim + disc, 0, 255).astype(np.uint8)


def sample_images(size: int = 512) -> dict[str, np.ndarray]:
    """smooth; photo (smooth plus sensor-like grain, as real photographs and SD outputs have);
    noise (uniform random bytes: incompressible, the worst case)."""
    rng = np.random.default_rng(1)
    smooth = smooth_image(size)
    grain = rng.normal(0, 2.0, smooth.shape)
    return {
        "smooth": smooth,
        "photo": np.clip(smooth + grain, 0, 255).astype(np.uint8),
        "noise": rng.integers(0, 256, smooth.shape, dtype=np.uint8),
    }


def parse_setting(text: str) -> tuple[int, str]:
    level, _, strategy = text.partition(":")
    strategy = strategy or "default"
    if strategy not in STRATEGIES:
        raise ValueError(f"PNG strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")
    return int(level), strategy


def encode_rate(array: np.ndarray, level: int, strategy: str, min_seconds: float) -> dict:
    image = Image.fromarray(array)
    options = {"compress_level": level, "compress_type": STRATEGIES[strategy]}
    count, size = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while count < 3 or time.process_time() - cpu < min_seconds:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **options)
        size = buffer.tell()
        count += 1
    cpu_seconds = time.process_time() - cpu
    wall_seconds = time.perf_counter() - wall
    return {
        "images_per_cpu_s": round(count / cpu_seconds, 1),
        "images_per_wall_s": round(count / wall_seconds, 1),
        "bytes": size,
        "ratio": round(array.nbytes / size, 2),
    }


def png_cases(size: int, settings: list[str], min_seconds: float, target: float) -> list[dict]:
    """One result per (image, setting), each saying whether it meets `target` images/s per core."""
    parsed = [parse_setting(text) for text in settings]
    results = []
    for kind, array in sample_images(size).items():
        for level, strategy in parsed:
            rate = encode_rate(array, level, strategy, min_seconds)
            results.append(
                {
                    "case": "png",
                    "image": kind,
                    "size": size,
                    "compress_level": level,
                    "strategy": strategy,
                    **rate,
                    "meets_target": rate["images_per_cpu_s"] >= target,
                    "target_per_core": target,
                }
            )
    return results
