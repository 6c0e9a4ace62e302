#!/usr/bin/env bash
# The main job, end to end: build ploop, create an image, put data in it,
# snapshot it, read it back, and let the independent tools judge the image.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "needs a Rust toolchain: https://rustup.rs" >&2; exit 1; }
bash scripts/setup-deps.sh
cargo build --release -q
P=$PWD/target/release/ploop
W=$(mktemp -d /var/tmp/ploop-demo.XXXXXX)
cd "$W"
echo "== init a 1 GiB ploop image in $W"
$P init -s 1G root.hdd
echo "== write 8 MiB of data at 100 MiB, snapshot, write more"
head -c 8M /dev/urandom > data.bin
$P write --offset 100M DiskDescriptor.xml data.bin
$P snapshot DiskDescriptor.xml
echo "hello from the top delta" | $P write --offset 0 DiskDescriptor.xml -
$P snapshot-list DiskDescriptor.xml
echo "== read back"
$P read --offset 100M --length 8M DiskDescriptor.xml | cmp - data.bin && echo "data matches"
$P read --length 25 DiskDescriptor.xml; echo
echo "== independent checks"
for f in root.hdd root.hdd.*; do qemu-img check -q -f parallels "$f" && echo "qemu-img check $f: ok"; done
ploop check -f -c -r root.hdd && echo "OpenVZ ploop check root.hdd: ok"
$P snapshot-merge DiskDescriptor.xml
$P info DiskDescriptor.xml
echo "demo files left in $W"
