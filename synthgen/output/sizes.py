"""What a recipe's shards will weigh, before any is written: `synthgen validate` prints it and says
when a tar would be far from the sizes WebDataset streaming and the Hub work best with.

Image bytes are estimated from the pixel count and the format's typical compression on
photo-like content (BENCHMARKS.md, PNG level 1 with Z_RLE: about 0.6 of the raw bytes): an
estimate to size shards by, not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass

from synthgen.recipe.schema import Recipe

# Compressed bytes per raw byte, by format (photo-like medical images; noise compresses worse).
COMPRESSION = {"png": 0.6, "jpg": 0.12, "webp": 0.08}
MEMBER_OVERHEAD = 2_560  # tar headers and padding of three members, the JSON and the prompt
GOOD_TAR = (100e6, 1e9)  # bytes: what WebDataset and the Hub handle best per shard
TARGET_TAR = 500e6


@dataclass(frozen=True)
class SizeEstimate:
    image_bytes: float
    shard_bytes: float  # one full tar (the Parquet shard is about the same)
    total_bytes: float  # every file of every format
    advice: str | None  # set when a tar would be far from GOOD_TAR

    def describe(self) -> str:
        line = (
            f"about {_human(self.image_bytes)} per image, {_human(self.shard_bytes)} per tar "
            f"shard, {_human(self.total_bytes)} in all"
        )
        return f"{line}; {self.advice}" if self.advice else line


def estimate(recipe: Recipe, samples: int) -> SizeEstimate:
    g, out = recipe.generation, recipe.output
    side = recipe.source.preprocess.size if recipe.source is not None else None
    height, width = (side, side) if side else (g.height, g.width)
    channels = 1 if out.grayscale else 3
    image = height * width * channels * COMPRESSION[out.image_format]
    per_sample = image + MEMBER_OVERHEAD
    shard = per_sample * min(recipe.shard_size, max(samples, 1))
    total = per_sample * samples * len(out.formats)
    return SizeEstimate(image, shard, total, _advice(recipe, samples, per_sample, shard))


def _advice(recipe: Recipe, samples: int, per_sample: float, shard: float) -> str | None:
    if "webdataset" not in recipe.output.formats:
        return None
    low, high = GOOD_TAR
    suggested = max(1, round(TARGET_TAR / per_sample))
    if shard > high:
        return (
            f"note: tars of {_human(high)} or less stream and upload best; shard_size "
            f"{suggested} would make them about {_human(TARGET_TAR)}"
        )
    if shard < low and samples * per_sample >= low:
        return (
            f"note: tars of {_human(low)}–{_human(high)} stream and upload best; shard_size "
            f"{suggested} would make them about {_human(TARGET_TAR)}"
        )
    return None


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
