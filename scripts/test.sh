#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), builds, runs the
# whole vitest suite (real qemu-img, real FUSE mounts, loop devices: run as root)
# and ends with one line "N passed, N failed". Outside CI a skipped test (a tool
# or root missing) is only reported; in CI (CI=true) each skipped test is named
# and fails the run (scripts/summarize-vitest.mjs).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }

report=$(mktemp /tmp/imgmount-vitest-XXXXXX.json)
npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@"
status=$?
# The summary (last line "N passed, N failed"); in CI (CI=true) a skipped test fails the run.
node scripts/summarize-vitest.mjs "$report" "$status" || status=1
rm -f "$report"
exit $status
