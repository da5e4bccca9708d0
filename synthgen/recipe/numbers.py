"""Numbers (and flags) a recipe may hold: finite, never a boolean or a string, inside stated bounds.

YAML makes `yes`, `.inf` and `1e308` numbers of a kind; pydantic's lax mode would turn `true` into
1 and `"7"` into 7. Every number field of the recipe is one of these types instead, so a value
that is not plainly a number in range is refused with the field's path, and no size is so large
that building the plan could take the machine's memory.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

MAX_SAMPLES = 10**8  # 10x the largest corpora synthgen is built for (10^7 images)
MAX_SHARDS = 100_000  # shard tasks are planned in memory; 10^4 is the scale measured
MAX_CELLS = 100_000  # balance cells, likewise
MAX_MAGNITUDE = 1e15  # label numbers and weights: integers stay exact in float64 below 2^53


def integer(**bounds: Any) -> Any:
    """An int field (`ge`, `le`, …): `5.0`, `true` and `"5"` are refused, not converted."""
    return Annotated[int, Field(strict=True, **bounds)]


def real(**bounds: Any) -> Any:
    """A finite float field; an int is taken as its float, a boolean or a string is refused."""
    bounds.setdefault("ge", -MAX_MAGNITUDE)
    bounds.setdefault("le", MAX_MAGNITUDE)
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


# A label's bound, mean, slope or bin edge: finite and within ±MAX_MAGNITUDE.
LabelNumber = real()
Weight = real(gt=0)  # a category's relative weight (they are normalised to probabilities)
Probability = real(gt=0, le=1)
Flag = Annotated[bool, Field(strict=True)]  # `true` or `false`, never 1, "yes" or "on"
