#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer.  Builds both C++ libraries (the
# torch ops and the onnxruntime op library) with KVPASS_SANITIZE=1 — under their own cache names, the
# normal builds are untouched — and runs the kernel tests with the sanitizer runtimes preloaded, the
# hypothesis fuzz tests at KVPASS_FUZZ_SCALE times their usual examples (default 10: 1,100 cases across
# shapes, dtypes, GQA ratios, estimators, empty and one-token stores).  Every report is written to
# $OUT (default: a fresh temporary folder) and counted; exits 1 when there is any.
#   bash scripts/sanitize.sh            # ~15 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t kvpass-sanitize.XXXXXX)}
mkdir -p "$OUT"
CXX=${CXX:-c++}
asan=$($CXX -print-file-name=libasan.so)
ubsan=$($CXX -print-file-name=libubsan.so)
[ -f "$asan" ] && [ -f "$ubsan" ] || { echo "sanitize: $CXX ships no libasan/libubsan" >&2; exit 2; }
export KVPASS_SANITIZE=1 KVPASS_FUZZ_SCALE=${KVPASS_FUZZ_SCALE:-10}
# Python itself is not instrumented: its own allocations are not leaks to report (detect_leaks=0)
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:log_path=$OUT/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$OUT/ubsan"
echo "sanitize: building with -fsanitize=address,undefined (reports go to $OUT)" >&2
LD_PRELOAD="$asan:$ubsan" "$PY" -c "import kvpass.cpu_ops as c; c.load(); c.ort_library_path()"
status=0
LD_PRELOAD="$asan:$ubsan" "$PY" -m pytest -q -p no:cacheprovider tests/cpu_ops tests/test_ops.py \
    tests/kvpass/test_ort_op.py tests/runtime "$@" || status=$?
reports=$(find "$OUT" -type f \( -name 'asan*' -o -name 'ubsan*' \) | wc -l)
echo "sanitize: $reports sanitizer report file(s) in $OUT; pytest exit status $status"
for f in $(find "$OUT" -type f | head -5); do echo "== $f"; head -40 "$f"; done
[ "$reports" -eq 0 ] && [ "$status" -eq 0 ]
