#!/bin/bash
# Moving a running container between two hosts (network namespaces joined
# by a veth pair): `ploop copy` of its mounted disk over TCP, beside rsync
# of the same files over the same link (rsync daemon on the other side),
# while a writer in the container writes WRITE_MIBS MiB/s (1 MiB synced
# every 1/WRITE_MIBS s, over 64 files in turn). Prints, for each: the
# total time and the bytes sent per byte of data in the container; for
# ploop copy also its passes and the time the filesystem was frozen.
# Usage (root): bench/migrate.sh [PLOOP] [DATA_MIB] [DISK_SIZE] [WRITE_MIBS]
#   Needs: rsync, iproute2, a release build.
set -u
P=${1:-target/release/ploop}
DATA=${2:-1024}
SIZE=${3:-4G}
RATE=${4:-10}
D=${BENCH_DIR:-/var/tmp/pbench-migrate}
NA=pbmiga$$; NB=pbmigb$$
ADDR=10.232.$(( $$ % 200 + 20 )).2
cleanup() {
  [ -n "${WP:-}" ] && kill "$WP" 2>/dev/null && wait "$WP" 2>/dev/null
  [ -n "${RP:-}" ] && kill "$RP" 2>/dev/null
  for dd in "$D/src/DiskDescriptor.xml" "$D/dst/DiskDescriptor.xml"; do
    [ -f "$dd" ] && "$P" umount "$dd" >/dev/null 2>&1
  done
  ip netns del "$NA" 2>/dev/null; ip netns del "$NB" 2>/dev/null
  rm -rf "$D"
}
trap cleanup EXIT
cleanup
mkdir -p "$D/src/m" "$D/dst" "$D/rsync"
ip netns add "$NA" && ip netns add "$NB" || exit 1
ip link add "va$$" type veth peer name "vb$$"
ip link set "va$$" netns "$NA"; ip link set "vb$$" netns "$NB"
ip -n "$NA" addr add "${ADDR%.2}.1/24" dev "va$$"; ip -n "$NB" addr add "$ADDR/24" dev "vb$$"
for ns in "$NA" "$NB"; do ip -n "$ns" link set lo up; done
ip -n "$NA" link set "va$$" up; ip -n "$NB" link set "vb$$" up

"$P" init -s "$SIZE" "$D/src/root.hdd" >/dev/null || exit 1
"$P" mount -m "$D/src/m" "$D/src/DiskDescriptor.xml" >/dev/null || exit 1
# The data: a quarter in 64 KiB files, the rest in one file.
small=$((DATA / 4 * 16))
mkdir -p "$D/src/m/files" "$D/src/m/w"
head -c $((small * 65536)) /dev/urandom | split -b 65536 -a 5 - "$D/src/m/files/f"
dd if=/dev/urandom of="$D/src/m/big" bs=1M count=$((DATA - DATA / 4)) status=none
sync
data=$(du -sb --exclude=w "$D/src/m" | cut -f1)
dev=$("$P" info -d "$D/src/DiskDescriptor.xml" | awk '/^device:/{print $2}')

writer() {
  local i=0 nap
  nap=$(python3 -c "print(1 / $RATE)")
  while :; do
    dd if=/dev/zero of="$D/src/m/w/f$((i % 64))" bs=1M count=1 conv=fsync status=none
    i=$((i + 1)); sleep "$nap"
  done
}
now() { date +%s.%N; }

# ploop copy over TCP.
writer & WP=$!
sleep 1
ip netns exec "$NB" "$P" copy -d "$D/dst/root.hdd" --listen "$ADDR:7100" 2>"$D/rx.log" & RP=$!
for _ in $(seq 100); do grep -q "waiting on" "$D/rx.log" 2>/dev/null && break; sleep 0.05; done
t0=$(now)
ip netns exec "$NA" "$P" copy -s "$dev" --to "$ADDR:7100" 2>"$D/tx.log" || { cat "$D/tx.log" "$D/rx.log"; exit 1; }
t1=$(now)
wait "$RP"; RP=
kill "$WP"; wait "$WP" 2>/dev/null; WP=
stream=$(sed -n 's/^ploop copy: sent \([0-9]*\) bytes.*/\1/p' "$D/tx.log")
passes=$(sed -n 's/.* in \([0-9]*\) passes.*/\1/p' "$D/tx.log")
frozen=$(sed -n 's/.*frozen \([0-9.]*\) s.*/\1/p' "$D/tx.log")
python3 -c "print('ploop copy: total %.2f s, frozen %s s, %s passes, %d bytes sent for %d bytes of data: %.3f per byte' % ($t1 - $t0, '$frozen', '$passes', $stream, $data, $stream / $data))"

# rsync of the files over the same link, the writer running too.
cat > "$D/rsyncd.conf" <<EOF
use chroot = no
[m]
path = $D/rsync
read only = no
uid = root
gid = root
EOF
ip netns exec "$NB" rsync --daemon --no-detach --config="$D/rsyncd.conf" --address="$ADDR" --port=7101 & RP=$!
sleep 0.5
writer & WP=$!
sleep 1
t0=$(now)
out=$(ip netns exec "$NA" rsync -a --stats "$D/src/m/" "rsync://$ADDR:7101/m/" 2>&1) || { echo "$out"; exit 1; }
t1=$(now)
kill "$WP"; wait "$WP" 2>/dev/null; WP=
kill "$RP"; RP=
sent=$(echo "$out" | sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' | tr -d ,)
python3 -c "print('rsync: total %.2f s, %d bytes sent for %d bytes of data: %.3f per byte' % ($t1 - $t0, $sent, $data, $sent / $data))"
