#!/usr/bin/env bash
# Races examples/nbd_server against qemu-nbd and nbdkit (file plugin) on the
# same 1 GiB image, driven by `qemu-img bench` over NBD, one server at a
# time, alternating the order round by round.
#
#   scripts/nbd_bench.sh [ROUNDS] [MODES]    (defaults: 5, "threads:writeback")
#
# MODES is a space-separated list of AIO:CACHE pairs, e.g.
# "threads:writeback io_uring:writeback native:none io_uring:none": in each
# mode qemu-nbd runs with --aio=AIO --cache=CACHE and coroloop with
# --aio AIO --cache CACHE (nbdkit's file plugin has no such modes and runs
# as is, the same peer in every mode).
#
# Prints IOPS (MB/s for the sequential test) per server and round, the
# medians, and the median of the per-round ratios coroloop/qemu-nbd and
# coroloop/nbdkit. Installs qemu-utils and nbdkit with apt when missing.
# The image lives under target/ (O_DIRECT fails on tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-5}"
MODES="${2:-threads:writeback}"
PORT_BASE=$((20000 + RANDOM % 20000))

need() { command -v "$1" >/dev/null || {
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2"
}; }
need qemu-img qemu-utils
need qemu-nbd qemu-utils
need nbdkit nbdkit

cargo build --release --example nbd_server >/dev/null 2>&1 || cargo build --release --example nbd_server
OURS="${CARGO_TARGET_DIR:-target}/release/examples/nbd_server"

mkdir -p "${CARGO_TARGET_DIR:-target}"
DIR="$(mktemp -d -p "${CARGO_TARGET_DIR:-target}" nbd_bench.XXXXXX)"
IMG="$DIR/bench.img"
RESULTS="$DIR/results.txt"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

echo "filling a 1 GiB image with random data (reads then hit the page cache for every server)"
dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none

start_server() { # name port aio cache
    case "$1" in
        qemu-nbd) qemu-nbd -t -f raw -b 127.0.0.1 -p "$2" --aio="$3" --cache="$4" "$IMG" \
                      2>"$DIR/server.log" & ;;
        nbdkit)   nbdkit -f -i 127.0.0.1 -p "$2" file "$IMG" 2>"$DIR/server.log" & ;;
        coroloop) "$OURS" --port "$2" --aio "$3" --cache "$4" "$IMG" >/dev/null \
                      2>"$DIR/server.log" & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 100); do
        qemu-img info "nbd://127.0.0.1:$2" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "$1 did not start:"; cat "$DIR/server.log"; exit 1
}

stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# name count depth size extra-args
TESTS=(
    "read4k_qd16 100000 16 4k"
    "write4k_qd16 100000 16 4k -w"
    "read4k_qd1 20000 1 4k"
    "read64k_seq 16384 16 64k"
)

bench() { # url count depth size extra...
    local url=$1 count=$2 depth=$3 size=$4; shift 4
    local out secs
    out="$(qemu-img bench -f raw -c "$count" -d "$depth" -s "$size" "$@" "$url" 2>&1)"
    secs="$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")"
    [ -n "$secs" ] || { echo "qemu-img bench failed: $out" >&2; exit 1; }
    echo "$secs"
}

SERVERS=(qemu-nbd nbdkit coroloop)
echo "round server test value mode" >"$RESULTS"
for mode in $MODES; do
aio="${mode%%:*}"; cache="${mode##*:}"
echo "== mode aio=$aio cache=$cache"
for round in $(seq "$ROUNDS"); do
    # Rotate the order each round so no server always runs first.
    order=()
    for i in 0 1 2; do order+=("${SERVERS[$(((i + round) % 3))]}"); done
    for srv in "${order[@]}"; do
        port=$((PORT_BASE + round * 3 + RANDOM % 3))
        start_server "$srv" "$port" "$aio" "$cache"
        for t in "${TESTS[@]}"; do
            read -r name count depth size extra <<<"$t"
            # shellcheck disable=SC2086
            secs="$(bench "nbd://127.0.0.1:$port" "$count" "$depth" "$size" $extra)"
            if [ "$name" = read64k_seq ]; then
                value="$(awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.1f", c * 65536 / s / 1e6 }')"
            else
                value="$(awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }')"
            fi
            echo "$round $srv $name $value $mode" >>"$RESULTS"
            printf '%-18s round %s  %-9s %-13s %10s %s\n' "$mode" "$round" "$srv" "$name" "$value" \
                "$([ "$name" = read64k_seq ] && echo MB/s || echo IOPS)"
        done
        stop_server
    done
done
done

echo
echo "medians over $ROUNDS rounds (IOPS; MB/s for read64k_seq), and median per-round ratios:"
awk '
    NR > 1 { v[$5, $3, $2, $1] = $4; modes[$5] = 1; rounds[$1] = 1 }
    function median(a, n,   i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        printf "%-18s %-13s %10s %10s %10s %14s %14s\n", "mode", "test", "qemu-nbd", "nbdkit", "coroloop", "coro/qemu-nbd", "coro/nbdkit"
        split("read4k_qd16 write4k_qd16 read4k_qd1 read64k_seq", order, " ")
        for (m in modes) for (k = 1; k <= 4; k++) {
            t = order[k]; n = 0
            for (r in rounds) {
                n++
                q[n] = v[m, t, "qemu-nbd", r]; b[n] = v[m, t, "nbdkit", r]; c[n] = v[m, t, "coroloop", r]
                rq[n] = c[n] / q[n]; rb[n] = c[n] / b[n]
            }
            printf "%-18s %-13s %10.1f %10.1f %10.1f %13.2fx %13.2fx\n", m, t, median(q, n), median(b, n), median(c, n), median(rq, n), median(rb, n)
        }
    }' "$RESULTS"
