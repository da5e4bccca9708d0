"""The quality gate's cost beside rendering: a Worker on the benchmark's T2I recipe with one check,
a ResNet-18-shaped network (random weights, about DenseNet-121's cost at 224²: 1.8 against 2.9
GFLOPs), judging every batch before it is encoded. The seconds come from the shards' own commit
records: `render` (every attempt), `gate` (the checks' forward passes and preprocessing) and
`rejected` (both, for images that were rendered again).

The issue's GPU target compares the gate with rendering per *accepted* image at an acceptance of
50% or more: both are paid once per attempt, so the ratio is the same per rendered image, and
`gate_share_of_render` is that ratio whatever the acceptance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from fixtures import Settings, bench_recipe
from torch import nn


def _block(channels_in: int, channels: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(),
    )  # fmt: skip


class ResNetShaped(nn.Module):
    """ResNet-18's layers and widths (without the skip additions, which cost nothing): a
    stand-in for a real check model's forward pass."""

    def __init__(self, classes: int = 2):
        super().__init__()
        widths = [64, 64, 128, 256, 512]
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                  nn.MaxPool2d(3, 2, 1)]  # fmt: skip
        for i in range(1, 5):
            layers += [_block(widths[i - 1], widths[i], 1 if i == 1 else 2),
                       _block(widths[i], widths[i], 1)]  # fmt: skip
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def export_check(path: Path, size: int) -> Path:
    """The check network as an exported program with a dynamic batch (what synthgen loads)."""
    torch.manual_seed(0)
    program = torch.export.export(
        ResNetShaped().eval(), (torch.rand(2, 3, size, size),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )  # fmt: skip
    torch.export.save(program, str(path))
    return path


def gate_case(settings: Settings, size: int, max_attempts: int = 4) -> dict:
    """Render `settings.count` samples through the gate; seconds per rendered image."""
    from synthgen.output.outdir import OutDir
    from synthgen.recipe.schema import recipe_from_dict
    from synthgen.run.generate import claim_output
    from synthgen.run.planning import build_plan
    from synthgen.run.worker import Worker

    with tempfile.TemporaryDirectory(prefix="synthgen-bench-gate-") as tmp:
        folder = Path(tmp)
        check = export_check(folder / "check.pt2", size)
        data = bench_recipe(settings, "t2i", None, folder).model_dump(
            mode="json", exclude_none=True
        )
        data["quality"] = {
            "max_attempts": max_attempts,
            "on_fail": "keep",
            "checks": {"resnet": {"model": str(check), "labels": {"sex": {}},
                                  "preprocess": {"size": size, "normalise": "imagenet"}}},
        }  # fmt: skip
        plan = build_plan(recipe_from_dict(data, file="<benchmark recipe>"))
        out = OutDir(str(folder / "out"))
        claim_output(out, plan.recipe, plan)
        worker = Worker(plan, out, settings.device)
        warm = plan.specs(plan.tasks[0])[: settings.batch_size]
        worker.gate.judge([s.labels for s in warm], [i for _, i in worker.renderer.render(warm)])
        seconds = {"render": 0.0, "gate": 0.0, "rejected": 0.0}
        images = accepted = 0
        for task in plan.tasks:
            record = worker.run_shard(task)
            for name in seconds:
                seconds[name] += record.seconds[name]
            images += record.quality.images
            accepted += record.quality.accepted
        worker.close()
    return {
        "case": "gate",
        "check": "ResNet-18-shaped exported program, random weights",
        "input": size,
        "samples": settings.count,
        "images_rendered": images,
        "accepted": accepted,
        "acceptance": round(accepted / images, 4),
        "render_s_per_image": round(seconds["render"] / images, 5),
        "gate_s_per_image": round(seconds["gate"] / images, 5),
        "rejected_s": round(seconds["rejected"], 3),
        "gate_share_of_render": round(seconds["gate"] / seconds["render"], 4),
    }
