"""Finalize: once every shard is committed, write `manifest.json` and the dataset card.

Idempotent and driven only by what is in OUT (the recipe as run, the commit records, the model
record), so `synthgen finalize OUT` can redo it at any time, from any process.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import tarfile
from collections.abc import Iterable, Sequence

import pandas as pd
import pyarrow.parquet as pq
import yaml

from synthgen import __version__
from synthgen.errors import OutputError
from synthgen.labels import Categorical, Multilabel
from synthgen.modelfiles import PRESETS
from synthgen.outdir import COMMITS, OutDir
from synthgen.plan import ShardTask, strength_tag
from synthgen.preview import plots_markdown, sheet_markdown, write_previews
from synthgen.recipe import Recipe, recipe_from_dict
from synthgen.summary import label_rows, markdown_table

MODEL_RECORD = ".synthgen/model.json"
AUDIT_RECORD = ".synthgen/audit.json"  # written by `synthgen audit --append-to-card`
CITATION = """@misc{yayastupp2026synthmed,
  title  = {Privacy-Preserving Synthetic Medical Images via Image Conditioned Diffusion Models},
  author = {Yaya-Stupp, Doron and Lutsker, Guy and Spiegel, Or and Segal, Eran},
  year   = {2026}
}"""


def read_recipe(out: OutDir) -> Recipe:
    if not out.exists("recipe.yaml"):
        raise OutputError("no recipe.yaml: this is not a synthgen output directory", file=out.url)
    return recipe_from_dict(yaml.safe_load(out.read_text("recipe.yaml")), file="recipe.yaml")


def library_versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "peft", "datasets", "webdataset", "pyarrow")
    versions = {"synthgen": __version__}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def label_encodings(recipe: Recipe) -> dict[str, dict]:
    """How training code turns each label into a target (read by synthgen.data)."""
    encodings = {}
    for name, spec in recipe.labels.items():
        if isinstance(spec, Categorical):
            encodings[name] = {"kind": "categorical", "names": list(spec.values)}
        elif isinstance(spec, Multilabel):
            encodings[name] = {"kind": "multilabel", "names": list(spec.values), "none": spec.none}
        else:
            encodings[name] = {"kind": "numeric" if spec.dist != "constant" else "constant"}
    return encodings


def read_label_frame(out: OutDir, recipe: Recipe, records: Iterable[dict]) -> pd.DataFrame:
    """Label values (categoricals as names) of every committed sample."""
    frames = []
    for record in records:
        paths = sorted(record["files"], key=lambda p: not p.endswith(".parquet"))
        data = out.read_bytes(paths[0])
        if paths[0].endswith(".parquet"):
            frame = pq.read_table(io.BytesIO(data), columns=list(recipe.labels)).to_pandas()
            for name, spec in recipe.labels.items():
                if isinstance(spec, Categorical):
                    frame[name] = [spec.from_stored(i) for i in frame[name]]
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                metas = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
            frame = pd.DataFrame([m["labels"] for m in metas])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_manifest(out: OutDir, recipe: Recipe, tasks: list[ShardTask]) -> dict:
    records = out.committed_records()
    run = out.run_record() or {}
    missing = [t.name for t in tasks if t.name not in records]
    if missing:
        raise OutputError(
            f"{len(missing)} of {len(tasks)} shards are not committed yet (first: {missing[0]}); "
            "run `synthgen generate` again to finish them",
            file=out.url,
        )
    shards = [records[t.name] for t in tasks]
    counts: dict[str, int] = {}
    by_strength: dict[str, int] = {}
    for shard in shards:
        counts[shard["split"]] = counts.get(shard["split"], 0) + shard["count"]
        if shard.get("strength") is not None:
            key = f"{shard['strength']:g}"
            by_strength[key] = by_strength.get(key, 0) + shard["count"]
    model = json.loads(out.read_text(MODEL_RECORD)) if out.exists(MODEL_RECORD) else {}
    return {
        "name": recipe.name,
        "complete": True,
        "mode": recipe.generation.mode,
        "recipe_sha256": recipe.sha256(),
        "versions": library_versions(),
        "model": model,
        "num_samples": sum(counts.values()),
        "counts": counts,
        "counts_by_strength": by_strength,
        "labels": label_encodings(recipe),
        "skipped": run.get("skipped", []),
        "shards": [
            {k: s.get(k) for k in ("name", "split", "shard", "count", "files", "sizes", "strength")}
            for s in shards
        ],
    }


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M" if n < 1_000_000 else "1M<n<10M"


def card_header(recipe: Recipe, manifest: dict) -> dict:
    splits = [
        {"split": split, "path": f"parquet/{split}-*.parquet"} for split in manifest["counts"]
    ]
    header = {
        "license": recipe.license,
        "pretty_name": recipe.name,
        "tags": ["synthetic", "synthgen", "medical"],
        "annotations_creators": ["machine-generated"],
        "size_categories": [size_category(manifest["num_samples"])],
        "task_categories": ["image-classification", "text-to-image"],
    }
    if "parquet" in recipe.output.formats:
        # Only Parquet is declared: `datasets` picks one builder for every config of a repo.
        configs = [{"config_name": "default", "data_files": splits, "default": True}]
        for strength in (
            recipe.generation.strengths() if len(recipe.generation.strengths()) > 1 else []
        ):
            tag = strength_tag(strength)
            files = [
                {"split": split, "path": f"parquet/{split}-{tag}-*.parquet"}
                for split in manifest["counts"]
            ]
            configs.append({"config_name": f"strength-{strength:g}", "data_files": files})
        header["configs"] = configs
    return header


def summary_markdown(summary: dict) -> str:
    """The audit table of the card's privacy section."""
    lines = [
        f"Audit (`synthgen audit`, embedder `{summary['embedder']}`, {summary['date'][:10]}): "
        "top-1 re-identification of the true source (image) and patient, with 95% intervals, "
        "beside chance. The embedder gives a lower bound on risk; a stronger attacker may do better.",
        "",
        "| group | n | image top-1 | patient top-1 | chance (image) |",
        "|---|---|---|---|---|",
    ]
    for g in summary["groups"]:
        if g["image"]["value"] is None:
            continue
        cells = []
        for level in ("image", "patient"):
            low, high = g[level]["ci95"]
            cells.append(f"{g[level]['value']:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(
            f"| {g['group']} | {g['n']} | {cells[0]} | {cells[1]} | {g['image']['chance']:.4f} |"
        )
    return "\n".join(lines)


