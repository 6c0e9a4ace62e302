#!/bin/bash
# Busy polling in paired rounds: the same 4 KiB jobs (queue depth 32) with
# --busy-poll 0 and with the default, alternating round by round, through
# `ploop serve` (fio's nbd engine) and through the FUSE + loop export (FUSE
# over io_uring where the kernel offers it). On a noisy VM only such pairs
# tell a difference of a few tens of percent apart. Prints the medians
# (with ranges and CPU per I/O, from lib.sh) and the means.
# Usage (root): bench/busy-poll.sh [SECONDS] [ROUNDS]   Needs: fio, a release build.
set -u
T=${1:-5}
ROUNDS=${2:-4}
D=${BENCH_DIR:-/var/tmp/pbench-busy-poll}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -w /sys/module/fuse/parameters/enable_uring ] && echo Y > /sys/module/fuse/parameters/enable_uring
. "$(dirname "$0")/lib.sh"
WORKLOADS="randread:4k:32 randwrite:4k:32"

nbd() { # $1 busy-poll microseconds
  rm -rf "$D"; mkdir -p "$D"
  "$P" init -s 2G -f ploop1 -t none "$D/root.hdd" >/dev/null
  "$P" serve --busy-poll "$1" --socket "$D/nbd.sock" "$D/DiskDescriptor.xml" >/dev/null 2>&1 &
  local sp=$!
  for _ in $(seq 100); do [ -S "$D/nbd.sock" ] && break; sleep 0.05; done
  jobs "nbd --busy-poll $1" --ioengine=nbd --uri="nbd+unix:///?socket=$D/nbd.sock"
  kill $sp; wait $sp 2>/dev/null
}
fuse() { # $1 busy-poll microseconds
  rm -rf "$D"; mkdir -p "$D"
  "$P" init -s 2G -f ploop1 -t none "$D/root.hdd" >/dev/null
  local dev; dev=$("$P" mount --busy-poll "$1" "$D/DiskDescriptor.xml") || exit 1
  jobs "fuse --busy-poll $1" --filename="$dev" --ioengine=io_uring --direct=1
  "$P" umount "$D/DiskDescriptor.xml"
}
for ((r = 1; r <= ROUNDS; r++)); do
  for t in nbd fuse; do $t 0; $t 200; done
done
print_medians "$ROUNDS"
echo
echo "means of $ROUNDS rounds"
mean() { echo "${R["$1"]}" | awk '{for (i = 1; i <= NF; i++) s += $i} END {printf "%.0f", (NF ? s / NF : 0)}'; }
for t in nbd fuse; do
  for rw in randread randwrite; do
    awk -v t=$t -v rw=$rw -v off="$(mean "$t --busy-poll 0|$rw")" -v on="$(mean "$t --busy-poll 200|$rw")" \
      'BEGIN{printf "%-5s %-10s busy-poll 0 %7d   200 %7d   %+5.1f%%\n", t, rw, off, on, (off > 0 ? 100 * (on - off) / off : 0)}'
  done
done
rm -rf "$D"
