# Shared by the benchmark scripts (sourced): the fio jobs of
# ../shared/bench/peers.sh, repeated over rounds, with medians and the
# machine's CPU time per I/O. The machines are noisy: compare medians.
# Needs T (seconds per job) set by the caller.

# Each workload is RW:BS:QD[:NAME]; results are kept under NAME (or RW).
WORKLOADS=${WORKLOADS:-"randread:4k:32 randwrite:4k:32 read:1m:8 write:1m:8"}
# How much of the target each job fills first and then works on.
JOB_SIZE=${JOB_SIZE:-1G}
declare -A R   # "label|rw" -> IOPS of each round
declare -A C   # "label|rw" -> busy CPU microseconds (all cores) per I/O, each round
declare -A M   # "label|rw" -> median IOPS, after print_medians

# Busy CPU ticks of the whole machine: user, nice, system, irq, softirq.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }

# jobs LABEL FIO-TARGET-ARGS...: fill JOB_SIZE, then each workload for T seconds.
jobs() {
  local label=$1; shift
  local hz; hz=$(getconf CLK_TCK)
  fio --name=fill --rw=write --bs=1m --iodepth=8 --size="$JOB_SIZE" --output-format=terse "$@" >/dev/null 2>&1
  for j in $WORKLOADS; do
    local rw bs qd name b0 b1 v
    IFS=: read -r rw bs qd name <<<"$j"
    name=${name:-$rw}
    b0=$(busy)
    v=$(fio --name=x --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime="$T" --time_based --size="$JOB_SIZE" \
          --group_reporting --output-format=terse --terse-version=3 "$@" 2>/dev/null |
        awk -F';' '{printf "%.0f", $8+$49}')
    b1=$(busy)
    v=${v:-0}
    R["$label|$name"]="${R["$label|$name"]:-} $v"
    C["$label|$name"]="${C["$label|$name"]:-} $(awk -v d=$((b1 - b0)) -v hz="$hz" -v v="$v" -v t="$T" \
      'BEGIN{printf "%.1f", (v > 0 ? d / hz * 1e6 / (v * t) : 0)}')"
  done
}

# run_rounds ROUNDS TARGET...: each TARGET is a command line that calls
# jobs; every round runs them all, starting one further along the list.
run_rounds() {
  local rounds=$1; shift
  local targets=("$@") n=$# r i
  for ((r = 0; r < rounds; r++)); do
    for ((i = 0; i < n; i++)); do
      eval "${targets[$(((i + r) % n))]}"
    done
  done
}

# median of whitespace-separated numbers on stdin: "median min max"
median() { tr ' ' '\n' | grep -v '^$' | sort -n |
  awk '{a[NR]=$1} END {if (NR == 0) {print "0 0 0"; exit}
       m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f %.0f %.0f", m, a[1], a[NR]}'; }

# The table of medians; fills M.
print_medians() {
  local rounds=$1 k med lo hi cpu
  echo "median of $rounds rounds of ${T}s (range); 1m rows in MiB/s, 4k rows in IOPS;"
  echo "CPU: the machine's busy CPU time per I/O (median, microseconds)"
  while IFS= read -r k; do
    read -r med lo hi <<<"$(echo "${R[$k]}" | median)"
    read -r cpu _ _ <<<"$(echo "${C[$k]}" | median)"
    M["$k"]=$med
    printf "%-28s %-10s %9s   (%s-%s)   CPU %5s us/IO\n" "${k%|*}" "${k#*|}" "$med" "$lo" "$hi" "$cpu"
  done < <(printf '%s\n' "${!R[@]}" | sort)
}
