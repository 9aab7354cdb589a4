/**
 * scripts/summarize-vitest.mjs, the last step of scripts/test.sh: the last
 * line is always "N passed, N failed"; outside CI skipped tests are only
 * counted; in CI (CI=true) each skipped test is named on its own line (file
 * and full name), counted as failed, and the exit status is non-zero.
 */
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir } from './helpers/qemu.js';

const SCRIPT = resolve(import.meta.dirname, '../scripts/summarize-vitest.mjs');
const ROOT = resolve(import.meta.dirname, '..');

interface Outcome {
  code: number;
  lines: string[];
}

function summarize(reportPath: string, env: Record<string, string | undefined>, vitestStatus?: number): Promise<Outcome> {
  const environment: NodeJS.ProcessEnv = { ...process.env };
  delete environment.CI;
  for (const [key, value] of Object.entries(env)) if (value !== undefined) environment[key] = value;
  const args = [SCRIPT, reportPath, ...(vitestStatus === undefined ? [] : [String(vitestStatus)])];
  return new Promise((done) => {
    execFile(process.execPath, args, { cwd: ROOT, env: environment, encoding: 'utf8' }, (error, stdout) => {
      done({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, lines: stdout.trimEnd().split('\n') });
    });
  });
}

const test = (ancestorTitles: string[], title: string, status: string) => ({ ancestorTitles, title, fullName: [...ancestorTitles, title].join(' '), status, failureMessages: [] });

/** A report like vitest's JSON reporter writes: 3 passed, 2 skipped (one in a skipped suite), 1 todo. */
const withSkips = {
  numPassedTests: 3,
  numFailedTests: 0,
  numPendingTests: 2,
  numTodoTests: 1,
  numFailedTestSuites: 0,
  testResults: [
    {
      name: join(ROOT, 'test/fuse/write.test.ts'),
      status: 'passed',
      assertionResults: [
        test(['writing through the FUSE mount'], 'unaligned dd writes', 'passed'),
        test(['writing through the FUSE mount', 'read-only'], 'writes fail with EROFS', 'skipped'),
      ],
    },
    {
      name: join(ROOT, 'test/cli.test.ts'),
      status: 'passed',
      assertionResults: [
        test(['imgmount create'], 'makes QED images', 'passed'),
        test(['imgmount create'], 'makes raw images', 'passed'),
        test([], 'top-level skipped test', 'pending'),
        test(['imgmount map'], 'later', 'todo'),
      ],
    },
  ],
};

describe('scripts/summarize-vitest.mjs', () => {
  it('outside CI reports skipped tests and still passes', async () => {
    const dir = await makeTempDir();
    const report = join(dir, 'report.json');
    await writeFile(report, JSON.stringify(withSkips));
    for (const ci of [undefined, 'false', '0', '']) {
      const outcome = await summarize(report, { CI: ci }, 0);
      expect(outcome, `CI=${ci}`).toEqual({ code: 0, lines: ['3 skipped', '3 passed, 0 failed'] });
    }
  });

  it('in CI names every skipped test on its own line, counts it as failed and fails', async () => {
    const dir = await makeTempDir();
    const report = join(dir, 'report.json');
    await writeFile(report, JSON.stringify(withSkips));
    const outcome = await summarize(report, { CI: 'true' }, 0);
    expect(outcome.code).not.toBe(0);
    expect(outcome.lines).toEqual([
      'skipped in CI: test/fuse/write.test.ts > writing through the FUSE mount > read-only > writes fail with EROFS',
      'skipped in CI: test/cli.test.ts > top-level skipped test',
      'skipped in CI: test/cli.test.ts > imgmount map > later',
      '3 skipped (a skipped test fails the run in CI)',
      '3 passed, 3 failed',
    ]);
  });

  it('in CI a run without skipped tests passes', async () => {
    const dir = await makeTempDir();
    const report = join(dir, 'report.json');
    const clean = { ...withSkips, testResults: [{ ...withSkips.testResults[0]!, assertionResults: withSkips.testResults[0]!.assertionResults.slice(0, 1) }] };
    await writeFile(report, JSON.stringify(clean));
    expect(await summarize(report, { CI: 'true' }, 0)).toEqual({ code: 0, lines: ['1 passed, 0 failed'] });
  });

  it('counts failed tests, files that failed to load, and a vitest failure with no failed test', async () => {
    const dir = await makeTempDir();
    const report = join(dir, 'report.json');
    await writeFile(
      report,
      JSON.stringify({
        testResults: [
          { name: join(ROOT, 'test/a.test.ts'), status: 'failed', assertionResults: [test(['a'], 'one', 'failed'), test(['a'], 'two', 'passed')] },
          { name: join(ROOT, 'test/broken.test.ts'), status: 'failed', message: 'Cannot find module', assertionResults: [] },
        ],
      }),
    );
    expect(await summarize(report, {}, 1)).toEqual({ code: 1, lines: ['1 passed, 2 failed'] });
    const passing = join(dir, 'passing.json');
    await writeFile(passing, JSON.stringify({ testResults: [{ name: join(ROOT, 'test/a.test.ts'), status: 'passed', assertionResults: [test([], 'one', 'passed')] }] }));
    const unhandled = await summarize(passing, {}, 1);
    expect(unhandled.code).toBe(1);
    expect(unhandled.lines[unhandled.lines.length - 1]).toBe('1 passed, 1 failed');
  });

  it('ends with "0 passed, 1 failed" when there is no usable report (vitest crashed)', async () => {
    const dir = await makeTempDir();
    const empty = join(dir, 'empty.json');
    await writeFile(empty, '');
    expect(await summarize(empty, {}, 1)).toEqual({ code: 1, lines: ['0 passed, 1 failed'] });
  });
});
