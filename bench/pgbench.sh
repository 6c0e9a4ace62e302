#!/bin/bash
# A real application: PostgreSQL's pgbench (TPC-B like, fsync on) with its
# data directory on a ploop disk (defaults, ext4), beside the same on an
# ext4 on a plain loop device over a raw file and on the host's own
# filesystem; each alone and beside a noisy neighbour on a disk of the
# same kind (four buffered 1 MiB writers that truncate and sync, as in
# bench/isolation.sh). Prints, per layout: transactions per second and the
# transactions' latency p99.
# Usage (root): bench/pgbench.sh [PLOOP] [SECONDS] [SCALE]
#   Needs: postgresql (initdb, pg_ctl, pgbench), a release build.
set -u
P=${1:-target/release/ploop}
SECS=${2:-15}
SCALE=${3:-10}
D=${BENCH_DIR:-/var/tmp/pbench-pg}
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
[ -x "$BIN/initdb" ] || { echo "needs postgresql (initdb)" >&2; exit 1; }
id postgres >/dev/null 2>&1 || { echo "needs the postgres user" >&2; exit 1; }
PORT=54329
SOCK=$D/sock
as_pg() { runuser -u postgres -- "$@"; }
. "$(dirname "$0")/tenants.sh"
# bench DATA_PARENT NOISY_DIR LABEL: one cluster in DATA_PARENT/pg, run
# alone, then beside the noise.
bench() {
  local data=$1/pg np
  mkdir -p "$data" "$SOCK"; chown postgres "$data" "$SOCK"; chmod 700 "$data"
  as_pg "$BIN/initdb" -D "$data" -A trust >/dev/null || return 1
  as_pg "$BIN/pg_ctl" -D "$data" -l "$SOCK/pg.log" -w -o "-k $SOCK -p $PORT -c listen_addresses=''" start >/dev/null || return 1
  pgbench -h "$SOCK" -p $PORT -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
  for mode in alone noisy; do
    np=
    if [ $mode = noisy ]; then noisy "$2" "$SECS" & np=$!; sleep 0.5; fi
    rm -rf "$D/log"; mkdir -p "$D/log"
    local tps
    tps=$(cd "$D/log" && pgbench -h "$SOCK" -p $PORT -U postgres -c 4 -j 2 -T "$SECS" -l postgres 2>/dev/null |
      sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    [ -n "$np" ] && wait $np
    # Each log line: client, transaction, latency (us), ...
    local p99
    p99=$(cat "$D"/log/pgbench_log.* | awk '{print $3}' | sort -n |
      awk '{a[NR]=$1} END {if (NR) printf "%.2f", a[int(NR * 0.99) + (NR * 0.99 > int(NR * 0.99))] / 1000}')
    printf "%-10s %-6s tps %10s  p99 %8s ms\n" "$3" "$mode" "${tps:-0}" "${p99:-0}"
  done
  as_pg "$BIN/pg_ctl" -D "$data" -w -m fast stop >/dev/null
}
cleanup() {
  for d in "$D"/*/pg; do
    [ -f "$d/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$d" -w -m immediate stop >/dev/null 2>&1
  done
  for t in q n; do
    [ -f "$D/$t.d/DiskDescriptor.xml" ] && "$P" umount "$D/$t.d/DiskDescriptor.xml" >/dev/null 2>&1
    mountpoint -q "$D/$t" && umount "$D/$t"
    [ -f "$D/$t.dev" ] && losetup -d "$(cat "$D/$t.dev")" 2>/dev/null
  done
  rm -rf "$D"
}
trap cleanup EXIT
cleanup; mkdir -p "$D"
# ploop disks, defaults.
for t in q n; do
  mkdir -p "$D/$t.d" "$D/$t"
  "$P" init -s 4G "$D/$t.d/root.hdd" >/dev/null || exit 1
  "$P" mount -m "$D/$t" "$D/$t.d/DiskDescriptor.xml" >/dev/null || exit 1
done
bench "$D/q" "$D/n" ploop
for t in q n; do "$P" umount "$D/$t.d/DiskDescriptor.xml" >/dev/null; rm -rf "$D/$t.d" "$D/$t"; done
# Plain loop devices over raw files.
for t in q n; do
  truncate -s 4G "$D/$t.raw"; mkfs.ext4 -q -F "$D/$t.raw"
  mkdir -p "$D/$t"; dev=$(losetup -f --show "$D/$t.raw"); mount "$dev" "$D/$t"
  echo "$dev" > "$D/$t.dev"
done
bench "$D/q" "$D/n" loop
for t in q n; do umount "$D/$t"; losetup -d "$(cat "$D/$t.dev")"; rm -f "$D/$t.raw" "$D/$t.dev"; rm -rf "$D/$t"; done
# The host's filesystem.
mkdir -p "$D/hq" "$D/hn"
bench "$D/hq" "$D/hn" host
