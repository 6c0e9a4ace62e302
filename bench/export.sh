#!/bin/bash
# Device-layer benchmark: the same fio jobs as ../shared/bench/peers.sh,
# in one run, against ploop's FUSE + loop export (ploop1 and raw images)
# and the peers: loop with direct I/O on a raw file, and
# qemu-storage-daemon's qcow2 FUSE export under a loop device.
# Usage (root): bench/export.sh [SECONDS]   Needs: fio qemu-utils, a release build.
set -u
T=${1:-8}
D=${BENCH_DIR:-/var/tmp/pbench-export}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }
rm -rf "$D"; mkdir -p "$D/exp" "$D/img"
SIZE=2G
declare -A R
jobs() { # $1 label, rest: fio target args
  local label=$1; shift
  fio --name=fill --rw=write --bs=1m --iodepth=8 --size=1G --output-format=terse "$@" >/dev/null 2>&1
  for j in "randread:4k:32" "randwrite:4k:32" "read:1m:8" "write:1m:8"; do
    IFS=: read rw bs qd <<<"$j"
    out=$(fio --name=x --rw=$rw --bs=$bs --iodepth=$qd --runtime=$T --time_based --size=1G \
          --group_reporting --output-format=terse --terse-version=3 "$@" 2>/dev/null)
    line=$(echo "$out" | awk -F';' -v l="$label" -v j="$rw/$bs/qd$qd" '{r=$8+$49; b=($7+$48)/1024; printf "%-28s %-18s %10.0f IOPS %9.1f MiB/s\n", l, j, r, b}')
    echo "$line"
    R["$label|$rw"]=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "IOPS") print $(i-1)}')
  done
}
ploop_target() { # $1 label, $2 format, $3 FUSE queues (ring: FUSE over io_uring, dev: /dev/fuse)
  rm -rf "$D/img"; mkdir -p "$D/img"
  "$P" init -s $SIZE -f "$2" -t none "$D/img/root.hdd" >/dev/null
  local dev; dev=$("$P" mount --fuse-queues "$3" "$D/img/DiskDescriptor.xml") || exit 1
  jobs "$1" --filename="$dev" --ioengine=io_uring --direct=1
  "$P" umount "$D/img/DiskDescriptor.xml"
}
# FUSE over io_uring needs the fuse module's enable_uring (Linux 6.14+).
if [ -w /sys/module/fuse/parameters/enable_uring ]; then
  echo Y > /sys/module/fuse/parameters/enable_uring
  ploop_target "ploop ploop1 fuse-ring" ploop1 ring
  ploop_target "ploop raw fuse-ring" raw ring
fi
ploop_target "ploop ploop1 /dev/fuse" ploop1 dev
rm -f $D/raw.img; fallocate -l $SIZE $D/raw.img
L=$(losetup -f --show --direct-io=on $D/raw.img)
jobs "loop(dio) on raw" --filename=$L --ioengine=io_uring --direct=1
losetup -d $L
rm -f $D/q.qcow2; qemu-img create -q -f qcow2 $D/q.qcow2 $SIZE
: > $D/exp/f
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$D/q.qcow2,cache.direct=on,aio=io_uring \
  --blockdev driver=qcow2,node-name=q,file=f --export type=fuse,id=e,node-name=q,mountpoint=$D/exp/f,writable=on & SP=$!
sleep 1.5
L=$(losetup -f --show --direct-io=on $D/exp/f 2>/dev/null || losetup -f --show $D/exp/f)
jobs "qsd qcow2 fuse+loop" --filename=$L --ioengine=io_uring --direct=1
losetup -d $L; kill $SP; wait $SP 2>/dev/null
echo
echo "ratios (ploop1 export): vs qsd (goal >= 1.5), vs loop on raw (goal >= 0.7)"
for t in "fuse-ring" "/dev/fuse"; do
  for rw in randread randwrite read write; do
    p=${R["ploop ploop1 $t|$rw"]:-0}; q=${R["qsd qcow2 fuse+loop|$rw"]}; l=${R["loop(dio) on raw|$rw"]}
    awk -v t=$t -v rw=$rw -v p=$p -v q=$q -v l=$l 'BEGIN{printf "%-10s %-10s %6.2fx qsd   %6.2fx loop-on-raw\n", t, rw, (q>0?p/q:0), (l>0?p/l:0)}'
  done
done
rm -rf "$D"
