#!/bin/bash
# Busy polling under contention: two `ploop serve` processes, each with its
# own fio client (nbd engine, 4 KiB at queue depth 32), all at once, so
# that servers and clients compete for the CPUs. Prints the two clients'
# summed IOPS with busy polling off and on (the default), in alternating
# rounds: spinning must not cost the others their CPU.
# Usage (root): bench/nbd-contend.sh [SECONDS] [ROUNDS]   Needs: fio, a release build.
set -u
T=${1:-5}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-contend}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }

one_round() { # $1 busy-poll microseconds
  rm -rf "$D"; mkdir -p "$D/a" "$D/b"
  local servers=() x rw
  for x in a b; do
    "$P" init -s 1G -f ploop1 -t none "$D/$x/root.hdd" >/dev/null
    "$P" serve --busy-poll "$1" --socket "$D/$x.sock" "$D/$x/DiskDescriptor.xml" >/dev/null 2>&1 &
    servers+=($!)
  done
  for x in a b; do
    for _ in $(seq 100); do [ -S "$D/$x.sock" ] && break; sleep 0.05; done
    fio --name=fill --rw=write --bs=1m --iodepth=8 --size=512M --ioengine=nbd \
      --uri="nbd+unix:///?socket=$D/$x.sock" --output-format=terse >/dev/null 2>&1
  done
  printf "busy-poll %-4s" "$1"
  for rw in randread randwrite; do
    local clients=()
    for x in a b; do
      fio --name=x --rw=$rw --bs=4k --iodepth=32 --runtime="$T" --time_based --size=512M \
        --ioengine=nbd --uri="nbd+unix:///?socket=$D/$x.sock" --output-format=terse \
        --terse-version=3 >"$D/$x.$rw" 2>/dev/null &
      clients+=($!)
    done
    wait "${clients[@]}"
    printf "   %s %7s IOPS" $rw "$(cat "$D/a.$rw" "$D/b.$rw" | awk -F';' 'NF > 50 {s += $8 + $49} END {printf "%.0f", s}')"
  done
  echo
  kill "${servers[@]}"; wait "${servers[@]}" 2>/dev/null
}

echo "two servers and two clients at once: summed IOPS"
for ((r = 0; r < ROUNDS; r++)); do
  one_round 0
  one_round 200
done
rm -rf "$D"
