#!/usr/bin/env bash
# Start-up time of the command line: each command as a whole process, wall clock
# in milliseconds, the median of ROUNDS alternating rounds (every round runs each
# command once, in turn, since the machine is shared and noisy). docs/performance.md
# ("Start-up time") records a run.
#
# Usage: [ROUNDS=15] [IMGMOUNT="bin/imgmount ..."] scripts/startup-time.sh [WORKDIR]
#   WORKDIR   scratch directory (default /tmp/imgmount-startup, emptied first)
#   IMGMOUNT  the programs to time, space-separated (default bin/imgmount); give another
#             checkout's bin/imgmount too to compare two builds, run after run
# Rows: node -e 0 (Node itself), --version, --help, info and check of a 64 MiB qcow2
# with 1 MiB written, qemu-img info / check of the same image, and, as root with
# /dev/fuse, "mount ready": from starting `imgmount IMAGE MNT` until the first 4 KiB
# of MNT/small.raw were read (the unmount after it is not timed).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-15}
read -ra programs <<<"${IMGMOUNT:-bin/imgmount}"
work=${1:-/tmp/imgmount-startup}
rm -rf "$work"
mkdir -p "$work/mnt"
image=$work/small.qcow2
qemu-img create -q -f qcow2 "$image" 64M
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 1M' "$image" >/dev/null

# Row i: its name, its timed command, and an untimed command run after it.
names=('node -e 0')
cmds=('node -e 0')
after=('')
mount_ok=0
[ "$(id -u)" = 0 ] && [ -e /dev/fuse ] && mount_ok=1
for p in "${!programs[@]}"; do
  prog=${programs[$p]}
  tag=""
  [ ${#programs[@]} -gt 1 ] && tag=" [$((p + 1))]"
  names+=("--version$tag" "--help$tag" "info$tag" "check$tag")
  cmds+=("$prog --version" "$prog --help" "$prog info $image" "$prog check $image")
  after+=('' '' '' '')
  if [ $mount_ok = 1 ]; then
    names+=("mount ready$tag")
    cmds+=("$prog $image $work/mnt && head -c 4096 $work/mnt/small.raw")
    after+=("$prog unmount $work/mnt")
  fi
done
names+=("qemu-img info" "qemu-img check")
cmds+=("qemu-img info $image" "qemu-img check $image")
after+=('' '')

declare -A times
for ((r = 0; r < rounds; r++)); do
  for i in "${!cmds[@]}"; do
    t0=$(date +%s%N)
    bash -c "${cmds[$i]}" >/dev/null 2>&1 || { echo "failed: ${cmds[$i]}" >&2; exit 1; }
    t1=$(date +%s%N)
    times[$i]+="$(( (t1 - t0) / 100000 )) "
    [ -z "${after[$i]}" ] || bash -c "${after[$i]}" >/dev/null
  done
done

# The bash -c wrapper costs about a millisecond; it is the same for every row.
printf '%s; %s cores, Node %s; median (min-max) of %s alternating rounds, ms\n' \
  "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" "$(node --version)" "$rounds"
if [ ${#programs[@]} -gt 1 ]; then
  for p in "${!programs[@]}"; do echo "[$((p + 1))] ${programs[$p]}"; done
fi
for i in "${!cmds[@]}"; do
  printf '%s\n' ${times[$i]} | sort -n | awk -v name="${names[$i]}" '
    { v[NR] = $1 / 10 }
    END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%-20s %7.1f  (%.1f-%.1f)\n", name, m, v[1], v[NR] }'
done
[ $mount_ok = 1 ] || echo "(mount ready not measured: needs root and /dev/fuse)"
rm -rf "$work"