PRIVACY_HEADING = "## Privacy"


def privacy_section(out: OutDir, recipe: Recipe, manifest: dict) -> str:
    """For i2i: what de-identification by diffusion does and does not do (the seed's findings)."""
    if recipe.generation.mode != "i2i":
        return ""
    strengths = ", ".join(f"{s:g}" for s in recipe.generation.strengths())
    per_strength = "\n".join(f"| {s} | {n} |" for s, n in manifest["counts_by_strength"].items())
    skipped = len(manifest["skipped"])
    audit_text = "No audit has been run yet (`synthgen audit OUT --append-to-card`)."
    if out.exists(AUDIT_RECORD):
        audit_text = summary_markdown(json.loads(out.read_text(AUDIT_RECORD)))
    return f"""
{PRIVACY_HEADING}

Each image was made from a real source image by image-to-image diffusion at strength
{strengths} (0 keeps the source, 1 ignores it). This is **de-identification by diffusion:
re-identification risk is reduced, not removed.** On retinal fundus images the SynthMed study
measured top-1 re-identification falling from 100% at strength 0.1 to about 2% at strength 1.0,
while biomarker agreement fell from r=0.83 to 0.32; **chest X-rays stayed substantially
re-identifiable even at high strengths.** Measure the risk of this dataset with `synthgen audit`
before sharing it, and share it under a data-use agreement where the risk is not negligible.

Nothing from the source cohort is in this dataset except the declared labels
({", ".join(recipe.labels) or "none"}) and the synthetic pixels: no file names, paths, ids,
other columns or image metadata. Keys are opaque and do not follow the cohort's order. The link
from each key to its source image is kept apart, in a linkage table that is not published.

| strength | samples |
|---|---|
{per_strength}

Source rows skipped as unusable: {skipped} (row numbers and reasons are in `manifest.json`).

{audit_text}
"""


