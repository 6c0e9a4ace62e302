#!/bin/bash
# Backing up a container of many small files: ploop's way (an online
# snapshot, a copy of the now read-only image file, the snapshot merged
# back) beside `tar` of the same files from the mounted filesystem, both
# from a cold page cache. The copy is then mounted read-only and its files
# counted and compared, so the figure is of a backup that holds them.
# Prints: seconds and bytes of each, and the file count found in the copy.
# Usage (root): bench/backup.sh [PLOOP] [FILES]   Needs: a release build.
set -u
P=${1:-target/release/ploop}
N=${2:-100000}
D=${BENCH_DIR:-/var/tmp/pbench-backup}
cleanup() {
  for dd in "$D/c/DiskDescriptor.xml" "$D/b/DiskDescriptor.xml"; do
    [ -f "$dd" ] && "$P" umount "$dd" >/dev/null 2>&1
  done
  rm -rf "$D"
}
trap cleanup EXIT
cleanup; mkdir -p "$D/c/m" "$D/b/m"
"$P" init -s 4G "$D/c/root.hdd" >/dev/null || exit 1
"$P" mount -m "$D/c/m" "$D/c/DiskDescriptor.xml" >/dev/null || exit 1
# N files of 1-16 KiB in folders of 1,000.
python3 - "$D/c/m" "$N" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
data = os.urandom(16384)
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000))
    if i % 1000 == 0:
        os.mkdir(d)
    size = rnd.randint(1024, 16384)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(data[:size])
PY
sync
now() { date +%s.%N; }
echo 3 > /proc/sys/vm/drop_caches
t0=$(now)
"$P" snapshot "$D/c/DiskDescriptor.xml" >/dev/null || exit 1
cp --sparse=always "$D/c/root.hdd" "$D/b/root.hdd" || exit 1
"$P" snapshot-merge "$D/c/DiskDescriptor.xml" >/dev/null || exit 1
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
t2=$(now)
tar cf "$D/files.tar" -C "$D/c/m" . || exit 1
t3=$(now)
img_bytes=$(du -B1 "$D/b/root.hdd" | cut -f1)
tar_bytes=$(stat -c %s "$D/files.tar")
# The copy holds the files: mount it read-only and compare.
"$P" restore-descriptor "$D/b" "$D/b/root.hdd" >/dev/null || exit 1
"$P" mount -r -m "$D/b/m" "$D/b/DiskDescriptor.xml" >/dev/null || exit 1
found=$(find "$D/b/m" -type f -name 'f*' | wc -l)
same=$(diff -rq "$D/c/m" "$D/b/m" >/dev/null 2>&1 && echo yes || echo no)
"$P" umount "$D/b/DiskDescriptor.xml" >/dev/null
python3 -c "print('snapshot backup %.3f s, %d bytes; tar %.3f s, %d bytes; files in the copy %d of %d, identical: %s' % ($t1 - $t0, $img_bytes, $t3 - $t2, $tar_bytes, $found, $N, '$same'))"
