#!/usr/bin/env node
// Summarizes a vitest JSON report (--reporter=json --outputFile.json=FILE) for
// scripts/test.sh. The last line printed is always "N passed, N failed".
//
//   node scripts/summarize-vitest.mjs REPORT.json [VITEST_EXIT_STATUS]
//
// - failed counts failed tests, plus one for each test file that failed
//   without a failed test (it could not be loaded, or a hook failed), plus one
//   when vitest exited non-zero although no test failed (unhandled errors).
// - Skipped tests (skip, skipIf, todo) are allowed outside CI: "N skipped" is
//   printed before the last line. In CI (CI set in the environment, other than
//   "false" or "0") a skipped test fails the run: each one is named on its own
//   line ("skipped in CI: FILE > suite > test") and counted as failed.
//
// Exit status: 0 when this summary finds no failure, 1 when it does (a failed
// or, in CI, a skipped test, or an unreadable report); test.sh fails the run
// if either vitest or this script says so.
import { readFileSync, realpathSync } from 'node:fs';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const SKIPPED = new Set(['skipped', 'pending', 'todo', 'disabled']);

export function inCi(env = process.env) {
  const value = (env.CI ?? '').trim().toLowerCase();
  return value !== '' && value !== 'false' && value !== '0';
}

/** The summary lines for a parsed report, and whether the run failed. */
export function summarize(report, { ci = false, cwd = process.cwd(), vitestStatus = 0 } = {}) {
  let passed = 0;
  let failed = 0;
  const skipped = [];
  for (const file of report.testResults ?? []) {
    const name = relative(cwd, file.name ?? '') || file.name;
    let failedHere = 0;
    for (const test of file.assertionResults ?? []) {
      if (test.status === 'passed') passed += 1;
      else if (test.status === 'failed') failedHere += 1;
      else if (SKIPPED.has(test.status)) skipped.push([name, ...(test.ancestorTitles ?? []), test.title].join(' > '));
    }
    if (failedHere === 0 && file.status === 'failed') failedHere = 1;
    failed += failedHere;
  }
  const lines = [];
  if (vitestStatus !== 0 && failed === 0) {
    lines.push(`vitest exited with status ${vitestStatus} although no test failed (see its output above)`);
    failed = 1;
  }
  if (skipped.length > 0) {
    if (ci) {
      for (const test of skipped) lines.push(`skipped in CI: ${test}`);
      lines.push(`${skipped.length} skipped (a skipped test fails the run in CI)`);
      failed += skipped.length;
    } else {
      lines.push(`${skipped.length} skipped`);
    }
  }
  lines.push(`${passed} passed, ${failed} failed`);
  return { lines, failed: failed > 0 };
}

function main(path, vitestStatus) {
  let report;
  try {
    report = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    process.stderr.write(`summarize-vitest: cannot read the vitest report ${path}: ${error.message}\n`);
    process.stdout.write('0 passed, 1 failed\n');
    return 1;
  }
  const { lines, failed } = summarize(report, { ci: inCi(), vitestStatus });
  process.stdout.write(`${lines.join('\n')}\n`);
  return failed ? 1 : 0;
}

if (process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = main(process.argv[2] ?? '', Number(process.argv[3] ?? 0) || 0);
}
