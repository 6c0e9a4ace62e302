#!/bin/bash
# Time of `ploop resize` growing a disk, for the same disk holding little
# data and holding 1 GiB: the goal is a time independent of the data
# (under 1 s without BAT relocation). Each round grows a fresh 4 GiB ext4
# disk to 8 GiB; prints every round and the medians, side by side, and
# the image-only part (BAT growth of a -t none disk, no table or filesystem)
# beside the whole command, and the same growth online: a mounted XFS disk
# (image, table, devices and xfs_growfs, the filesystem in use).
# Usage (root): bench/resize.sh [PLOOP] [ROUNDS]
set -u
P=${1:-target/release/ploop}
ROUNDS=${2:-3}
D=${BENCH_DIR:-/var/tmp/pbench-resize}
now() { date +%s.%N; }
one() { # $1 MiB of data; prints "WHOLE_SECONDS IMAGE_ONLY_SECONDS ONLINE_SECONDS"
  local mib=$1 t0 t1 t2
  rm -rf "$D"; mkdir -p "$D/m"
  "$P" init -s 4G "$D/root.hdd" >/dev/null || exit 1
  "$P" mount -m "$D/m" "$D/DiskDescriptor.xml" >/dev/null || exit 1
  [ "$mib" -gt 0 ] && dd if=/dev/urandom of="$D/m/data" bs=1M count="$mib" status=none
  "$P" umount "$D/DiskDescriptor.xml" || exit 1
  sync
  t0=$(now)
  "$P" resize -s 8G "$D/DiskDescriptor.xml" >/dev/null || exit 1
  t1=$(now)
  # The same growth once more, with no filesystem step: -t none disk.
  rm -rf "$D"; mkdir -p "$D"
  "$P" init -s 4G -t none "$D/root.hdd" >/dev/null || exit 1
  "$P" write "$D/DiskDescriptor.xml" /dev/stdin < <(head -c "${mib}M" /dev/urandom) >/dev/null 2>&1
  t2=$(now)
  "$P" resize -s 8G "$D/DiskDescriptor.xml" >/dev/null || exit 1
  local t3; t3=$(now)
  local image; image=$(echo "$t3 - $t2" | bc)
  # Online: mounted XFS.
  rm -rf "$D"; mkdir -p "$D/m"
  "$P" init -s 4G -t xfs "$D/root.hdd" >/dev/null || exit 1
  "$P" mount -m "$D/m" "$D/DiskDescriptor.xml" >/dev/null || exit 1
  [ "$mib" -gt 0 ] && dd if=/dev/urandom of="$D/m/data" bs=1M count="$mib" status=none
  sync
  t3=$(now)
  "$P" resize -s 8G "$D/DiskDescriptor.xml" >/dev/null || exit 1
  local t4; t4=$(now)
  "$P" umount "$D/DiskDescriptor.xml" || exit 1
  echo "$(echo "$t1 - $t0" | bc) $image $(echo "$t4 - $t3" | bc)"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
small=""; big=""
for r in $(seq "$ROUNDS"); do
  s=$(one 16); b=$(one 1024)
  set -- $s $b
  echo "round $r: 16 MiB data: whole $1 s, image $2 s, online $3 s | 1 GiB data: whole $4 s, image $5 s, online $6 s"
  small="$small
$s"; big="$big
$b"
done
ws=$(echo "$small" | awk 'NF{print $1}' | median); is=$(echo "$small" | awk 'NF{print $2}' | median)
wb=$(echo "$big" | awk 'NF{print $1}' | median); ib=$(echo "$big" | awk 'NF{print $2}' | median)
echo "median grow 4G->8G  | 16 MiB data | 1 GiB data | ratio"
echo "whole command (s)   | $ws | $wb | $(echo "scale=2; $wb / $ws" | bc)"
echo "image only (s)      | $is | $ib | $(echo "scale=2; $ib / $is" | bc)"
os=$(echo "$small" | awk 'NF{print $3}' | median); ob=$(echo "$big" | awk 'NF{print $3}' | median)
echo "online, XFS (s)     | $os | $ob | $(echo "scale=2; $ob / $os" | bc)"
rm -rf "$D"