def render_card(
    out: OutDir, recipe: Recipe, manifest: dict, frame: pd.DataFrame, previews: Sequence[str] = ()
) -> str:
    model = manifest["model"]
    preset_note = ""
    if model.get("base") in PRESETS:
        preset_note = (
            f" The base model here is the built-in `{model['base']}` preset with random weights:"
            " its images are noise, not anatomy."
        )
    g = recipe.generation
    lora = "none"
    if model.get("lora"):
        lora = (
            f"`{model['lora']}` / `{model.get('lora_weight_name')}` at scale "
            f"{model.get('lora_scale')} (sha256 `{model.get('lora_sha256')}`)"
        )
    counts = "\n".join(f"| {s} | {n} |" for s, n in manifest["counts"].items())
    asked = "\n".join(f"- `{name}`: {spec.describe()}" for name, spec in recipe.labels.items())
    header = yaml.safe_dump(card_header(recipe, manifest), sort_keys=False)
    return f"""---
{header}---

# {recipe.name}

{recipe.description or "A synthetic medical-image dataset."}

**Every image in this dataset is synthetic**, generated by [synthgen](https://pypi.org/project/synthgen/)
{__version__} from the recipe below. It contains {manifest["num_samples"]} images.

{sheet_markdown(previews)}

## Load it

```python
from datasets import load_dataset
ds = load_dataset("PATH_OR_REPO_ID")        # the Parquet files, images decoded, labels typed
```

The same samples are in WebDataset tar shards under `webdataset/` for streaming:

```python
import webdataset as wds
ds = wds.WebDataset("webdataset/train-{{000000..000009}}.tar").decode("pil")
for sample in ds:
    image, meta = sample["{recipe.output.image_format}"], sample["json"]
```

## Generator

| | |
|---|---|
| base model | `{model.get("base")}` (revision {model.get("revision") or "default"}) |
| LoRA | {lora} |
| scheduler | {recipe.model.scheduler} |
| mode | {g.mode} |
| steps | {g.steps} |
| guidance scale | {g.guidance_scale} |
| size | {g.width}×{g.height} |
| negative prompt | {g.negative_prompt or "none"} |
| seed | {recipe.seed} |
| prompt template | `{recipe.prompt}` |
| recipe sha256 | `{manifest["recipe_sha256"]}` |

## Splits

| split | samples |
|---|---|
{counts}

## Labels

Asked for:

{asked or "- no labels"}

Asked vs drawn:

{markdown_table(label_rows(recipe, frame))}

{plots_markdown(previews)}

## Intended use and limitations

These images are synthetic. They are meant for pretraining, augmentation, method development and
teaching; they are **not for diagnosis** or any clinical decision.{preset_note} Labels are the
conditioning the generator was asked for, not findings read off the images: how well an image
shows its label depends on the model.
{privacy_section(out, recipe, manifest)}
## Recipe

```yaml
{recipe.to_yaml()}```

## Citation

The conditioning scheme and models follow:

```bibtex
{CITATION}
```

## License

{recipe.license}
"""


def finalize(out: OutDir) -> dict:
    """Write manifest.json and README.md from what OUT holds; returns the manifest."""
    from synthgen.runs import planned_tasks

    recipe = read_recipe(out)
    manifest = build_manifest(out, recipe, planned_tasks(out))
    # Shard leftovers only: another rank may be finalizing too, with its own README tmp file.
    out.remove_temporaries(("webdataset/", "parquet/", COMMITS + "/"))
    frame = read_label_frame(out, recipe, manifest["shards"])
    # sampled from the committed shards: no rendering, and no second read of the commit records
    previews = write_previews(out, recipe, frame, records=manifest["shards"])
    out.write_atomic("README.md", render_card(out, recipe, manifest, frame, previews).encode())
    out.write_atomic("manifest.json", json.dumps(manifest, indent=2).encode())
    if "webdataset" in recipe.output.formats:
        from synthgen.data import write_wids_index  # torch and webdataset: only when needed

        write_wids_index(out, manifest)
    return manifest
