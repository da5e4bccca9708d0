"""Start-up time: the light commands never import the heavy libraries.

`synthgen --help`, `schema` and `validate` of a recipe without a quality gate stay torch-free, and
reading an OUT's bookkeeping does not import matplotlib until something is drawn. Each check runs
in a fresh interpreter, since this test session has imported torch long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

HEAVY = ("torch", "diffusers", "transformers", "torchmetrics", "matplotlib", "timm", "ray")

PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""

VALIDATE = """
from click.testing import CliRunner
from synthgen.cli import main
for args in {commands!r}:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output)
"""


def heavy_imports(body: str) -> list[str]:
    """The heavy libraries in sys.modules after a fresh interpreter runs `body`."""
    script = PROBE.format(body=body, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_imports_no_heavy_library():
    assert heavy_imports("import synthgen.cli") == []


def test_validate_and_schema_are_torch_free():
    """transformers may load, for the tokenizer that counts the prompt's tokens (no torch)."""
    # demo: the built-in tiny model; cxr-t2i: a Hub base and a Hub LoRA, looked up in the cache
    commands = [
        ["--help"],
        ["schema"],
        ["validate", "recipes/demo.yaml"],
        ["validate", "recipes/cxr-t2i.yaml"],
    ]
    assert heavy_imports(VALIDATE.format(commands=commands)) in ([], ["transformers"])


def test_reading_an_out_imports_matplotlib_only_to_draw():
    body = "import synthgen.output.manifest, synthgen.output.read, synthgen.preview.plots"
    assert heavy_imports(body) == []
