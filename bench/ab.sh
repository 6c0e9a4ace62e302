#!/bin/bash
# Paired A/B of two ploop builds on the FUSE + loop export (ploop1, FUSE
# over io_uring): 4 KiB random writes and reads at queue depth 32, each
# round running both builds back to back, in alternating order, so that
# the machine's drift hits both alike. Prints each round and the median of
# the per-round ratios B/A. Use it to show a change moves no figure.
# Usage (root): bench/ab.sh OLD_PLOOP NEW_PLOOP [ROUNDS] [SECONDS]   Needs: fio.
set -u
A=${1:?usage: bench/ab.sh OLD_PLOOP NEW_PLOOP [ROUNDS] [SECONDS]}
B=${2:?usage: bench/ab.sh OLD_PLOOP NEW_PLOOP [ROUNDS] [SECONDS]}
ROUNDS=${3:-6}
T=${4:-5}
D=${BENCH_DIR:-/var/tmp/pbench-ab}
one() { # $1 the ploop binary; prints "RANDWRITE RANDREAD" in IOPS
  local P=$1 dev out="" rw v
  rm -rf "$D"; mkdir -p "$D"
  "$P" init -s 2G -f ploop1 -t none "$D/root.hdd" >/dev/null || exit 1
  dev=$("$P" mount --fuse-queues ring "$D/DiskDescriptor.xml") || exit 1
  fio --name=fill --rw=write --bs=1m --iodepth=8 --size=1G --filename="$dev" \
    --ioengine=io_uring --direct=1 >/dev/null 2>&1
  for rw in randwrite randread; do
    v=$(fio --name=x --rw=$rw --bs=4k --iodepth=32 --runtime="$T" --time_based --size=1G \
      --filename="$dev" --ioengine=io_uring --direct=1 --output-format=json |
      python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["write"]["iops"]+j["read"]["iops"]))')
    out="$out $v"
  done
  "$P" umount "$D/DiskDescriptor.xml" || exit 1
  echo "$out"
}
rows=""
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then a=$(one "$A"); b=$(one "$B"); else b=$(one "$B"); a=$(one "$A"); fi
  echo "round $r  A (randwrite randread):$a   B:$b"
  rows="$rows$a$b"$'\n'
done
rm -rf "$D"
printf '%s' "$rows" | python3 -c '
import statistics, sys
r = [list(map(int, l.split())) for l in sys.stdin if l.strip()]
for i, name in enumerate(["randwrite", "randread"]):
    ratios = sorted(b[i + 2] / b[i] for b in r)
    print(f"{name:10} B/A median {statistics.median(ratios):.2f}  (rounds {ratios[0]:.2f} to {ratios[-1]:.2f})")
'
