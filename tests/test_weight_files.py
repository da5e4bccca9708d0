"""Weight files are opened by their bytes, never their name: real `torch.save` pickles under every
disguise are refused before any loader sees them (LoRAs, local model folders, audit embedders,
predictors and state dicts), and a malicious pickle's payload never runs.

The payload creates a marker file when unpickled; `test_the_payload_is_live` shows it does under
an unsafe load, so its absence elsewhere means something. torch's own safe unpickler would also
stop it, so each refusal is also shown to happen before torch.load / torch.jit.load /
torch.export.load is called at all (they are replaced by tripwires: a spy, not a mock of behaviour).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, small_recipe, write_recipe
from PIL import Image
from safetensors.torch import save_file

from synthgen.audit.embedders import AuditError, load_embedder, read_state_dict
from synthgen.errors import ModelError
from synthgen.recipe.schema import LoraConfig, ModelConfig
from synthgen.render.pipeline import load_pipeline
from synthgen.weight_files import (
    RefusedWeightFile,
    exported_program,
    program_kind,
    read_safetensors_header,
    what_it_is,
)


class Payload:
    """Unpickling this creates `marker` (through the GLOBAL builtins.open)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A real torch.save checkpoint (zip, or the legacy format) carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"weight": torch.zeros(2), "payload": Payload(marker)}
    torch.save(state, str(path), _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD-RAN"


@pytest.fixture
def tripwires(monkeypatch):
    """torch's pickle-reading entry points raise if anything reaches them."""
    reached = []

    def tripwire(name):
        def reached_it(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} was reached")

        return reached_it

    for owner, name in ((torch, "load"), (torch.jit, "load"), (torch.export, "load"),
                        (pickle, "load"), (pickle, "loads")):  # fmt: skip
        monkeypatch.setattr(owner, name, tripwire(f"{owner.__name__}.{name}"))
    return reached


def test_the_payload_is_live(tmp_path, marker):
    path = write_pickle(tmp_path / "x.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(path), weights_only=True)  # what stopped it before: torch's safe unpickler
    assert not marker.exists()
    torch.load(str(path), weights_only=False)
    assert marker.exists()


# --- the sniffing itself -----------------------------------------------------------------------


def test_what_it_is_from_the_bytes(tmp_path, marker):
    assert "pickle file" in what_it_is(write_pickle(tmp_path / "a.safetensors", marker, True))
    assert "zip archive" in what_it_is(write_pickle(tmp_path / "b.safetensors", marker))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert what_it_is(tmp_path / "empty.safetensors") == "an empty file"
    good = tmp_path / "good.bin"
    save_file({"w": torch.zeros(2, 3)}, str(good), metadata={"k": "v"})
    header = read_safetensors_header(good)
    assert header.tensors["w"].shape == (2, 3) and header.metadata == {"k": "v"}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-4])  # the data no longer covers the tensor
    for bad in (cut, tmp_path / "a.safetensors", tmp_path / "empty.safetensors"):
        with pytest.raises(RefusedWeightFile):
            read_safetensors_header(bad)
    assert not marker.exists()


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(RefusedWeightFile, match="not a regular file"):
        read_safetensors_header(fifo)


# --- LoRA files ----------------------------------------------------------------------------------

LORA_DISGUISES = {  # name -> (file to write, legacy format, recipe lora section)
    "pth.tar": ("lora.pth.tar", False, {"path": "lora.pth.tar"}),
    "weights": ("lora.weights", False, {"path": "lora.weights"}),
    "pt2": ("lora.pt2", False, {"path": "lora.pt2"}),
    "no-extension": ("lora", False, {"path": "lora"}),
    "weight_name": ("loras/weights.pth.tar", False, {"path": "loras", "weight_name": "weights.pth.tar"}),
    "safetensors-name": ("lora.safetensors", True, {"path": "lora.safetensors"}),
    "bin": ("lora.bin", True, {"path": "lora.bin"}),
    "ckpt": ("lora.ckpt", False, {"path": "lora.ckpt"}),
}  # fmt: skip

VALIDATE = """
import json, sys
from click.testing import CliRunner
from synthgen.cli import main
print(json.dumps({r: [(x := CliRunner().invoke(main, ["validate", r])).exit_code, x.stderr]
                  for r in sys.argv[1:]}))
"""


