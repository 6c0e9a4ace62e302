#!/bin/bash
# Journal isolation between two tenants, each on its own disk: a quiet
# tenant appends 4 KiB and calls fdatasync every 10 ms, beside a noisy one
# (four buffered 1 MiB writers that truncate and sync their files), for
# SECONDS. Prints the quiet tenant's fdatasync latency p50/p99 for: both
# on plain loop devices over raw files (the peer), both on ploop disks with
# the defaults, and with each option given as extra arguments to mount.
# Usage (root): bench/isolation.sh [PLOOP] [SECONDS] ["MOUNT OPTIONS"...]
set -u
P=${1:-target/release/ploop}
SECS=${2:-12}
shift 2 2>/dev/null
OPTS=("$@")
D=${BENCH_DIR:-/var/tmp/pbench-iso}
quiet() { # quiet DIR: prints "p50_ms p99_ms count"
  python3 - "$1" "$SECS" <<'PY'
import os, sys, time
d, secs = sys.argv[1], float(sys.argv[2])
fd = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block = os.urandom(4096)
lat = []
end = time.monotonic() + secs
while time.monotonic() < end:
    os.write(fd, block)
    t = time.monotonic()
    os.fdatasync(fd)
    lat.append((time.monotonic() - t) * 1000)
    time.sleep(0.01)
lat.sort()
print("%.2f %.2f %d" % (lat[len(lat) // 2], lat[int(len(lat) * 0.99)], len(lat)))
PY
}
. "$(dirname "$0")/tenants.sh"
run_pair() { # run_pair QUIET_DIR NOISY_DIR LABEL
  noisy "$2" "$SECS" & local np=$!
  sleep 0.5
  local r; r=$(quiet "$1")
  wait $np
  set -- $r "$3"
  printf "%-40s p50 %6.2f ms  p99 %7.2f ms  (%s syncs)\n" "$4" "$1" "$2" "$3"
}
rm -rf "$D"; mkdir -p "$D"
# Peer: plain loop devices on raw files.
for t in q n; do
  truncate -s 2G "$D/$t.raw"; mkfs.ext4 -q -F "$D/$t.raw"
  mkdir -p "$D/$t"; dev=$(losetup -f --show "$D/$t.raw"); mount "$dev" "$D/$t"
  echo "$dev" > "$D/$t.dev"
done
read -r i50 i99 icount < <(quiet "$D/q")
printf "%-40s p50 %6.2f ms  p99 %7.2f ms  (%s syncs)\n" "idle, plain loop" "$i50" "$i99" "$icount"
run_pair "$D/q" "$D/n" "plain loop devices"
for t in q n; do umount "$D/$t"; losetup -d "$(cat "$D/$t.dev")"; rm -f "$D/$t.raw"; done
# ploop: defaults, then each option set given.
for opts in "" "${OPTS[@]}"; do
  for t in q n; do
    rm -rf "$D/$t.d"; mkdir -p "$D/$t.d"
    "$P" init -s 2G "$D/$t.d/root.hdd" >/dev/null || exit 1
    # shellcheck disable=SC2086
    "$P" mount $opts -m "$D/$t" "$D/$t.d/DiskDescriptor.xml" >/dev/null || exit 1
  done
  run_pair "$D/q" "$D/n" "ploop ${opts:-defaults}"
  for t in q n; do "$P" umount "$D/$t.d/DiskDescriptor.xml" >/dev/null; done
done
rm -rf "$D"
