#!/bin/bash
# NBD benchmark: the same fio jobs as ../shared/bench/peers.sh, with fio's
# nbd engine (libnbd, one connection per job), in one run against
#   ploop serve (ploop1 image and raw image),
#   qemu-nbd (qcow2 and raw, cache=none, aio=io_uring),
#   nbdkit's file plugin (raw).
# Usage (root): bench/nbd.sh [SECONDS]   Needs: fio qemu-utils nbdkit, a release build.
set -u
T=${1:-8}
D=${BENCH_DIR:-/var/tmp/pbench-nbd}
P=${PLOOP:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ploop}
[ -x "$P" ] || { echo "build first: cargo build --release" >&2; exit 1; }
rm -rf "$D"; mkdir -p "$D/img"
SIZE=2G
SOCK=$D/nbd.sock
declare -A R
jobs() { # $1 label, then fio target args (default: the NBD server on $SOCK)
  local label=$1; shift
  local target=("$@")
  [ ${#target[@]} -gt 0 ] || target=(--ioengine=nbd --uri="nbd+unix:///?socket=$SOCK")
  fio --name=fill --rw=write --bs=1m --iodepth=8 --size=1G "${target[@]}" \
      --output-format=terse >/dev/null 2>&1
  for j in "randread:4k:32" "randwrite:4k:32" "read:1m:8" "write:1m:8"; do
    IFS=: read rw bs qd <<<"$j"
    out=$(fio --name=x --rw=$rw --bs=$bs --iodepth=$qd --runtime=$T --time_based --size=1G \
          "${target[@]}" \
          --group_reporting --output-format=terse --terse-version=3 2>/dev/null)
    line=$(echo "$out" | awk -F';' -v l="$label" -v j="$rw/$bs/qd$qd" '{r=$8+$49; if (r==0) next; b=($7+$48)/1024; printf "%-28s %-18s %10.0f IOPS %9.1f MiB/s\n", l, j, r, b}')
    echo "$line"
    R["$label|$rw"]=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "IOPS") print $(i-1)}')
  done
}
wait_socket() { for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done; echo "no socket" >&2; return 1; }
stop() { kill "$1"; wait "$1" 2>/dev/null; rm -f "$SOCK"; }

ploop_target() { # $1 label, $2 format
  rm -rf "$D/img"; mkdir -p "$D/img"
  "$P" init -s $SIZE -f "$2" -t none "$D/img/root.hdd" >/dev/null
  "$P" serve --socket "$SOCK" "$D/img/DiskDescriptor.xml" >/dev/null 2>&1 & local sp=$!
  wait_socket && jobs "$1"
  stop $sp
}
# The disk's own limit, for scale: every target below goes through it.
rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
jobs "raw file O_DIRECT (limit)" --filename="$D/raw.img" --ioengine=io_uring --direct=1
ploop_target "ploop serve ploop1" ploop1
ploop_target "ploop serve raw" raw

rm -f "$D/q.qcow2"; qemu-img create -q -f qcow2 "$D/q.qcow2" $SIZE
qemu-nbd -t -k "$SOCK" -f qcow2 --cache=none --aio=io_uring "$D/q.qcow2" & QP=$!
wait_socket && jobs "qemu-nbd qcow2"
stop $QP
rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
qemu-nbd -t -k "$SOCK" -f raw --cache=none --aio=io_uring "$D/raw.img" & QP=$!
wait_socket && jobs "qemu-nbd raw"
stop $QP
if command -v nbdkit >/dev/null; then
  rm -f "$D/raw.img"; fallocate -l $SIZE "$D/raw.img"
  nbdkit -f -U "$SOCK" file "$D/raw.img" cache=none & KP=$!
  wait_socket && jobs "nbdkit file raw"
  stop $KP
fi
echo
echo "ratios: ploop1 vs qemu-nbd qcow2 (goal >= 1.3), raw vs qemu-nbd raw; share of the disk's limit"
for rw in randread randwrite read write; do
  p=${R["ploop serve ploop1|$rw"]:-0}; q=${R["qemu-nbd qcow2|$rw"]:-0}
  pr=${R["ploop serve raw|$rw"]:-0}; qr=${R["qemu-nbd raw|$rw"]:-0}
  l=${R["raw file O_DIRECT (limit)|$rw"]:-0}
  awk -v rw=$rw -v p=$p -v q=$q -v pr=$pr -v qr=$qr -v l=$l \
    'BEGIN{printf "%-10s %6.2fx qemu-nbd qcow2   %6.2fx qemu-nbd raw   limit: ploop1 %3.0f%%, qemu-nbd qcow2 %3.0f%%\n", rw, (q>0?p/q:0), (qr>0?pr/qr:0), (l>0?100*p/l:0), (l>0?100*q/l:0)}'
done
rm -rf "$D"
