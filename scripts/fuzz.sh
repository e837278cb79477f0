#!/usr/bin/env bash
# The API fuzzer (tests/api_fuzz) under a memory checker, for a time budget.
#
#   scripts/fuzz.sh [asan|valgrind|native] [SECONDS]    (default: asan 60)
#
# asan: builds the fuzzer the way scripts/memcheck.sh asan builds the tests
#   (RUSTC_BOOTSTRAP=1 RUSTFLAGS=-Zsanitizer=address, --target
#   x86_64-unknown-linux-gnu, corosensei's `sanitizer` feature, own target
#   dir target/memcheck-asan) and runs it with COROLOOP_ASAN=1. LeakSanitizer
#   is off: the fuzzer leaks on purpose (the library's documented leaks at
#   thread exit, its "freed" kernel buffers) and accounts for every value
#   itself (a canary neither dropped nor reported by a log line fails).
# valgrind: a debug build under memcheck (target/memcheck-valgrind); steps
#   get 120 s before they count as a hang.
# native: a release build.
#
# A fresh seed each run unless COROLOOP_FUZZ_SEED is set; the seed is
# printed first. Other knobs: see tests/api_fuzz/main.rs. Exits non-zero on
# the first failing program, after shrinking it and printing it as Rust.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-asan}
SECS=${2:-60}
export COROLOOP_FUZZ_SECS=$SECS
export RUST_BACKTRACE=1

exe_of() {
    # The api_fuzz test executable from a cargo JSON build log.
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "api_fuzz":
        print(m["executable"])
'
}

case "$MODE" in
asan)
    target=x86_64-unknown-linux-gnu
    exe=$(CARGO_TARGET_DIR=$PWD/target/memcheck-asan RUSTC_BOOTSTRAP=1 \
        RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes" \
        cargo test --no-run --message-format=json --test api_fuzz --target "$target" \
        --features corosensei/sanitizer | exe_of)
    COROLOOP_ASAN=1 \
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=102:detect_stack_use_after_return=0:allow_user_segv_handler=1:${ASAN_OPTIONS:-}" \
        "$exe" --exact fuzz_long --ignored --nocapture
    ;;
valgrind)
    exe=$(CARGO_TARGET_DIR=$PWD/target/memcheck-valgrind \
        cargo test --no-run --message-format=json --test api_fuzz | exe_of)
    COROLOOP_FUZZ_HANG_SECS=${COROLOOP_FUZZ_HANG_SECS:-120} \
        valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --quiet \
        "$exe" --exact fuzz_long --ignored --nocapture
    ;;
native)
    exe=$(cargo test --release --no-run --message-format=json --test api_fuzz | exe_of)
    "$exe" --exact fuzz_long --ignored --nocapture
    ;;
*)
    echo "usage: $0 [asan|valgrind|native] [SECONDS]" >&2
    exit 2
    ;;
esac
