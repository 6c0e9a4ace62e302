# Shared by the benchmarks of tenants side by side (sourced).

# noisy DIR SECONDS: the noisy neighbour, four buffered 1 MiB writers that
# truncate and sync their files, until the time is up.
noisy() {
  local end=$(( $(date +%s) + $2 + 1 ))
  for w in 1 2 3 4; do
    ( while [ "$(date +%s)" -lt $end ]; do
        dd if=/dev/zero of="$1/w$w" bs=1M count=64 status=none
        truncate -s 0 "$1/w$w"; sync "$1/w$w" 2>/dev/null || sync
      done ) &
  done
  wait
}
