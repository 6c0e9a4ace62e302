#!/bin/bash
# NBD benchmark: the same fio jobs as ../shared/bench/peers.sh, with fio's
# nbd engine (libnbd, one connection per job), in one run against
#   ploop serve (ploop1 image and raw image; ploop1 with --busy-poll 0
#   and with --io sync too),
#   qemu-nbd (qcow2 and raw, cache=none, aio=io_uring),
#   nbdkit's file plugin (raw),
# beside the disk's own limit (fio on a raw file with O_DIRECT) and what
# the client allows without a disk (nbdkit's memory plugin, and ploop
# serve with its image on tmpfs).
# Every target runs ROUNDS times in a rotated order; medians are printed.
# Usage (root): bench/nbd.sh [SECONDS] [ROUNDS]   Needs: fio qemu-utils nbdkit, a release build.
set -u
T=${1:-8}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-nbd}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }
. "$(dirname "$0")/lib.sh"
rm -rf "$D"; mkdir -p "$D/img"
SIZE=2G
SOCK=$D/nbd.sock
NBD=(--ioengine=nbd --uri="nbd+unix:///?socket=$SOCK")
wait_socket() { for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done; echo "no socket" >&2; return 1; }
stop() { kill "$1"; wait "$1" 2>/dev/null; rm -f "$SOCK"; }

limit_target() {
  rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
  jobs "raw file O_DIRECT (limit)" --filename="$D/raw.img" --ioengine=io_uring --direct=1
}
ploop_target() { # $1 label, $2 format, $3 more serve options, $4 image folder
  local dir=${4:-$D/img}
  rm -rf "$dir"; mkdir -p "$dir"
  "$P" init -s $SIZE -f "$2" -t none "$dir/root.hdd" >/dev/null
  # shellcheck disable=SC2086 # $3 holds options
  "$P" serve --socket "$SOCK" ${3:-} "$dir/DiskDescriptor.xml" >/dev/null 2>&1 &
  local sp=$!
  wait_socket && jobs "$1" "${NBD[@]}"
  stop $sp
  if [ -n "${4:-}" ]; then rm -rf "$dir"; fi
}
# Without a disk (memory): what the client and the transport allow.
nbdkit_memory_target() {
  nbdkit -f -U "$SOCK" memory $SIZE &
  local kp=$!
  wait_socket && jobs "nbdkit memory (no disk)" "${NBD[@]}"
  stop $kp
}
qemu_target() { # $1 format
  local img=$D/q.$1
  rm -f "$img"; qemu-img create -q -f "$1" "$img" $SIZE
  qemu-nbd -t -k "$SOCK" -f "$1" --cache=none --aio=io_uring "$img" &
  local qp=$!
  wait_socket && jobs "qemu-nbd $1" "${NBD[@]}"
  stop $qp
}
nbdkit_target() {
  rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
  nbdkit -f -U "$SOCK" file "$D/raw.img" cache=none &
  local kp=$!
  wait_socket && jobs "nbdkit file raw" "${NBD[@]}"
  stop $kp
}
TARGETS=(limit_target "ploop_target 'ploop serve ploop1' ploop1" "ploop_target 'ploop serve raw' raw"
         "ploop_target 'ploop serve ploop1 --busy-poll 0' ploop1 '--busy-poll 0'"
         "ploop_target 'ploop serve ploop1 --io sync' ploop1 '--io sync'"
         "qemu_target qcow2" "qemu_target raw")
[ -d /dev/shm ] && TARGETS+=("ploop_target 'ploop serve ploop1 tmpfs (no disk)' ploop1 '' /dev/shm/pbench-nbd")
command -v nbdkit >/dev/null && TARGETS+=(nbdkit_target nbdkit_memory_target)
run_rounds "$ROUNDS" "${TARGETS[@]}"
print_medians "$ROUNDS"
echo
echo "ratios of medians: ploop1 vs qemu-nbd qcow2 (goal >= 1.3), raw vs qemu-nbd raw; share of the disk's limit"
for rw in randread randwrite read write; do
  p=${M["ploop serve ploop1|$rw"]:-0}; q=${M["qemu-nbd qcow2|$rw"]:-0}
  pr=${M["ploop serve raw|$rw"]:-0}; qr=${M["qemu-nbd raw|$rw"]:-0}
  l=${M["raw file O_DIRECT (limit)|$rw"]:-0}; ps=${M["ploop serve ploop1 --io sync|$rw"]:-0}
  pb=${M["ploop serve ploop1 --busy-poll 0|$rw"]:-0}
  awk -v rw=$rw -v p="$p" -v q="$q" -v pr="$pr" -v qr="$qr" -v l="$l" -v ps="$ps" -v pb="$pb" \
    'BEGIN{printf "%-10s %6.2fx qemu-nbd qcow2 (--busy-poll 0 %5.2fx, --io sync %5.2fx)   %6.2fx qemu-nbd raw   limit: ploop1 %3.0f%%, qemu-nbd qcow2 %3.0f%%\n", rw, (q>0?p/q:0), (q>0?pb/q:0), (q>0?ps/q:0), (qr>0?pr/qr:0), (l>0?100*p/l:0), (l>0?100*q/l:0)}'
done
rm -rf "$D"
