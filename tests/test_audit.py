"""The audit end to end on controlled data where the answer is known."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from synthgen.audit.engine import (
    AuditError,
    AuditSettings,
    ChanceLevelWarning,
    LabelHead,
    SourceItem,
    SyntheticItem,
    load_embedder,
    run_audit,
)
from synthgen.audit.reid import wilson_interval
from synthgen.audit.report import PAIR_THUMB
from synthgen.hashing import file_sha256
from synthgen.preview.sheet import PAD

N_PATIENTS = 20  # two images ("eyes") each: 40 sources
SIZE = 32
EMBEDDER = "pixels:8"  # 192 features: keeps FID's matrix square root instant
QUIET = AuditSettings(embedder=EMBEDDER, progress=False)


def smooth_field(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random RGB texture, zero mean and about unit spread, float (size, size, 3)."""
    coarse = rng.normal(size=(6, 6, 3)).astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, -1)


def to_image(field: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(128 + 45 * field, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(20261124)
    fields = [smooth_field(rng) for _ in range(2 * N_PATIENTS)]
    sources = [
        SourceItem(
            source_id=f"SECRET-SRC-{i:04d}",
            patient_id=f"SECRET-PAT-{i // 2:04d}",
            image=to_image(f),
            labels={"brightness": float(np.asarray(to_image(f)).mean()), "side": "ab"[i % 2]},
        )
        for i, f in enumerate(fields)
    ]
    return fields, sources


def _noisy(fields, sources, levels, seed=0):
    """Synthetic = (source + level * smooth noise) / sqrt(1 + level^2): same contrast."""
    rng = np.random.default_rng(seed)
    items = []
    for strength, level in levels.items():
        for i, (f, source) in enumerate(zip(fields, sources, strict=True)):
            mixed = (f + level * smooth_field(rng)) / np.sqrt(1 + level**2)
            items.append(
                SyntheticItem(
                    f"syn-{strength:g}-{i:04d}", to_image(mixed), source.source_id, strength
                )
            )
    return items


def _audit(synthetic, sources, tmp_path, holdout=(), **options):
    settings = AuditSettings(**{"embedder": EMBEDDER, "progress": False, **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_audit(
            synthetic, sources, report_dir=tmp_path / "report", holdout=holdout, settings=settings
        )
    return report, [w for w in caught if issubclass(w.category, ChanceLevelWarning)]


def _group(report, name):
    return next(g for g in report["groups"] if g["name"] == name)


def test_identical_synthetic_images_are_always_reidentified(cohort, tmp_path):
    fields, sources = cohort
    synthetic = [
        SyntheticItem(f"syn-{i:04d}", s.image, s.source_id, 0.1) for i, s in enumerate(sources)
    ]
    report, chance_warnings = _audit(synthetic, sources, tmp_path)
    group = _group(report, "i2i strength=0.1")
    n = len(sources)
    for level, gallery in (("image", n), ("patient", N_PATIENTS)):
        reid = group["reidentification"][level]
        assert reid["gallery_size"] == gallery
        assert reid["top1"]["value"] == 1.0
        assert reid["top1"]["ci95"] == list(wilson_interval(n, n))
        assert reid["top1"]["ci95"][0] == pytest.approx(n / (n + 1.959963984540054**2))
        assert reid["top1"]["chance"] == pytest.approx(1 / gallery)
        assert reid["top5"]["chance"] == pytest.approx(5 / gallery)
        assert reid["top1"]["risk"] == 1.0
        assert reid["top1"]["n"] == n
        assert reid["mean_rank"]["value"] == 1.0
        assert reid["verification_auc"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert group["fidelity"]["psnr_db"]["value"] == 100.0
    assert group["fidelity"]["ssim"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert group["distribution"]["fid"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert group["distribution"]["precision"]["value"] == 1.0
    assert group["distribution"]["coverage"]["value"] == 1.0
    assert chance_warnings == []


def test_shuffled_sources_are_near_chance_and_warned(cohort, tmp_path):
    _, sources = cohort
    n = len(sources)
    shift = np.roll(np.arange(n), 7)  # every synthetic is another patient's image
    synthetic = [
        SyntheticItem(f"syn-{i:04d}", sources[shift[i]].image, sources[i].source_id, 0.5)
        for i in range(n)
    ]
    report, chance_warnings = _audit(synthetic, sources, tmp_path)
    reid = _group(report, "i2i strength=0.5")["reidentification"]
    for level in ("image", "patient"):
        for k in ("top1", "top5"):
            rate = reid[level][k]
            assert rate["ci95"][0] <= rate["chance"]  # not distinguishable from guessing
            assert abs(rate["risk"]) < 0.15
        assert 0.3 < reid[level]["verification_auc"]["value"] < 0.7
    assert reid["image"]["mean_rank"]["value"] > 5
    assert chance_warnings and "no better than chance" in str(chance_warnings[0].message)
    assert report["warnings"] and all("not proof of privacy" in w for w in report["warnings"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Warnings" in md


def test_growing_noise_lowers_reidentification_monotonically(cohort, tmp_path):
    fields, sources = cohort
    levels = {0.0: 0.0, 0.2: 2.0, 0.4: 3.0, 0.6: 4.5, 0.8: 7.0, 1.0: 50.0}
    report, _ = _audit(_noisy(fields, sources, levels), sources, tmp_path)
    groups = [_group(report, f"i2i strength={s:g}") for s in levels]
    top1 = [g["reidentification"]["image"]["top1"]["value"] for g in groups]
    top5 = [g["reidentification"]["patient"]["top5"]["value"] for g in groups]
    ssim = [g["fidelity"]["ssim"]["value"] for g in groups]
    mean_rank = [g["reidentification"]["image"]["mean_rank"]["value"] for g in groups]
    assert top1[0] == 1.0
    assert all(a >= b for a, b in zip(top1, top1[1:])), top1
    assert all(a >= b for a, b in zip(top5, top5[1:])), top5
    assert all(a > b for a, b in zip(ssim, ssim[1:])), ssim
    assert all(a <= b for a, b in zip(mean_rank, mean_rank[1:])), mean_rank
    assert top1[0] - top1[-1] > 0.8
    last = groups[-1]["reidentification"]["image"]["top1"]
    assert last["ci95"][0] <= last["chance"]  # pure noise: back to chance

    overall = _group(report, "i2i all strengths")
    assert overall["n_synthetic"] == len(levels) * len(sources)
    hits = sum(round(t * len(sources)) for t in top1)
    assert overall["reidentification"]["image"]["top1"]["value"] == pytest.approx(
        hits / overall["n_synthetic"]
    )

    folder = tmp_path / "report"
    rows = list(csv.DictReader(open(folder / "report.csv")))
    assert [r["group"] for r in rows] == [g["name"] for g in report["groups"]]
    assert [float(r["image_top1"]) for r in rows[: len(levels)]] == pytest.approx(top1)
    assert rows[0]["mode"] == "i2i" and float(rows[1]["strength"]) == 0.2
    for name in ("tradeoff.png", "pairs.png", "report.md", "report.json"):
        assert (folder / name).stat().st_size > 0
    with Image.open(folder / "tradeoff.png") as plot:
        assert plot.size[0] > 300


def _estimates(node):
    if isinstance(node, dict):
        if "value" in node and "direction" in node:
            yield node
        for value in node.values():
            yield from _estimates(value)
    elif isinstance(node, list):
        for value in node:
            yield from _estimates(value)


def test_report_keeps_ids_out_and_records_settings(cohort, tmp_path, monkeypatch):
    fields, sources = cohort
    captions = []
    import synthgen.audit.report as audit_report

    real_sheet = audit_report._pair_sheet
    monkeypatch.setattr(
        audit_report,
        "_pair_sheet",
        lambda pairs, path, title: (
            captions.extend(p.caption for p in pairs),
            real_sheet(pairs, path, title),
        ),
    )
    report, _ = _audit(_noisy(fields, sources, {0.3: 0.5}), sources, tmp_path)
    folder = tmp_path / "report"
    for name in ("report.json", "report.csv", "report.md"):
        text = (folder / name).read_text()
        assert "SECRET" not in text, name
    assert captions and not any("SECRET" in c for c in captions)
    assert all(c.startswith("syn-") and "rank" in c for c in captions)
    saved = json.loads((folder / "report.json").read_text())
    settings = saved["settings"]
    assert settings["embedder"] == EMBEDDER
    assert settings["embedder_weights_sha256"] == "none"
    assert (settings["n_sources"], settings["n_patients"], settings["n_synthetic"]) == (40, 20, 40)
    assert settings["date"]
    estimates = list(_estimates(saved["groups"]))
    assert len(estimates) >= 16  # 8 re-identification, 2 fidelity, 6 distribution
    for estimate in estimates:
        assert {"value", "ci95", "n", "direction"} <= set(estimate)
    group = saved["groups"][0]
    assert group["label_utility"] == {
        "computed": False,
        "reason": "no predictor was given (--predictor)",
    }
    assert group["fidelity"]["lpips"]["computed"] is False
    assert any("lower bound" in note for note in saved["notes"])
    assert any("no parity" in note for note in saved["notes"])


def test_lazy_loaders_and_different_sizes(cohort, tmp_path):
    _, sources = cohort
    lazy_sources = [SourceItem(s.source_id, s.patient_id, (lambda s=s: s.image)) for s in sources]
    synthetic = [
        SyntheticItem(
            f"syn-{i:04d}", (lambda s=s: s.image.resize((64, 64), Image.BICUBIC)), s.source_id, None
        )
        for i, s in enumerate(sources)
    ]
    report, _ = _audit(synthetic, lazy_sources, tmp_path, batch_size=7)
    group = _group(report, "i2i")
    assert group["reidentification"]["image"]["top1"]["value"] == 1.0
    assert group["fidelity"]["psnr_db"]["value"] > 30  # resized back to 32x32 before comparing
    assert group["fidelity"]["ssim"]["value"] > 0.95


@pytest.fixture(scope="module")
def torchscript_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)

    class Predict(torch.nn.Module):  # mean brightness (numeric), side logits from one pixel
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = x.flatten(1).mean(1, keepdim=True) * 255
            return torch.cat([bright, -x[:, :1, 0, 0], x[:, :1, 0, 0]], 1)

    torch.manual_seed(0)
    embed_path, predict_path = folder / "embed.pt", folder / "predict.pt"
    torch.jit.save(torch.jit.script(Embed().eval()), str(embed_path))
    torch.jit.save(torch.jit.script(Predict().eval()), str(predict_path))
    return embed_path, predict_path


def test_torchscript_embedder_and_predictor(cohort, tmp_path, torchscript_models):
    fields, sources = cohort
    embed_path, predict_path = torchscript_models
    heads = [LabelHead("brightness", "numeric"), LabelHead("side", "categorical", ("a", "b"))]
    report, _ = _audit(
        _noisy(fields, sources, {0.1: 0.0, 0.9: 3.0}),
        sources,
        tmp_path,
        embedder=f"{embed_path}?size=32",
        predictor=f"torchscript:{predict_path}?size=32",
        label_heads=heads,
    )
    settings = report["settings"]
    assert settings["embedder_weights_sha256"] == file_sha256(embed_path)
    assert settings["predictor_weights_sha256"] == file_sha256(predict_path)
    exact = _group(report, "i2i strength=0.1")
    assert exact["reidentification"]["image"]["top1"]["value"] == 1.0
    brightness = exact["label_utility"]["labels"]["brightness"]
    assert brightness["label_vs_predicted_on_synthetic"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert brightness["predicted_on_source_vs_on_synthetic"]["value"] == pytest.approx(
        1.0, abs=1e-3
    )
    noisy = _group(report, "i2i strength=0.9")["label_utility"]["labels"]["brightness"]
    assert noisy["label_vs_predicted_on_synthetic"]["value"] < 0.9
    side = exact["label_utility"]["labels"]["side"]
    assert set(side) >= {
        "accuracy_on_synthetic",
        "auc_on_synthetic",
        "agreement_source_vs_synthetic",
    }
    assert side["agreement_source_vs_synthetic"]["value"] == 1.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "brightness" in md


def test_memorisation_flags_copied_training_images(cohort, tmp_path):
    fields, sources = cohort
    rng = np.random.default_rng(5)
    holdout = [SourceItem(f"H{i}", f"HP{i}", to_image(smooth_field(rng))) for i in range(40)]
    copies = [SyntheticItem(f"t2i-copy-{i}", sources[i].image, None, None) for i in range(5)]
    fresh = [
        SyntheticItem(f"t2i-new-{i}", to_image(smooth_field(rng)), None, None) for i in range(35)
    ]
    report, _ = _audit(copies + fresh, sources, tmp_path, holdout=holdout)
    memo = report["memorisation"]
    assert memo["n_synthetic"] == 40
    assert memo["threshold"]["n_reference"] == 40
    assert {c["key"] for c in memo["closest"][:5]} == {f"t2i-copy-{i}" for i in range(5)}
    assert all(c["above"] for c in memo["closest"][:5])
    assert memo["above_threshold"]["value"] >= 5 / 40
    assert memo["closer_to_training_than_holdout"]["n"] == 40
    assert (tmp_path / "report" / "memorisation.png").exists()
    assert "Memorisation" in (tmp_path / "report" / "report.md").read_text()
    assert [g["name"] for g in report["groups"]] == ["t2i"]


def test_every_setting_reaches_the_report(cohort, tmp_path):
    """One audit of i2i and t2i rows together: each AuditSettings field changes what is written."""
    fields, sources = cohort
    copies = [SyntheticItem(f"t2i-copy-{i}", sources[i].image, None, None) for i in range(3)]
    report, _ = _audit(
        _noisy(fields, sources, {0.3: 0.5}) + copies,
        sources,
        tmp_path,
        batch_size=9,
        lpips=None,
        distribution=False,
        memorisation_quantile=0.5,
        contact_pairs=2,
        extra={"recipe": "deid.yaml"},
    )
    assert [g["name"] for g in report["groups"]] == ["i2i strength=0.3", "t2i"]
    assert all("distribution" not in group for group in report["groups"])
    lpips = report["groups"][0]["fidelity"]["lpips"]
    assert lpips == {"computed": False, "reason": "not requested"}
    memo = report["memorisation"]
    assert memo["threshold"]["quantile"] == 0.5 and memo["n_synthetic"] == 3
    assert len(memo["closest"]) == 2 and all(
        c["key"].startswith("t2i-copy") for c in memo["closest"]
    )
    assert report["settings"]["recipe"] == "deid.yaml"
    assert report["settings"]["n_holdout"] == 0
    two_pairs = PAD + 2 * (2 * PAIR_THUMB + 2 * PAD)  # one row of two pair tiles
    for sheet in ("pairs.png", "memorisation.png"):
        with Image.open(tmp_path / "report" / sheet) as image:
            assert image.width == two_pairs, sheet


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda syn, src: [SyntheticItem("k1", syn[0].image, None, 0.5)],
            "absent from the linkage",
        ),
        (lambda syn, src: [SyntheticItem("k1", syn[0].image, "nope", 0.5)], "none of the 1"),
        (lambda syn, src: syn + [SyntheticItem("k9", syn[0].image, "nope", 0.5)], "1 of 41"),
        (lambda syn, src: syn + [syn[0]], "appears twice"),
    ],
)
def test_bad_linkage_is_a_clear_error(cohort, tmp_path, change, message):
    _, sources = cohort
    synthetic = [SyntheticItem(f"s{i}", s.image, s.source_id, 0.5) for i, s in enumerate(sources)]
    with pytest.raises(AuditError, match=message) as caught:
        run_audit(change(synthetic, sources), sources, report_dir=tmp_path, settings=QUIET)
    assert "SECRET" not in str(caught.value)


def test_bad_cohorts_are_clear_errors(cohort, tmp_path):
    _, sources = cohort
    synthetic = [SyntheticItem("s0", sources[0].image, sources[0].source_id, 0.5)]
    with pytest.raises(AuditError, match="duplicate source id") as caught:
        run_audit(synthetic, sources + [sources[3]], report_dir=tmp_path, settings=QUIET)
    assert caught.value.where == "source #40" and "SECRET" not in str(caught.value)
    with pytest.raises(AuditError, match="at least 2"):
        run_audit(synthetic, sources[:1], report_dir=tmp_path, settings=QUIET)
    with pytest.raises(AuditError, match="shares patients"):
        run_audit(synthetic, sources, holdout=sources[:2], report_dir=tmp_path, settings=QUIET)
    with pytest.raises(AuditError, match="both a predictor and its label heads"):
        with_predictor = AuditSettings(predictor="pixels", progress=False)
        run_audit(synthetic, sources, report_dir=tmp_path, settings=with_predictor)
    broken = [
        SyntheticItem("s0", lambda: Image.open("/nonexistent.png"), sources[0].source_id, 0.5)
    ]
    with pytest.raises(AuditError, match="cannot read the image of synthetic 's0'"):
        run_audit(broken, sources, report_dir=tmp_path, settings=QUIET)


def test_embedders_that_cannot_load_offline_are_clear_errors(tmp_path):
    with pytest.raises(AuditError, match="unknown embedder"):
        load_embedder("clip-vit", "cpu")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.bin"))  # safetensors by its bytes
    with pytest.raises(AuditError, match="weights only; name its architecture"):
        load_embedder(str(tmp_path / "weights.bin"), "cpu")
    with pytest.raises(AuditError, match="no such file"):
        load_embedder(str(tmp_path / "missing.pt"), "cpu")
    not_script = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(AuditError, match="a torch.save zip archive of pickles"):
        load_embedder(str(not_script), "cpu")
    with pytest.raises(AuditError, match="only \\?size=N"):
        load_embedder("pixels?colour=1", "cpu")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(AuditError, match="needs torchvision"):
            load_embedder("torchvision:resnet18", "cpu")
    try:
        import timm  # noqa: F401
    except Exception:
        with pytest.raises(AuditError, match="needs timm"):
            load_embedder("timm:resnet18@/x.safetensors", "cpu")


def test_exported_program_embedder(tmp_path):
    class Thumbnail(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 4).flatten(1)

    example = torch.rand(2, 3, 16, 16)
    batch = torch.export.Dim("batch")
    program = torch.export.export(Thumbnail(), (example,), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "thumb.pt2"
    torch.export.save(program, str(path))
    embedder = load_embedder(f"{path}?size=16", "cpu")
    features = embedder.embed([Image.new("RGB", (40, 30), (255, 0, 0))] * 5)
    assert features.shape == (5, 48)
    assert features[0, :16] == pytest.approx(torch.ones(16))
    assert embedder.weights_sha256 == file_sha256(path)
    (tmp_path / "junk.pt2").write_bytes(b"nothing")
    with pytest.raises(AuditError, match="not a saved TorchScript or exported program"):
        load_embedder(str(tmp_path / "junk.pt2"), "cpu")


def test_pixels_embedder_is_pixel_correlation():
    embedder = load_embedder("pixels:4", "cpu")
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    features = embedder.embed([image, image.point(lambda v: v // 2 + 10)])
    assert features.shape == (2, 48)
    assert features.mean(1) == pytest.approx([0, 0], abs=1e-5)
    # an affine change of brightness keeps the standardised pixels (up to rounding)
    cosine = torch.nn.functional.cosine_similarity(features[0:1], features[1:2]).item()
    assert cosine > 0.99
    assert embedder.weights_sha256 == "none"


def test_psnr_and_ssim_against_hand_computed_values():
    from synthgen.audit.fidelity import psnr_ssim, ssim_batch, to_pair_tensors

    grey = torch.full((3, 16, 16), 0.5)
    psnr, ssim = psnr_ssim([(grey + 0.1, grey), (grey, grey)])
    assert psnr[0] == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 10·log10(1/0.01)
    assert psnr[1] == 100.0  # identical: capped
    assert ssim[1] == pytest.approx(1.0)
    # SSIM brute force: every 11x11 window of a 14x13 image, Gaussian weights, float64
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 14, 13, generator=gen, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(1, 1, 14, 13, generator=gen, dtype=torch.float64)).clamp(0, 1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    values = []
    for i in range(14 - 10):
        for j in range(13 - 10):
            a, b = x[0, 0, i : i + 11, j : j + 11], y[0, 0, i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            c1, c2 = 0.01**2, 0.03**2
            values.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    assert ssim_batch(x, y).item() == pytest.approx(torch.stack(values).mean().item(), abs=1e-9)
    # different sizes: compared at the smaller size, never upsampled
    big, small = (
        Image.new("RGB", (64, 48), (200, 10, 10)),
        Image.new("RGB", (32, 24), (200, 10, 10)),
    )
    syn, src = to_pair_tensors(big, small)
    assert syn.shape == src.shape == (3, 24, 32)
    syn, src = to_pair_tensors(small, big)
    assert syn.shape == src.shape == (3, 24, 32)
