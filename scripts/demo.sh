#!/usr/bin/env bash
# The main job, end to end: a container's life on a ploop disk.
# Builds ploop, creates a 1 GiB image with ext4, mounts it, puts a tiny
# root (static busybox) in it, runs a process with it as root in new
# namespaces, snapshots it while mounted, backs the snapshot up through a
# read-only mount, and unmounts. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "needs a Rust toolchain: https://rustup.rs" >&2; exit 1; }
bash scripts/setup-deps.sh
cargo build --release -q
P=$PWD/target/release/ploop
W=$(mktemp -d /var/tmp/ploop-demo.XXXXXX)
cd "$W"
mkdir root backup
cleanup() { $P umount DiskDescriptor.xml >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== init: a 1 GiB ploop image, OpenVZ's layout (GPT, ext4 in partition 1), in $W"
$P init -s 1G root.hdd
$P info DiskDescriptor.xml
echo "== mount partition 1 as the container's root"
$P mount -m root DiskDescriptor.xml
$P list
echo "== put a tiny root in it (static busybox)"
mkdir -p root/bin root/proc root/tmp root/etc
cp /bin/busybox root/bin/busybox
chroot root /bin/busybox --install -s /bin
echo "ct1" > root/etc/hostname
echo "== run a process with it as root, in new namespaces"
unshare --mount --uts --ipc --pid --fork --root=root /bin/sh -c \
  'mount -t proc proc /proc; hostname $(cat /etc/hostname); echo "hello from $(hostname), pid $$"; ps; echo data > /tmp/state'
echo "== snapshot while mounted (the filesystem is frozen for an instant)"
SNAP=$($P snapshot DiskDescriptor.xml | grep -o '{[^}]*}')
echo "snapshot $SNAP"
echo "changed after the snapshot" > root/tmp/state
$P snapshot-list DiskDescriptor.xml
echo "== back the snapshot up through a read-only mount, beside the running top"
$P mount -r -u "$SNAP" -m backup DiskDescriptor.xml
tar -C backup -cf backup.tar .
echo "backup holds: $(tar -xOf backup.tar ./tmp/state), the top holds: $(cat root/tmp/state)"
$P umount -m backup
echo "== merge the snapshot back online, unmount, check"
$P snapshot-merge DiskDescriptor.xml
$P umount DiskDescriptor.xml
$P check -f DiskDescriptor.xml
trap - EXIT
echo "demo files left in $W"
