"""LoRA files in every layout found in the wild, at the SynthMed adapters' rank 64 and alpha 32,
each fused by synthgen and by diffusers' own `load_lora_weights` on the same base weights: the
fused UNet and text-encoder weights agree to 3e-8 (and the images on the same seeds), with the
alpha the file states, the recipe states, or (warned) alpha = rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_files import (
    peft_lora_state,
    render_pair,
    text_encoder_lora_state,
    write_attn_procs_layout,
    write_kohya_layout,
    write_peft_folder,
    write_peft_layout,
)

from synthgen.errors import ModelError
from synthgen.recipe.schema import LoraConfig, ModelConfig
from synthgen.render.pipeline import _preset_components, load_pipeline, quiet_libraries

RANK, ALPHA = 64, 32.0
WEIGHT_TOLERANCE = 3e-8


@pytest.fixture(scope="module")
def components():
    return _preset_components("tiny")


@pytest.fixture(scope="module")
def unet_state(components):
    return peft_lora_state(components["unet"], rank=RANK)


@pytest.fixture(scope="module")
def full_state(components, unet_state):
    return {**unet_state, **text_encoder_lora_state(components["text_encoder"], rank=RANK)}


def diffusers_fused(path, scale: float = 1.0):
    """diffusers' reference path: load_lora_weights on the file, fuse, unload."""
    from diffusers import StableDiffusionPipeline

    quiet_libraries()
    pipe = StableDiffusionPipeline(**_preset_components("tiny"), requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def synthgen_fused(path, **lora):
    return load_pipeline(ModelConfig(base="tiny", lora=LoraConfig(path=str(path), **lora)))


def max_weight_difference(ours, theirs) -> float:
    worst = 0.0
    for name in ("unet", "text_encoder"):
        mine, reference = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == reference.keys()
        for key, tensor in mine.items():
            worst = max(worst, (tensor - reference[key]).abs().max().item())
    return worst


def assert_same_as_diffusers(ours, reference) -> None:
    assert max_weight_difference(ours, reference) <= WEIGHT_TOLERANCE
    np.testing.assert_allclose(render_pair(ours, 3), render_pair(reference, 3), atol=1e-6)


def test_peft_metadata_file_gets_its_own_alpha(tmp_path, full_state):
    path = write_peft_layout(full_state, tmp_path / "lora.safetensors", alpha=ALPHA)
    ours, lora = synthgen_fused(path)
    assert (lora.rank, lora.alpha, lora.alpha_source) == (RANK, ALPHA, "file: PEFT metadata")
    assert lora.modules == len(full_state) // 2 and lora.warnings == ()
    assert_same_as_diffusers(ours, diffusers_fused(path))
    # The update is alpha / rank = 0.5 of up @ down: checked by hand on one layer.
    base = _preset_components("tiny")["unet"].state_dict()
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    delta = ours.unet.state_dict()[f"{module}.weight"] - base[f"{module}.weight"]
    expected = (
        0.5
        * full_state[f"unet.{module}.lora_B.weight"]
        @ full_state[f"unet.{module}.lora_A.weight"]
    )
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)


def test_a_recipe_alpha_that_contradicts_the_file_is_refused(tmp_path, unet_state):
    path = write_peft_layout(unet_state, tmp_path / "lora.safetensors", alpha=ALPHA)
    assert synthgen_fused(path, alpha=ALPHA)[1].alpha_source == "file: PEFT metadata"
    with pytest.raises(ModelError) as caught:
        synthgen_fused(path, alpha=64)
    assert caught.value.where == "model.lora.alpha"
    assert "says 32" in caught.value.message and "\n" not in caught.value.describe()


def test_kohya_alpha_tensors(tmp_path, full_state):
    path = write_kohya_layout(full_state, tmp_path / "kohya.safetensors", rank=RANK, alpha=ALPHA)
    ours, lora = synthgen_fused(path)
    assert (lora.rank, lora.alpha, lora.alpha_source) == (RANK, ALPHA, "file: .alpha tensors")
    assert lora.layout.startswith("kohya") and lora.modules == len(full_state) // 2
    assert_same_as_diffusers(ours, diffusers_fused(path))


