#!/usr/bin/env bash
# Debian packages the tool and its tests use: the peers we test against
# (qemu-img, OpenVZ's ploop check) and the kernel-facing tools.
set -euo pipefail
pkgs=(qemu-utils ploop bzip2 bc fio fuse3 e2fsprogs xfsprogs util-linux mount libnbd-bin python3-libnbd nbdkit openssl busybox-static gdisk postgresql rsync iproute2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No service starts while installing (postgresql would start a cluster
  # of its own; the benchmarks start theirs and stop it).
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# FUSE over io_uring (Linux 6.14+): let `ploop mount --fuse-queues ring`
# (and the tests of it) use per-CPU request queues.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ]; then
  echo Y > "$uring" || true
fi
