#!/usr/bin/env bash
# Runs the test suite against the oldest supported stack next to the installed one, without touching
# it: transformers 5.17 and/or torch 2.11 (+ triton 3.6, the GPU machines' pair) go into side folders
# put first on PYTHONPATH.  Downloads ~4 GB for torch 2.11 (a CUDA build: it imports on CPU too).
#   bash scripts/compat.sh            # all four combinations
#   bash scripts/compat.sh tf517      # transformers 5.17 with the installed torch
set -euo pipefail
cd "$(dirname "$0")/.."
SIDE=${KVPASS_COMPAT_DIR:-$HOME/.cache/kvpass-compat}
want=${1:-all}
mkdir -p "$SIDE"
if [ ! -d "$SIDE/tf517/transformers" ]; then
  pip install -q --no-deps --target "$SIDE/tf517" transformers==5.17.0 "huggingface-hub<1.99" \
    httpx httpcore h11 certifi anyio sniffio
fi
if [ "$want" != tf517 ] && [ ! -d "$SIDE/t211/torch" ]; then
  pip install -q --target "$SIDE/t211" torch==2.11.0 triton==3.6.0
fi
run() { echo "== $1"; PYTHONPATH="$2" python -m pytest -q -p no:cacheprovider; }
run "transformers 5.17, installed torch" "$SIDE/tf517"
if [ "$want" != tf517 ]; then
  run "torch 2.11, installed transformers" "$SIDE/t211"
  run "torch 2.11, transformers 5.17" "$SIDE/tf517:$SIDE/t211"
fi
