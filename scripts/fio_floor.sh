#!/usr/bin/env bash
# The fio floor for `cargo bench --bench file_io`: 4 KiB random reads of
# the same 1 GiB file (target/file_io_bench.img, under CARGO_TARGET_DIR
# when set), with fio's io_uring, libaio and psync engines at queue depth 1
# and 16 (psync has no queue: depth 16 is numjobs=16), O_DIRECT (direct=1)
# and page-cache warm (direct=0, the file read through once before each
# run, fio's invalidate=0), RUNTIME seconds per run, RUNS runs each.
#
#   scripts/fio_floor.sh [RUNS] [RUNTIME]      (default 3 runs of 5 s)
#
# Prints each run's IOPS and a table of the median IOPS per (engine, mode,
# depth). Installs fio with apt-get when missing; creates the file with dd
# when it is missing or not 1 GiB (the bench would create it too).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${1:-3}"
RUNTIME="${2:-5}"
SIZE=$((1 << 30))

if ! command -v fio >/dev/null; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fio >/dev/null
fi

IMG="${CARGO_TARGET_DIR:-target}/file_io_bench.img"
if [ "$(stat -c %s "$IMG" 2>/dev/null || echo 0)" != "$SIZE" ]; then
    echo "creating $IMG (1 GiB)" >&2
    mkdir -p "$(dirname "$IMG")"
    dd if=/dev/urandom of="$IMG" bs=1M count=1024 conv=fsync status=none
fi

warm() { cat "$IMG" >/dev/null; }

# fio_iops ENGINE DIRECT DEPTH: one run, prints the read IOPS.
fio_iops() {
    local engine=$1 direct=$2 depth=$3 iodepth=$3 numjobs=1
    if [ "$engine" = psync ]; then
        iodepth=1
        numjobs=$depth
    fi
    # Terse v3: field 8 is the read IOPS (all jobs, with group_reporting).
    fio --name=randread --filename="$IMG" --size="$SIZE" \
        --rw=randread --bs=4k --ioengine="$engine" \
        --iodepth="$iodepth" --numjobs="$numjobs" --direct="$direct" \
        --invalidate=0 --randrepeat=0 --norandommap \
        --time_based --runtime="$RUNTIME" --group_reporting \
        --output-format=terse --terse-version=3 |
        awk -F';' 'NR == 1 { printf "%d\n", $8 }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT

echo "fio $(fio --version | sed 's/^fio-//'), kernel $(uname -r), $(nproc) CPUs, $IMG"
echo "4 KiB randread, ${RUNTIME} s per run, $RUNS runs"
for mode in direct warm; do
    direct=1
    [ "$mode" = warm ] && direct=0
    for engine in io_uring libaio psync; do
        for depth in 1 16; do
            runs=()
            for _ in $(seq "$RUNS"); do
                [ "$mode" = warm ] && warm
                runs+=("$(fio_iops "$engine" "$direct" "$depth")")
            done
            med="$(printf '%s\n' "${runs[@]}" | median)"
            printf '%-9s %-7s qd%-3s runs: %s\n' "$engine" "$mode" "$depth" "${runs[*]}"
            printf '%s %s %s %s\n' "$engine" "$mode" "$depth" "$med" >>"$RESULTS"
        done
    done
done

echo
echo "median IOPS (4 KiB randread; psync depth 16 = 16 jobs)"
printf '%-9s %-7s %6s %12s\n' engine mode depth IOPS
while read -r engine mode depth med; do
    printf '%-9s %-7s %6s %12s\n' "$engine" "$mode" "$depth" "$med"
done <"$RESULTS"
