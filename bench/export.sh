#!/bin/bash
# Device-layer benchmark: the same fio jobs as ../shared/bench/peers.sh,
# in one run, against ploop's FUSE + loop export (ploop1 and raw images;
# FUSE over io_uring and /dev/fuse) and the peers: loop with direct I/O on a
# raw file, and qemu-storage-daemon's qcow2 FUSE export under a loop device,
# beside the disk's own limit (fio on a raw file with O_DIRECT).
# Every target runs ROUNDS times in a rotated order; medians are printed.
# Usage (root): bench/export.sh [SECONDS] [ROUNDS]   Needs: fio qemu-utils, a release build.
set -u
T=${1:-8}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-export}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }
. "$(dirname "$0")/lib.sh"
rm -rf "$D"; mkdir -p "$D/exp" "$D/img"
SIZE=2G
ploop_target() { # $1 label, $2 format, $3 FUSE queues (ring: FUSE over io_uring, dev: /dev/fuse), $4 more mount options
  rm -rf "$D/img"; mkdir -p "$D/img"
  "$P" init -s $SIZE -f "$2" -t none "$D/img/root.hdd" >/dev/null
  # shellcheck disable=SC2086 # $4 holds options
  local dev; dev=$("$P" mount --fuse-queues "$3" ${4:-} "$D/img/DiskDescriptor.xml") || exit 1
  jobs "$1" --filename="$dev" --ioengine=io_uring --direct=1
  "$P" umount "$D/img/DiskDescriptor.xml"
}
limit_target() {
  rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
  jobs "raw file O_DIRECT (limit)" --filename="$D/raw.img" --ioengine=io_uring --direct=1
  rm -f "$D/raw.img"
}
loop_target() {
  rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
  local l; l=$(losetup -f --show --direct-io=on "$D/raw.img")
  jobs "loop(dio) on raw" --filename="$l" --ioengine=io_uring --direct=1
  losetup -d "$l"
}
qsd_target() {
  rm -f "$D/q.qcow2"; qemu-img create -q -f qcow2 "$D/q.qcow2" $SIZE
  : > "$D/exp/f"
  qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$D/q.qcow2",cache.direct=on,aio=io_uring \
    --blockdev driver=qcow2,node-name=q,file=f --export type=fuse,id=e,node-name=q,mountpoint="$D/exp/f",writable=on &
  local sp=$!
  sleep 1.5
  local l; l=$(losetup -f --show --direct-io=on "$D/exp/f" 2>/dev/null || losetup -f --show "$D/exp/f")
  jobs "qsd qcow2 fuse+loop" --filename="$l" --ioengine=io_uring --direct=1
  losetup -d "$l"; kill $sp; wait $sp 2>/dev/null
}

TARGETS=()
# FUSE over io_uring needs the fuse module's enable_uring (Linux 6.14+).
if [ -w /sys/module/fuse/parameters/enable_uring ]; then
  echo Y > /sys/module/fuse/parameters/enable_uring
  TARGETS+=("ploop_target 'ploop ploop1 fuse-ring' ploop1 ring" "ploop_target 'ploop raw fuse-ring' raw ring"
            "ploop_target 'ploop ploop1 fuse-ring --busy-poll 0' ploop1 ring '--busy-poll 0'")
fi
TARGETS+=("ploop_target 'ploop ploop1 /dev/fuse' ploop1 dev" "ploop_target 'ploop raw /dev/fuse' raw dev"
          limit_target loop_target qsd_target)
run_rounds "$ROUNDS" "${TARGETS[@]}"
print_medians "$ROUNDS"
echo
echo "ratios of medians (ploop1 export): vs qsd (goal >= 1.5), vs loop on raw (goal >= 0.7)"
for t in "fuse-ring" "fuse-ring --busy-poll 0" "/dev/fuse"; do
  for rw in randread randwrite read write; do
    p=${M["ploop ploop1 $t|$rw"]:-0}; q=${M["qsd qcow2 fuse+loop|$rw"]:-0}; l=${M["loop(dio) on raw|$rw"]:-0}
    awk -v t="$t" -v rw=$rw -v p="$p" -v q="$q" -v l="$l" \
      'BEGIN{printf "%-24s %-10s %6.2fx qsd   %6.2fx loop-on-raw\n", t, rw, (q>0?p/q:0), (l>0?p/l:0)}'
  done
done
echo
echo "share of the disk's own limit (fio on a raw file with O_DIRECT): what 1.5x qsd would need, and what loop-on-raw reaches"
for rw in randread randwrite read write; do
  q=${M["qsd qcow2 fuse+loop|$rw"]:-0}; l=${M["loop(dio) on raw|$rw"]:-0}; lim=${M["raw file O_DIRECT (limit)|$rw"]:-0}
  awk -v rw=$rw -v q="$q" -v l="$l" -v lim="$lim" \
    'BEGIN{printf "%-10s 1.5x qsd = %4.0f%% of the limit   loop-on-raw %4.0f%%\n", rw, (lim>0?150*q/lim:0), (lim>0?100*l/lim:0)}'
done
rm -rf "$D"
