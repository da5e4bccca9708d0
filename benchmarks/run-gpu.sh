#!/usr/bin/env bash
# The GPU benchmark in one command: `make bench-gpu` or `bash benchmarks/run-gpu.sh [ARGS]`;
# `bash benchmarks/run-gpu.sh tests` (`make test-gpu`) runs the tests marked gpu instead.
# Uses the venv's python when it sees CUDA (a GPU workstation after `make install TORCH=torch`);
# otherwise the machine's python3 and torch, plus the wheels in .whl/ that
# `benchmarks/gpu_wheels.py` downloaded (the lent GPU machines cannot reach PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
run=(benchmarks/bench.py --device cuda)
if [ "${1:-}" = tests ]; then
  shift
  run=(-m pytest -m gpu tests/test_gpu.py)
fi
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  exec .venv/bin/python "${run[@]}" "$@"
fi
if ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "bench-gpu: neither .venv/bin/python nor python3 has a torch that sees a CUDA device" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/synthgen-bench-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 "${run[@]}" "$@"
