#!/bin/bash
# Offline compaction throughput beside cp of the same bytes on the same
# disk: a 2 GiB ext4 disk gets 16 files of 64 MiB, the first 8 are
# deleted (their space low in the image, the data above it), and
# `ploop compact` moves the rest down; its rate (MiB moved per second of
# the move phase, as it reports it; the whole command, with its mounts
# and fstrim, beside) is printed beside `cp` of as many bytes, file to
# file, in the same folder, synced. Goal (issue 18): compaction >= 0.5x cp.
# Usage (root): bench/compact.sh [PLOOP] [ROUNDS]
set -u
P=${1:-target/release/ploop}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-compact}
now() { date +%s.%N; }
one() { # prints "COMPACT_MiB_per_s CP_MiB_per_s"
  local t0 t1 moved mib
  rm -rf "$D"; mkdir -p "$D/m"
  "$P" init -s 2G "$D/root.hdd" >/dev/null || exit 1
  "$P" mount -m "$D/m" "$D/DiskDescriptor.xml" >/dev/null || exit 1
  for i in $(seq 0 15); do
    dd if=/dev/urandom of="$D/m/f$i" bs=1M count=64 status=none; sync
  done
  rm -f "$D"/m/f[0-7]; sync
  "$P" umount "$D/DiskDescriptor.xml" || exit 1
  t0=$(now)
  out=$("$P" compact --threshold 0 "$D/DiskDescriptor.xml") || exit 1
  t1=$(now)
  moved=$(echo "$out" | sed -n 's/^moved \([0-9]*\) clusters.*/\1/p')
  mib=$moved  # 1 MiB clusters
  rate=$(echo "$out" | sed -n 's/^moved .* s, \([0-9]*\) MiB\/s).*/\1/p')
  # cp of as many bytes, on the same filesystem, synced.
  head -c "${mib}M" /dev/urandom > "$D/src"; sync
  echo 3 > /proc/sys/vm/drop_caches
  local c0 c1
  c0=$(now); cp "$D/src" "$D/dst"; sync; c1=$(now)
  echo "$rate $(echo "$mib / ($c1 - $c0)" | bc -l) $mib $(echo "$mib / ($t1 - $t0)" | bc -l)"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rows=""
for r in $(seq "$ROUNDS"); do
  x=$(one)
  set -- $x
  printf "round %d: compaction moves %.0f MiB/s (moved %s MiB; whole command with fstrim and mounts %.0f MiB/s), cp %.0f MiB/s, ratio %.2f\n" "$r" "$1" "$3" "$4" "$2" "$(echo "$1 / $2" | bc -l)"
  rows="$rows
$(echo "$1 / $2" | bc -l)"
done
printf "median compact/cp ratio: %.2f (goal >= 0.5)\n" "$(echo "$rows" | awk NF | median)"
rm -rf "$D"
