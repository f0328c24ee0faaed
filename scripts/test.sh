#!/usr/bin/env bash
# The test suite, on a fresh machine or an installed one: set-up (idempotent), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m pytest -q --durations=15 "$@"
# the C++ kernels' tests once more under ASan + UBSan (the usual fuzz examples; scripts/sanitize.sh alone runs 10x)
KVPASS_FUZZ_SCALE=${KVPASS_FUZZ_SCALE:-1} bash scripts/sanitize.sh
# the benchmark suites' quick mode, as a smoke test (timed, but not a gate on timing: machines differ)
out=$(mktemp --suffix=.json)
"${PYTHON:-python3}" -m kvpass.cli bench --quick --output "$out"
rm -f "$out"