def test_peft_save_pretrained_folder_loads_with_the_config_alpha(tmp_path, components, unet_state):
    folder = write_peft_folder(components["unet"], unet_state, tmp_path / "adapter", RANK, ALPHA)
    ours, lora = synthgen_fused(folder)
    assert (lora.rank, lora.alpha, lora.alpha_source) == (RANK, ALPHA, "file: adapter_config.json")
    assert lora.layout.startswith("PEFT save_pretrained")
    # diffusers cannot read the folder; its reference is the same tensors with the same config.
    reference = write_peft_layout(unet_state, tmp_path / "ref" / "lora.safetensors", alpha=ALPHA)
    assert_same_as_diffusers(ours, diffusers_fused(reference))


def test_a_file_without_alpha_takes_the_recipe_alpha(tmp_path, unet_state):
    path = write_peft_layout(unet_state, tmp_path / "plain.safetensors")
    ours, lora = synthgen_fused(path, alpha=ALPHA)
    assert (lora.rank, lora.alpha, lora.alpha_source, lora.warnings) == (RANK, ALPHA, "recipe", ())
    reference = write_peft_layout(unet_state, tmp_path / "ref" / "lora.safetensors", alpha=ALPHA)
    assert_same_as_diffusers(ours, diffusers_fused(reference))


def test_a_file_without_alpha_runs_as_diffusers_with_one_warning(tmp_path, unet_state):
    path = write_peft_layout(unet_state, tmp_path / "plain.safetensors")
    ours, lora = synthgen_fused(path)
    assert lora.alpha == RANK and lora.alpha_source.startswith("assumed")
    (warning,) = lora.warnings
    assert "model.lora.alpha" in warning and "alpha = rank (64)" in warning and "\n" not in warning
    assert_same_as_diffusers(ours, diffusers_fused(path))


def test_attention_processor_file_loads(tmp_path, unet_state):
    path = write_attn_procs_layout(unet_state, tmp_path / "procs.safetensors")
    ours, lora = synthgen_fused(path, alpha=ALPHA)
    assert lora.layout.startswith("attention processors") and lora.alpha_source == "recipe"
    reference = write_peft_layout(unet_state, tmp_path / "ref" / "lora.safetensors", alpha=ALPHA)
    assert_same_as_diffusers(ours, diffusers_fused(reference))
    # Without an alpha: as diffusers loads the same keys under their `unet.` prefix.
    ours, lora = synthgen_fused(path)
    assert lora.alpha == RANK and len(lora.warnings) == 1
    prefixed = tmp_path / "ref" / "prefixed.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({f"unet.{k}": v for k, v in load_file(str(path)).items()}, str(prefixed))
    assert_same_as_diffusers(ours, diffusers_fused(prefixed))


def test_pre_peft_diffusers_file_loads(tmp_path, full_state):
    """diffusers' own layout before PEFT: `unet.<module>.lora.down.weight` and
    `text_encoder.<module>.lora_linear_layer.down.weight`, no alpha."""
    from safetensors.torch import save_file

    old = {}
    for key, tensor in full_state.items():
        layer = ".lora." if key.startswith("unet.") else ".lora_linear_layer."
        old[key.replace(".lora_A.", f"{layer}down.").replace(".lora_B.", f"{layer}up.")] = tensor
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    ours, lora = synthgen_fused(path)
    assert lora.layout.startswith("diffusers, pre-PEFT") and lora.modules == len(full_state) // 2
    assert_same_as_diffusers(ours, diffusers_fused(path))


