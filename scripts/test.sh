#!/usr/bin/env bash
# The test suite, on a fresh machine or an installed one: set-up (idempotent), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
