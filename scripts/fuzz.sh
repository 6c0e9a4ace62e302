#!/usr/bin/env bash
# Run every fuzz target for a bounded time (libFuzzer through cargo-fuzz).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Needs: cargo install cargo-fuzz; a release build of ploop for the seeds.
# The stable toolchain is told to accept the sanitizer flags with
# RUSTC_BOOTSTRAP=1 (no nightly toolchain is needed).
# A crash leaves its input in fuzz/artifacts/TARGET/: turn it into a named
# regression test (crates/*/tests or the crate's unit tests), then fix it.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nbd_session nbd_requests ploop_header descriptor)
P=target/release/ploop
[ -x "$P" ] || cargo build --release -p ploop
seeds=fuzz/seeds
rm -rf "$seeds"; mkdir -p "$seeds"/{nbd_session,nbd_requests,ploop_header,descriptor}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# Real images and descriptors, as our init and qemu-img write them.
for v in 1 2; do
  mkdir -p "$tmp/v$v"
  "$P" init -s 4M -v $v -b 128 -t none "$tmp/v$v/root.hdd" >/dev/null
  "$P" snapshot "$tmp/v$v/DiskDescriptor.xml" >/dev/null
  head -c 65536 "$tmp/v$v/root.hdd" > "$seeds/ploop_header/ploop-v$v"
  cp "$tmp/v$v/DiskDescriptor.xml" "$seeds/descriptor/dd-v$v.xml"
done
qemu-img create -q -f parallels -o cluster_size=64k "$tmp/q.hds" 4M
head -c 65536 "$tmp/q.hds" > "$seeds/ploop_header/qemu-parallels"

# NBD: client flags, options (structured replies, base:allocation, GO),
# then a write, a read, block status and a disconnect.
be32() { printf "%08x" "$1" | xxd -r -p; }
be16() { printf "%04x" "$1" | xxd -r -p; }
be64() { printf "%016x" "$1" | xxd -r -p; }
opt() { printf 'IHAVEOPT'; be32 "$1"; be32 "$2"; }
req() { be32 $((0x25609513)); be16 "$1"; be16 "$2"; be64 "$3"; be64 "$4"; be32 "$5"; }
requests() {
  req 0 1 1 4096 512; head -c 512 /dev/zero | tr '\0' 'x'
  req 0 0 2 4096 512
  req 8 7 3 0 65536
  req 0 3 4 0 0
  req 0 2 5 0 0
}
{
  be32 3
  opt 8 0
  opt 10 27; be32 0; be32 1; be32 15; printf 'base:allocation'
  opt 7 6; be32 0; be16 0
  requests
} > "$seeds/nbd_session/go-structured"
{ be32 3; opt 1 0; requests; } > "$seeds/nbd_session/export-name"
{ printf '\x01'; requests; } > "$seeds/nbd_requests/structured"
{ printf '\x00'; requests; } > "$seeds/nbd_requests/simple"

cd fuzz
for t in "${targets[@]}"; do
  echo "== $t: ${T}s"
  mkdir -p "corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$T" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E 'stat::number_of_executed_units|stat::peak_rss|SUMMARY|ERROR|panicked' || true
done
if compgen -G "artifacts/*/*" >/dev/null; then
  echo "crashes found:"; ls -l artifacts/*/*
  exit 1
fi
echo "no crashes"
