#!/usr/bin/env bash
# The test suite, on a fresh machine or an installed one: set-up (idempotent), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m pytest -q "$@"
# the benchmark suite, smallest size, run once without timing: it must not rot (numbers: README)
exec "${PYTHON:-python3}" -m pytest -q benchmarks -k "8k and not 128k" --benchmark-disable -p no:cacheprovider
