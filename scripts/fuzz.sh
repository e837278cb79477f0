#!/usr/bin/env bash
# The API fuzzer (tests/api_fuzz) under a memory checker, for a time budget.
#
#   scripts/fuzz.sh [asan|valgrind|native] [SECONDS] [CALLS]   (default: asan 60)
#
# Stops after SECONDS, or after CALLS API calls if given. A process stops
# itself once the library's documented leaks (threads exiting with
# coroutines suspended) hold half its fd limit; the script then goes on in
# a fresh process with a fresh seed, and prints the total.
#
# asan: builds the fuzzer the way scripts/memcheck.sh asan builds the tests
#   (RUSTC_BOOTSTRAP=1 RUSTFLAGS=-Zsanitizer=address, --target
#   x86_64-unknown-linux-gnu, corosensei's `sanitizer` feature, own target
#   dir target/memcheck-asan) and runs it with COROLOOP_ASAN=1. LeakSanitizer
#   is off: the fuzzer leaks on purpose (the library's documented leaks at
#   thread exit, its "freed" kernel buffers) and accounts for every value
#   itself (a canary neither dropped nor reported by a log line fails).
# valgrind: a debug build under memcheck (target/memcheck-valgrind); steps
#   get 120 s before they count as a hang; no io_uring (valgrind emulates
#   it only in part; COROLOOP_FUZZ_NO_URING=1).
# native: a release build.
#
# A fresh seed each run unless COROLOOP_FUZZ_SEED is set; the seed is
# printed first. Other knobs: see tests/api_fuzz/main.rs. Exits non-zero on
# the first failing program, after shrinking it and printing it as Rust.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-asan}
SECS=${2:-60}
CALLS=${3:-999999999999}
export RUST_BACKTRACE=1
# Runs the fuzzer command "$@" again, with a fresh seed, until the SECS and
# CALLS budgets are spent (or a program fails).
run_batches() {
    local start=$(date +%s) total=0 rc=0 left out
    while :; do
        left=$((SECS - ($(date +%s) - start)))
        [ "$left" -le 0 ] && break
        [ "$total" -ge "$CALLS" ] && break
        out=$(mktemp)
        set +e
        COROLOOP_FUZZ_SECS=$left COROLOOP_FUZZ_CALLS=$((CALLS - total)) "$@" 2>&1 | tee "$out"
        rc=${PIPESTATUS[0]}
        set -e
        n=$(grep -oE '[0-9]+ API calls' "$out" | tail -1 | grep -oE '^[0-9]+' || echo 0)
        total=$((total + n))
        rm -f "$out"
        [ "$rc" -ne 0 ] && break
        # A fixed seed replays one process only.
        [ -n "${COROLOOP_FUZZ_SEED:-}" ] && break
    done
    echo "fuzz.sh: $total API calls in $(($(date +%s) - start)) s, exit $rc"
    return "$rc"
}

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
    export COROLOOP_ASAN=1
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=102:detect_stack_use_after_return=0:allow_user_segv_handler=1:${ASAN_OPTIONS:-}"
    run_batches "$exe" --exact fuzz_long --ignored --nocapture
    ;;
valgrind)
    exe=$(CARGO_TARGET_DIR=$PWD/target/memcheck-valgrind \
        cargo test --no-run --message-format=json --test api_fuzz | exe_of)
    export COROLOOP_FUZZ_HANG_SECS=${COROLOOP_FUZZ_HANG_SECS:-120}
    # valgrind emulates io_uring only in part (a run with io_uring contexts
    # stalled under it, every thread asleep): epoll contexts and
    # thread-pool/CoFd reads only.
    export COROLOOP_FUZZ_NO_URING=${COROLOOP_FUZZ_NO_URING:-1}
    run_batches valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --quiet \
        "$exe" --exact fuzz_long --ignored --nocapture
    ;;
native)
    exe=$(cargo test --release --no-run --message-format=json --test api_fuzz | exe_of)
    run_batches "$exe" --exact fuzz_long --ignored --nocapture
    ;;
*)
    echo "usage: $0 [asan|valgrind|native] [SECONDS]" >&2
    exit 2
    ;;
esac
