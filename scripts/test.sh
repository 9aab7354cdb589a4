#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), builds, runs the
# whole vitest suite (real qemu-img, real FUSE mounts, loop devices: run as root)
# and ends with one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }

report=$(mktemp /tmp/imgmount-vitest-XXXXXX.json)
npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@"
status=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  if (skipped > 0) console.log(`${skipped} skipped`);
  const failed = r.numFailedTests + (r.numFailedTestSuites > 0 && r.numFailedTests === 0 ? r.numFailedTestSuites : 0);
  console.log(`${r.numPassedTests} passed, ${failed} failed`);
' "$report" || { echo "0 passed, 1 failed"; status=1; }
rm -f "$report"
exit $status
