#!/bin/bash
# The container's own 4 KiB random writes while `ploop compact` runs on
# its mounted disk, beside the same writes without compaction, in one
# run. A 2 GiB ext4 disk gets a 256 MiB file for fio and 16 files of
# 64 MiB; the first 8 are deleted. fio (O_DIRECT, libaio, queue depth 4,
# writes inside the container's filesystem) runs alone for 6 s, then
# again while the disk is compacted online; its IOPS log gives the rate
# during exactly the compaction's window. Also printed: the compaction's
# own rate (MiB moved per second) and the image size before and after.
# Goal (issue 18): writes during compaction >= 0.7x of the rate without.
# Usage (root): bench/compact-online.sh [PLOOP] [ROUNDS]
set -u
P=${1:-target/release/ploop}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-compact-online}
now() { date +%s.%N; }
fio_job() { # fio_job SECONDS LOGPREFIX
  fio --name=w --filename="$D/m/fio" --size=256M --rw=randwrite --bs=4k \
    --ioengine=libaio --direct=1 --iodepth=4 --time_based --runtime="$1" \
    --write_iops_log="$2" --log_avg_msec=100 --output-format=terse \
    >/dev/null 2>&1
}
# Mean IOPS in the log between FROM and TO ms (whole log if TO is 0).
window() {
  awk -F, -v a="$2" -v b="$3" '($1+0 >= a) && (b == 0 || $1+0 <= b) {s += $2; n++}
    END {if (n) printf "%.0f", s / n; else print 0}' "$1"_iops.1.log
}
one() { # prints "IOPS_ALONE IOPS_DURING MOVED_MIB MIB_PER_S BEFORE AFTER"
  rm -rf "$D"; mkdir -p "$D/m"
  "$P" init -s 2G "$D/root.hdd" >/dev/null || exit 1
  "$P" mount -m "$D/m" "$D/DiskDescriptor.xml" >/dev/null || exit 1
  dd if=/dev/urandom of="$D/m/fio" bs=1M count=256 status=none
  for i in $(seq 0 15); do
    dd if=/dev/urandom of="$D/m/f$i" bs=1M count=64 status=none; sync
  done
  rm -f "$D"/m/f[0-7]; sync
  fio_job 6 "$D/alone"
  local alone during t0 t1 c0 c1 out moved before after
  alone=$(window "$D/alone" 1000 0)
  before=$(stat -c %s "$D/root.hdd")
  t0=$(now)
  fio_job 30 "$D/during" & local fpid=$!
  sleep 2
  c0=$(now)
  out=$("$P" compact --threshold 0 "$D/DiskDescriptor.xml") || { kill $fpid; exit 1; }
  c1=$(now)
  wait $fpid
  after=$(stat -c %s "$D/root.hdd")
  during=$(window "$D/during" "$(echo "($c0 - $t0) * 1000" | bc)" "$(echo "($c1 - $t0) * 1000" | bc)")
  moved=$(echo "$out" | sed -n 's/^moved \([0-9]*\) clusters.*/\1/p')
  "$P" umount "$D/DiskDescriptor.xml" >/dev/null || exit 1
  echo "$alone $during $moved $(echo "$moved / ($c1 - $c0)" | bc -l) $before $after"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rows=""
for r in $(seq "$ROUNDS"); do
  x=$(one)
  set -- $x
  printf "round %d: 4 KiB random writes alone %s IOPS, during online compaction %s IOPS (%.2fx); compaction moved %s MiB at %.0f MiB/s (whole command); image %d -> %d MiB\n" \
    "$r" "$1" "$2" "$(echo "$2 / $1" | bc -l)" "$3" "$4" "$(($5 >> 20))" "$(($6 >> 20))"
  rows="$rows
$(echo "$2 / $1" | bc -l)"
done
printf "median during/alone ratio: %.2f (goal >= 0.7)\n" "$(echo "$rows" | awk NF | median)"
rm -rf "$D"
