"""Rendering through the quality gate: each batch is judged before it is encoded, and a rejected
sample goes back into a following batch with its next attempt's seed.

What attempt k renders is a pure function of (recipe, index, k) (`Plan.attempt`), and images do
not depend on their batch-mates (padded batches, a generator per sample), so the image a sample
keeps is a function of (recipe, index, the checks' weights) alone: however shards are spread over
workers, resumed or retried, they come out byte for byte the same. Samples come out in plan order:
one that needs more attempts holds back the ones after it (at most a few batches' worth).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.plan import SampleSpec
from synthgen.recipe.quality import QualityConfig
from synthgen.recipe.quality_stats import ImageVerdict, SampleVerdict, image_passes
from synthgen.render.gate import Gate
from synthgen.render.renderer import Renderer

Attempt = Callable[[SampleSpec, int], SampleSpec]  # (the plan's spec, attempt k) -> what to render


class QualityFailure(SynthgenError):
    """A sample failed its checks `max_attempts` times under `on_fail: fail` (or, balanced, its
    cell's every replacement failed): the shard fails, naming the sample and what failed."""


@dataclass(frozen=True)
class GatedSample:
    spec: SampleSpec  # what was rendered for the kept image (its seed; a replacement's labels)
    image: Image.Image | None  # None: dropped
    verdict: SampleVerdict


@dataclass
class GateSeconds:
    """Where a shard's time went: rendering every attempt, judging them, and the share of both
    spent on images that were rejected (or dropped)."""

    render: float = 0.0
    gate: float = 0.0
    rejected: float = 0.0


@dataclass
class _Pending:
    position: int  # in the shard
    spec: SampleSpec  # the plan's
    attempt: int = 0
    failures: dict[str, int] = field(default_factory=dict)


def render_gated(
    renderer: Renderer,
    gate: Gate,
    specs: Sequence[SampleSpec],
    attempt: Attempt,
    quality: QualityConfig,
    balanced: bool,
    seconds: GateSeconds,
) -> Iterator[GatedSample]:
    """Every sample of `specs`, in order, decided: accepted, kept failing, or dropped."""
    limit = quality.attempt_limit(balanced)
    names = [c.check.name for c in gate.checks]
    failure_keys = names + [f"{c.check.name}.{r.label}" for c in gate.checks for r in c.check.rules]
    fresh = deque(
        _Pending(i, spec, 0, dict.fromkeys(failure_keys, 0)) for i, spec in enumerate(specs)
    )
    retry: deque[_Pending] = deque()
    decided: dict[int, GatedSample] = {}
    next_out = 0
    while fresh or retry:
        batch = []
        while len(batch) < renderer.batch_size and (retry or fresh):
            batch.append((retry or fresh).popleft())
        tried = [attempt(p.spec, p.attempt) for p in batch]
        started = time.perf_counter()
        images = [image for _, image in renderer.render(tried)]
        rendered = time.perf_counter()
        verdicts = gate.judge([spec.labels for spec in tried], images)
        seconds.render += rendered - started
        seconds.gate += time.perf_counter() - rendered
        cost = (time.perf_counter() - started) / len(batch)
        for pending, spec, image, verdict in zip(batch, tried, images, verdicts):
            _count_failures(pending.failures, verdict)
            outcome = _decide(pending, spec, image, verdict, limit, quality, balanced)
            if outcome is None:
                pending.attempt += 1
                retry.append(pending)
            else:
                decided[pending.position] = outcome
            if outcome is None or outcome.image is None:
                seconds.rejected += cost
        while next_out in decided:
            yield decided.pop(next_out)
            next_out += 1


def _count_failures(failures: dict[str, int], verdict: ImageVerdict) -> None:
    for check, labels in verdict.items():
        failures[check] += not all(v.passed for v in labels.values())
        for label, v in labels.items():
            failures[f"{check}.{label}"] += not v.passed


def _decide(
    pending: _Pending,
    spec: SampleSpec,
    image: Image.Image,
    verdict: ImageVerdict,
    limit: int,
    quality: QualityConfig,
    balanced: bool,
) -> GatedSample | None:
    """The sample's outcome after this attempt, or None when it goes again."""
    attempts = pending.attempt + 1
    replaced = balanced and quality.on_fail == "drop" and pending.attempt >= quality.max_attempts
    result = SampleVerdict(attempts, verdict, dict(pending.failures), replaced=replaced)
    if image_passes(verdict):
        return GatedSample(spec, image, result)
    if attempts < limit:
        return None
    failed = sorted(f"{c}.{label}" for c, labels in verdict.items()
                    for label, v in labels.items() if not v.passed)  # fmt: skip
    if quality.on_fail == "keep":
        return GatedSample(spec, image, result)
    if quality.on_fail == "drop" and not balanced:
        return GatedSample(spec, None, SampleVerdict(attempts, verdict, result.failures, True))
    if balanced and quality.on_fail == "drop":
        raise QualityFailure(
            f"sample {spec.key} of balance cell '{spec.cell}' failed {', '.join(failed)} in all "
            f"{attempts} attempts ({quality.replacements} replacements of {quality.max_attempts}): "
            "the cell's quota cannot be met; raise quality.replacements or loosen the check",
            where="quality",
        )
    raise QualityFailure(
        f"sample {spec.key} failed {', '.join(failed)} in all {attempts} attempts "
        "(quality.on_fail: fail)",
        where="quality.on_fail",
    )