def test_ranks_and_alphas_that_differ_per_module(tmp_path, unet_state):
    """kohya files may give each module its own rank and alpha: each is used for its module.

    diffusers 0.42 uses a module's own rank, but not its own kohya alpha (its alpha_pattern keeps
    the pre-PEFT key names, which match no module: PEFT warns and ignores them), so that one layer
    is checked by hand and every other against diffusers."""
    from safetensors.torch import load_file, save_file

    state = dict(unet_state)
    small = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state[f"{small}.lora_A.weight"] = state[f"{small}.lora_A.weight"][:8].clone()
    state[f"{small}.lora_B.weight"] = state[f"{small}.lora_B.weight"][:, :8].clone()
    path = write_kohya_layout(state, tmp_path / "kohya.safetensors", rank=RANK, alpha=ALPHA)
    tensors = load_file(str(path))
    own = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"
    tensors[f"lora_unet_{own.replace('.', '_')}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    ours, lora = synthgen_fused(path)
    assert (lora.rank, lora.alpha) == (RANK, ALPHA)  # the commonest of each
    reference = diffusers_fused(path).unet.state_dict()
    base = _preset_components("tiny")["unet"].state_dict()
    for key, tensor in ours.unet.state_dict().items():
        if key == f"{own}.weight":
            down, up = state[f"unet.{own}.lora_A.weight"], state[f"unet.{own}.lora_B.weight"]
            expected = base[key] + 4.0 / RANK * up @ down
            torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=1e-5)
        else:
            assert (tensor - reference[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


def test_scale_multiplies_the_alpha_update(tmp_path, unet_state):
    path = write_peft_layout(unet_state, tmp_path / "lora.safetensors", alpha=ALPHA)
    ours, _ = synthgen_fused(path, scale=0.5)
    assert max_weight_difference(ours, diffusers_fused(path, scale=0.5)) <= WEIGHT_TOLERANCE


def _with_stray_keys(unet_state) -> dict[str, torch.Tensor]:
    """The LoRA plus what does not land: a module the model lacks, a pair whose shapes do not fit
    and text-encoder keys under an unknown prefix (4 + 2 + 2 keys)."""
    state = dict(unet_state)
    missing = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"
    state[f"{missing}.lora_A.weight"] = torch.zeros(RANK, 64)
    state[f"{missing}.lora_B.weight"] = torch.zeros(64, RANK)
    wrong = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    state[f"{wrong}.lora_A.weight"] = torch.zeros(RANK, 64)  # the layer takes 32 inputs
    state["te_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, 32)
    state["te_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, RANK)
    return state


def test_keys_that_do_not_land_are_refused_unless_allowed(tmp_path, unet_state):
    from safetensors.torch import save_file

    stray = _with_stray_keys(unet_state)
    path = tmp_path / "partial.safetensors"
    save_file(stray, str(path))
    with pytest.raises(ModelError) as caught:
        synthgen_fused(path, alpha=ALPHA)
    message = caught.value.describe()
    assert f"6 of {len(stray)} LoRA keys" in message and "allow_partial: true" in message
    ours, lora = synthgen_fused(path, alpha=ALPHA, allow_partial=True)
    assert lora.modules == len(unet_state) // 2 - 1  # the pair that does not fit is dropped
    assert any(f"6 of {len(stray)} LoRA keys" in w and "dropped" in w for w in lora.warnings)
    wrong = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    kept = {k: v for k, v in unet_state.items() if not k.startswith(wrong)}
    reference = write_peft_layout(kept, tmp_path / "ref" / "lora.safetensors", alpha=ALPHA)
    assert max_weight_difference(ours, diffusers_fused(reference)) <= WEIGHT_TOLERANCE


VALIDATE_SCRIPT = """
import json, sys
from click.testing import CliRunner
from synthgen.cli import main
results = {}
for recipe in sys.argv[1:]:
    result = CliRunner().invoke(main, ["validate", recipe])
    results[recipe] = [result.exit_code, result.stdout, result.stderr]
results["torch imported"] = "torch" in sys.modules
print(json.dumps(results))
"""


def test_validate_inspects_the_lora_by_its_header_without_torch(tmp_path, components, full_state):
    import json
    import subprocess
    import sys

    from conftest import ROOT, small_recipe, write_recipe
    from safetensors.torch import save_file

    files = {
        "metadata": write_peft_layout(full_state, tmp_path / "m" / "lora.safetensors", alpha=ALPHA),
        "kohya": write_kohya_layout(
            full_state, tmp_path / "kohya.safetensors", rank=RANK, alpha=32
        ),
        "folder": write_peft_folder(components["unet"], full_state, tmp_path / "adapter", RANK, 32),
        "none": write_peft_layout(full_state, tmp_path / "n" / "lora.safetensors"),
        "procs": write_attn_procs_layout(full_state, tmp_path / "procs.safetensors"),
        "partial": tmp_path / "partial.safetensors",
    }
    save_file(_with_stray_keys(full_state), str(files["partial"]))
    recipes = []
    for name, path in files.items():
        recipe = small_recipe(name=name)
        recipe["model"] = {"base": "tiny", "lora": {"path": str(path)}}
        recipes.append(str(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    script = subprocess.run(
        [sys.executable, "-c", VALIDATE_SCRIPT, *recipes], capture_output=True, text=True,
        cwd=ROOT, check=True,
    )  # fmt: skip
    results = json.loads(script.stdout)
    assert results.pop("torch imported") is False
    out = {name: results[recipe] for name, recipe in zip(files, recipes)}
    code, stdout, stderr = out["metadata"]
    assert code == 0 and stderr == ""
    assert "lora: lora.safetensors: layout diffusers (PEFT keys)" in stdout
    assert "rank 64, alpha 32 (file: PEFT metadata): update = 0.5 × scale" in stdout
    assert (
        "targets to_k, to_out.0, to_q, to_v in 32 UNet modules; k_proj, out_proj, q_proj, v_proj"
        " in 8 text-encoder modules" in stdout
    )
    assert "shapes: 40 of 40 modules fit (the tiny preset's configs)" in stdout
    assert (
        "alpha 32 (file: .alpha tensors)" in out["kohya"][1] and "layout kohya" in out["kohya"][1]
    )
    assert "alpha 32 (file: adapter_config.json)" in out["folder"][1]
    assert "layout PEFT save_pretrained" in out["folder"][1]
    for name in ("none", "procs"):
        code, stdout, stderr = out[name]
        assert code == 0 and "alpha 64 (assumed: alpha = rank, as diffusers does)" in stdout
        assert stderr.count("\n") == 1 and stderr.startswith("warning: ") and "(64)" in stderr
    code, stdout, stderr = out["partial"]
    assert code == 2 and "Traceback" not in stderr and stderr.count("\n") == 1
    assert "model.lora: 6 of" in stderr and "allow_partial" in stderr


def test_shipped_synthmed_recipes_state_alpha_32():
    from conftest import ROOT

    from synthgen.recipe.schema import load_recipe

    with_lora = [load_recipe(path) for path in sorted((ROOT / "recipes").glob("*.yaml"))]
    with_lora = [recipe for recipe in with_lora if recipe.model.lora is not None]
    assert len(with_lora) == 6  # retina and cxr t2i, cxr-balanced, cxr-gated, the two i2i
    assert all(recipe.model.lora.alpha == 32 for recipe in with_lora)


def test_generate_warns_once_and_records_rank_alpha_and_source(tmp_path, unet_state):
    import json

    from conftest import run_cli, small_recipe, write_recipe

    path = write_peft_layout(unet_state, tmp_path / "lora" / "lora_weights.safetensors")
    records = {}
    for alpha in (None, ALPHA):
        recipe = small_recipe(num_samples=2, shard_size=2)
        recipe["splits"] = {"train": 1.0}
        recipe["model"] = {"base": "tiny", "lora": {"path": str(path)}}
        if alpha is not None:
            recipe["model"]["lora"]["alpha"] = alpha
        out = tmp_path / f"out-{alpha}"
        result = run_cli("generate", str(write_recipe(tmp_path / "r.yaml", recipe)), "-o", str(out))
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == (1 if alpha is None else 0), result.stderr
        records[alpha] = json.loads((out / "manifest.json").read_text())["model"]
    assert (records[None]["lora_rank"], records[None]["lora_alpha"]) == (RANK, RANK)
    assert records[None]["lora_alpha_source"].startswith("assumed")
    assert (records[ALPHA]["lora_alpha"], records[ALPHA]["lora_alpha_source"]) == (ALPHA, "recipe")