def validate_all(recipes: list[Path]) -> dict[str, tuple[int, str]]:
    """`synthgen validate` on each recipe, in one interpreter: {recipe: (exit code, stderr)}."""
    done = subprocess.run([sys.executable, "-c", VALIDATE, *map(str, recipes)], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return {name: tuple(result) for name, result in json.loads(done.stdout).items()}


def assert_refused_line(code: int, stderr: str, field: str, found: str) -> None:
    assert code == 2 and "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert f": {field}: " in stderr and found in stderr, stderr


def _lora_recipe(folder: Path, lora: dict) -> Path:
    recipe = small_recipe()
    recipe["model"] = {"base": "tiny", "lora": {**lora, "path": str(folder / lora["path"])}}
    return write_recipe(folder / "recipe.yaml", recipe)


def test_pickle_loras_are_refused_under_every_disguise(tmp_path, marker, tripwires):
    recipes, expected = [], []
    for name, (file, legacy, lora) in LORA_DISGUISES.items():
        folder = tmp_path / name
        write_pickle(folder / file, marker, legacy)
        recipes.append(_lora_recipe(folder, lora))
        field = "model.lora.weight_name" if "weight_name" in lora else "model.lora.path"
        expected.append((field, "a pickle file" if legacy else "a zip archive"))
        config = LoraConfig(**{**lora, "path": str(folder / lora["path"])})
        with pytest.raises(ModelError) as caught:
            load_pipeline(ModelConfig(base="tiny", lora=config))
        assert caught.value.where == field and expected[-1][1] in caught.value.message
    results = validate_all(recipes)
    for recipe, (field, found) in zip(recipes, expected):
        assert_refused_line(*results[str(recipe)], field, found)
    assert tripwires == [] and not marker.exists()


# --- local model folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    load_pipeline(ModelConfig(base="tiny"))[0].save_pretrained(folder)
    return folder


def _render(pipe) -> np.ndarray:
    return pipe("retina", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


FOLDER_DISGUISES = {  # name -> (component file replaced by a pickle, file removed, legacy)
    "unet-safetensors-name": ("unet/diffusion_pytorch_model.safetensors", None, False),
    "unet-legacy-under-safetensors-name": ("unet/diffusion_pytorch_model.safetensors", None, True),
    "vae-only-bin": ("vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors", True),
    "text-encoder-only-bin": ("text_encoder/pytorch_model.bin", "text_encoder/model.safetensors", False),
}  # fmt: skip


def test_model_folders_with_pickle_weights_are_refused(tmp_path, tiny_folder, marker, tripwires):
    recipes, expected = [], []
    for name, (planted, removed, legacy) in FOLDER_DISGUISES.items():
        folder = tmp_path / name
        shutil.copytree(tiny_folder, folder)
        if removed:
            (folder / removed).unlink()
        write_pickle(folder / planted, marker, legacy)
        found = f"'{planted}' is " + ("a pickle file" if legacy else "a zip archive")
        expected.append(found)
        with pytest.raises(ModelError) as caught:
            load_pipeline(ModelConfig(base=str(folder)))
        assert caught.value.where == "model.base" and found in caught.value.message
        recipe = small_recipe()
        recipe["model"] = {"base": str(folder)}
        recipes.append(write_recipe(tmp_path / f"{name}.yaml", recipe))
    results = validate_all(recipes)
    for recipe, found in zip(recipes, expected):
        assert_refused_line(*results[str(recipe)], "model.base", found)
    assert tripwires == [] and not marker.exists()


def test_pickles_beside_safetensors_are_never_opened(tmp_path, tiny_folder, marker, tripwires):
    """With use_safetensors=True diffusers and transformers open only the safetensors files: a
    malicious pickle under every other name they know stays unopened, and the folder loads."""
    folder = tmp_path / "with-pickles"
    shutil.copytree(tiny_folder, folder)
    for planted in ("unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
                    "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.ckpt",
                    "text_encoder/model.ckpt", "sd-v1-4.ckpt"):  # fmt: skip
        write_pickle(folder / planted, marker)
    loaded = load_pipeline(ModelConfig(base=str(folder)))[0]
    reference = load_pipeline(ModelConfig(base=str(tiny_folder)))[0]
    np.testing.assert_array_equal(_render(loaded), _render(reference))
    assert tripwires == [] and not marker.exists()


# --- audit embedders, predictors and state dicts -------------------------------------------------

EMBEDDER_DISGUISES = ["embed.pt", "embed.pth", "embed.ts", "embed.jit", "embed.pt2", "embed",
                      "torchscript:embed.bin", "embed.safetensors"]  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_embedders_and_predictors_are_refused(tmp_path, marker, tripwires, legacy):
    found = "a pickle file" if legacy else "a torch.save zip archive of pickles"
    for name in EMBEDDER_DISGUISES:
        path = write_pickle(tmp_path / name.removeprefix("torchscript:"), marker, legacy)
        spec = f"torchscript:{path}" if name.startswith("torchscript:") else str(path)
        for keep_head in (False, True):  # an embedder, and a predictor
            with pytest.raises(AuditError, match=found):
                load_embedder(f"{spec}?size=8", "cpu", keep_head=keep_head)
    for name in ("weights.pt", "weights.pth", "weights.safetensors"):
        path = write_pickle(tmp_path / name, marker, legacy)
        with pytest.raises(AuditError, match="synthgen reads state dicts only from safetensors"):
            read_state_dict(f"torchvision:resnet18@{path}", path)
    assert tripwires == [] and not marker.exists()


class Thumbnail(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)


def _rewritten(path: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> Path:
    """A copy of a zip archive with some members' bytes replaced (by name suffix) or added."""
    out = path.with_name(f"crafted-{len(list(path.parent.glob('crafted-*')))}-{path.name}")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith(k)), None)
            dst.writestr(info.filename, src.read(info) if data is None else data)
        for name, data in (add or {}).items():
            dst.writestr(f"{root}/{name}", data)
    return out


def _pickle_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"payload": Payload(marker)}, buffer)
    return buffer.getvalue()


