#!/usr/bin/env bash
# Power-loss testing through the log-writes filter (docs/reliability.md).
#
# Usage: scripts/power-loss.sh FORMAT [STATES]      FORMAT: qed or qcow2; STATES default 1000
#
# For each variant of FORMAT (with and without a backing file; for qcow2 with lazy
# refcounts on and off; runs ending with and without close), a workload of seeded
# random writes, each batch flushed, runs through `--filter log-writes`; the replay
# then rebuilds at least STATES (split across the variants) states a power loss could
# leave and checks that each opens (repaired if marked), that every acknowledged write
# reads back, and that qemu-img check finds no corruption (leaks only where allowed).
# Prints one line per variant, the first failing state if any, and last
# "N states checked, N failed"; exits 1 if any failed, 2 if it could not run.
# Needs a build (npm run build), qemu-img and qemu-io. Environment: POWER_LOSS_SEED,
# POWER_LOSS_BATCHES, POWER_LOSS_JOBS, POWER_LOSS_VARIANTS, POWER_LOSS_KEEP=DIR (scripts/power-loss/run.mjs).
set -uo pipefail
cd "$(dirname "$0")/.."

format=${1:-}
states=${2:-1000}
give_up() {
  echo "power-loss.sh: $1" >&2
  echo "0 states checked, 0 failed"
  exit 2
}
case "$format" in qed | qcow2) ;; *) give_up "usage: scripts/power-loss.sh qed|qcow2 [STATES]" ;; esac
[[ "$states" =~ ^[0-9]+$ ]] || give_up "STATES must be a whole number, not '$states'"
grep -qs markWriteLog dist/block/index.js || give_up "dist/ is missing or older than the log-writes filter: run npm run build first"
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || give_up "qemu-img or qemu-io is not installed (Debian package qemu-utils)"

work=$(mktemp -d "${TMPDIR:-/tmp}/power-loss.XXXXXX") || give_up "cannot make a temporary directory"
trap 'rm -rf "$work"' EXIT
node scripts/power-loss/run.mjs "$format" "$states" "$work" 2>&1
status=$?
summary=$(cat "$work/summary" 2>/dev/null)
if [ "$status" -ne 0 ] || [ -z "$summary" ]; then
  # The replay itself broke off: what it had counted, plus one failure for the break.
  echo "power-loss.sh: the replay ended with exit status $status before finishing (counted as one failed state)"
  checked=$(sed -n 's/^\([0-9]*\) states checked.*/\1/p' <<<"$summary")
  failed=$(sed -n 's/.*checked, \([0-9]*\) failed$/\1/p' <<<"$summary")
  echo "${checked:-0} states checked, $((${failed:-0} + 1)) failed"
  exit 1
fi
echo "$summary"
case "$summary" in *", 0 failed") exit 0 ;; *) exit 1 ;; esac
