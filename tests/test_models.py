"""Model loading on the offline presets: LoRA layouts, fusing, local directories, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_files import peft_lora_state, render_pair, write_kohya_layout, write_peft_layout

from synthgen.errors import ModelError
from synthgen.hashing import file_sha256
from synthgen.recipe.schema import LoraConfig, ModelConfig
from synthgen.render.model_files import check_model_reference
from synthgen.render.pipeline import _preset_components, load_pipeline


@pytest.fixture(scope="module")
def lora_state():
    return peft_lora_state(_preset_components("tiny")["unet"])


@pytest.fixture(scope="module")
def base_images():
    return render_pair(load_pipeline(ModelConfig(base="tiny"))[0])


def test_peft_and_kohya_layouts_load_to_the_same_weights(tmp_path, lora_state, base_images):
    peft = write_peft_layout(lora_state, tmp_path / "peft.safetensors")
    kohya = write_kohya_layout(lora_state, tmp_path / "kohya.safetensors")
    with_peft, lora = load_pipeline(ModelConfig(base="tiny", lora=LoraConfig(path=str(peft))))
    with_kohya, _ = load_pipeline(ModelConfig(base="tiny", lora=LoraConfig(path=str(kohya))))
    peft_images, kohya_images = render_pair(with_peft), render_pair(with_kohya)
    assert np.abs(peft_images - base_images).max() > 0.05, "the LoRA must change the output"
    np.testing.assert_allclose(peft_images, kohya_images, atol=1e-5)
    assert lora.sha256 == file_sha256(peft)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fused_equals_unfused(tmp_path, lora_state, scale):
    path = write_peft_layout(lora_state, tmp_path / "lora.safetensors")
    config = ModelConfig(base="tiny", lora=LoraConfig(path=str(path), scale=scale))
    fused = render_pair(load_pipeline(config, fuse=True)[0])
    unfused = render_pair(load_pipeline(config, fuse=False)[0])
    np.testing.assert_allclose(fused, unfused, atol=1e-4)


def test_lora_scale_changes_output(tmp_path, lora_state):
    path = write_peft_layout(lora_state, tmp_path / "lora.safetensors")
    full = render_pair(load_pipeline(ModelConfig(base="tiny", lora=LoraConfig(path=str(path))))[0])
    half = LoraConfig(path=str(path), scale=0.5)
    assert (
        np.abs(full - render_pair(load_pipeline(ModelConfig(base="tiny", lora=half))[0])).max()
        > 0.01
    )


def test_lora_in_a_directory_with_weight_name(tmp_path, lora_state):
    folder = tmp_path / "synthmed-loras" / "hpp-retina"
    folder.mkdir(parents=True)
    write_peft_layout(lora_state, folder / "lora_weights.safetensors")
    config = LoraConfig(
        path=str(tmp_path / "synthmed-loras"), weight_name="hpp-retina/lora_weights.safetensors"
    )
    _, lora = load_pipeline(ModelConfig(base="tiny", lora=config))
    assert lora.sha256 == file_sha256(folder / "lora_weights.safetensors")


def test_local_diffusers_directory_matches_the_preset(tmp_path, base_images):
    pipe, _ = load_pipeline(ModelConfig(base="tiny"))
    pipe.save_pretrained(tmp_path / "tiny-dir")
    loaded, lora = load_pipeline(ModelConfig(base=str(tmp_path / "tiny-dir")))
    np.testing.assert_allclose(render_pair(loaded), base_images, atol=1e-6)
    assert lora is None


def test_uncached_hub_model_is_one_clear_error():
    with pytest.raises(ModelError) as caught:
        load_pipeline(ModelConfig(base="synthgen-test/not-a-cached-model"))
    message = caught.value.describe()
    assert "model.base" in message and "local directory" in message and "\n" not in message


def test_missing_local_files_are_caught_before_loading(tmp_path):
    with pytest.raises(ModelError, match="model.base"):
        check_model_reference(ModelConfig(base=str(tmp_path / "nope")))
    missing = LoraConfig(path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match="model.lora.path"):
        check_model_reference(ModelConfig(base="tiny", lora=missing))
    (tmp_path / "loras").mkdir()
    in_dir = LoraConfig(path=str(tmp_path / "loras"), weight_name="cxr/lora_weights.safetensors")
    with pytest.raises(ModelError, match="model.lora.weight_name"):
        check_model_reference(ModelConfig(base="tiny", lora=in_dir))


def test_not_a_lora_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "junk.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match="model.lora"):
        load_pipeline(ModelConfig(base="tiny", lora=LoraConfig(path=str(path))))