def test_torchscript_pickles_are_read_by_torchscripts_own_unpickler(tmp_path, marker):
    """A TorchScript archive is accepted by its layout; a crafted data.pkl inside it does not run
    (torch.jit.load's C++ unpickler calls no Python function): the reliance documented in
    synthgen.weight_files."""
    path = tmp_path / "embed.pt"
    torch.jit.save(torch.jit.script(Thumbnail()), str(path))
    assert program_kind(path) == "torchscript"
    crafted = _rewritten(path, {"/data.pkl": pickle.dumps(Payload(marker), protocol=2)})
    assert program_kind(crafted) == "torchscript"
    with pytest.raises(AuditError, match="does not load as TorchScript"):
        load_embedder(str(crafted), "cpu")
    assert not marker.exists()
    stray = _rewritten(path, {}, {"payload.pkl": pickle.dumps(Payload(marker))})
    with pytest.raises(AuditError, match="stray member"):
        load_embedder(str(stray), "cpu")


class ScaledThumbnail(Thumbnail):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))  # a weight, stored as a PT2 payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale)


@pytest.fixture
def exported(tmp_path) -> Path:
    program = torch.export.export(ScaledThumbnail(), (torch.rand(2, 3, 16, 16),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})  # fmt: skip
    path = tmp_path / "thumb.pt2"
    torch.export.save(program, str(path))
    return path


def test_exported_programs_load_without_unpickling_anything(tmp_path, exported, marker):
    crafted = _rewritten(exported, {"sample_inputs/model.pt": _pickle_bytes(marker)})
    # torch.export.load itself unpickles the sample inputs, falling back to weights_only=False:
    control = tmp_path / "control-marker"
    with contextlib.suppress(Exception):
        torch.export.load(
            str(_rewritten(exported, {"sample_inputs/model.pt": _pickle_bytes(control)}))
        )
    assert control.exists(), "torch.export.load runs a pickle in the sample inputs"
    embedder = load_embedder(f"{crafted}?size=16", "cpu")
    assert embedder.embed([Image.new("RGB", (16, 16))]).shape == (1, 48)
    assert not marker.exists()


def test_exported_programs_with_pickled_parts_are_refused(exported, marker, tripwires):
    with zipfile.ZipFile(exported) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = archive.read(name)
    pickled = json.loads(config)
    for entry in pickled["config"].values():
        entry["use_pickle"] = True
    cases = {
        "pickled weights": _rewritten(exported, {"model_weights_config.json": json.dumps(pickled).encode(),
                                                 "weights/weight_0": _pickle_bytes(marker)}),
        "outside the layout": _rewritten(exported, {}, {"data/aotinductor/model/model.so": b"\x7fELF"}),
    }  # fmt: skip
    for what, path in cases.items():
        with pytest.raises(RefusedWeightFile, match=what):
            exported_program(path)
        with pytest.raises(AuditError, match=what):
            load_embedder(str(path), "cpu")
    assert tripwires == [] and not marker.exists()
