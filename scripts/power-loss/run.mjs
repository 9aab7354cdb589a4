#!/usr/bin/env node
/**
 * Drives scripts/power-loss.sh: for each variant of FORMAT (common.mjs), a
 * workload run in its own process (workload.mjs), then the replay of its log
 * (replay.mjs) over STATES / variants states. Prints one line per variant and
 * the first failing state; writes "N states checked, N failed" to
 * WORKDIR/summary for the shell script to print last.
 *
 *   node scripts/power-loss/run.mjs FORMAT STATES WORKDIR
 *
 * Environment: POWER_LOSS_SEED (default: random; printed), POWER_LOSS_BATCHES
 * (batches per run, default 40), POWER_LOSS_JOBS (states checked at once,
 * default 2), POWER_LOSS_VARIANTS=NAME,... (only these variants),
 * POWER_LOSS_KEEP=DIR (on a failure, keep the failing run there: its log,
 * initial image, backing file, workload.json, failed-state.img as built and
 * failed-state-after-open.img after imgmount's open and close). The seed fixes
 * the workloads' requests and the states chosen, but not the order in which
 * concurrent requests complete, so only a kept run reproduces a state exactly.
 */
import { execFile } from 'node:child_process';
import { cp, mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VARIANTS } from './common.mjs';
import { replayRun } from './replay.mjs';

const [format, statesText, workDir] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const only = process.env.POWER_LOSS_VARIANTS?.split(',');
const variants = VARIANTS[format]?.filter((variant) => !only || only.includes(variant.name));
if (!variants?.length || !/^[0-9]+$/.test(statesText ?? '') || !workDir) {
  console.log(`usage: run.mjs FORMAT STATES WORKDIR (FORMAT: ${Object.keys(VARIANTS).join(', ')})`);
  process.exit(2);
}
const seed = Number(process.env.POWER_LOSS_SEED ?? Math.floor(Math.random() * 2 ** 31));
const batches = Number(process.env.POWER_LOSS_BATCHES ?? 40);
const jobs = Number(process.env.POWER_LOSS_JOBS ?? 2);
const keep = process.env.POWER_LOSS_KEEP;
const perVariant = Math.ceil(Number(statesText) / variants.length);
console.log(`power-loss ${format}: ${variants.length} variants, ${perVariant} states each, seed ${seed}`);

let checked = 0;
let failed = 0;
let firstFailure;
const saveSummary = () => writeFile(join(workDir, 'summary'), `${checked} states checked, ${failed} failed\n`);
await saveSummary();
for (const [index, variant] of variants.entries()) {
  const started = Date.now();
  const dir = join(workDir, variant.name);
  await mkdir(dir);
  const runSeed = seed + index * 7919;
  const workload = await runNode([join(here, 'workload.mjs'), dir, format, variant.name, String(runSeed), String(batches)]);
  if (workload.code !== 0) {
    failed += 1;
    firstFailure ??= `FAILED: ${variant.name}: the workload (seed ${runSeed}) exited ${workload.code}:\n${workload.output}`;
    console.log(`${variant.name}: the workload failed`);
    await saveSummary();
    continue;
  }
  const result = await replayRun({ dir, count: perVariant, seed: runSeed, jobs, keep: keep !== undefined });
  checked += result.checked;
  failed += result.failed;
  if (result.firstFailure && !firstFailure) {
    firstFailure = result.firstFailure;
    if (keep) {
      const kept = join(keep, variant.name);
      await cp(dir, kept, { recursive: true, filter: (source) => !/state-\d+\.img$|base\.img$/.test(source) });
      firstFailure += `\n  the run and the failing state are kept in ${kept} (failed-state.img as built, failed-state-after-open.img after imgmount's open)`;
    }
  }
  const { stats } = result;
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  console.log(
    `${variant.name}: ${result.checked} states checked, ${result.failed} failed (${seconds} s; ${result.requests} requests in ${result.records} log records; ` +
      `${stats.repaired} states marked for repair; qemu-img check found leaks in ${stats.leaksBefore} unrepaired states and ${stats.leaksAfter} after imgmount's open` +
      `${result.overlaps > 0 ? `; ${result.overlaps} pairs of overlapping requests in flight at once` : ''})`,
  );
  await saveSummary();
}
if (firstFailure) console.log(firstFailure);

function runNode(args) {
  return new Promise((resolve) => {
    execFile(process.execPath, args, { encoding: 'utf8', maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, output: `${stdout}${stderr}`.trim() });
    });
  });
}
