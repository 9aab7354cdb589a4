/**
 * A mount with a tiny L2-table cache (--cache-size 16K, below the smallest
 * cache allowed) over a QED image of 64 L2 tables: four processes reading
 * random 4 KiB blocks and one writing, all with O_DIRECT (past the page cache,
 * so every request reaches the daemon), for a few seconds. No request fails,
 * reads of blocks nobody writes return the right bytes, and after unmount the
 * image equals a raw reference the writer wrote the same way (qemu-img
 * compare). The mount says it raised the cache bound.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { join } from 'node:path';
import { qemuConvertToRaw, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, needCheck, skipWithoutFuse } from './fuse-helpers.js';
import { writeFile } from 'node:fs/promises';

const WORKER = fileURLToPath(new URL('./random-io-worker.mjs', import.meta.url));
const TABLE_SPAN = 4 * MiB; // 4 KiB clusters, table_size=2: 1024 entries per L2 table
const SIZE = 64 * TABLE_SPAN;
const SECONDS = 3;

interface WorkerReport {
  ops: number;
  errors: string[];
  errorCount: number;
  mismatches: number;
}

function worker(mode: 'read' | 'write', file: string, reference: string, seed: number): Promise<WorkerReport> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [WORKER, mode, file, reference, String(SECONDS), String(seed), String(SIZE / 4096)], { encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${mode} worker failed: ${error.message} ${stderr}`));
      else resolve(JSON.parse(stdout) as WorkerReport);
    });
  });
}

describe.skipIf(skipWithoutFuse('a mount with a tiny L2-table cache'))('a mount with a tiny L2-table cache', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('--cache-size 16K: concurrent random O_DIRECT reads and a writer never fail, the image ends as written', { timeout: 60_000 }, async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096,table_size=2', image, String(SIZE)]);
    // Some data in every L2 table, so reads need the tables.
    await qemuIo(image, Array.from({ length: 64 }, (_, table) => `write -P ${(table % 250) + 1} ${table * TABLE_SPAN + (table % 7) * 65536} 256k`));
    const reference = lab.path('reference.raw');
    await writeFile(reference, await qemuConvertToRaw(image, lab.dir));

    const mnt = await lab.mountpoint();
    const { result } = await lab.mount(['--cache-size', '16K', image], mnt);
    expect(result.stderr).toMatch(/L2-table cache of 16384 bytes raised to 32768 bytes/);
    const file = join(mnt, 'disk.raw');

    const reports = await Promise.all([
      worker('write', file, reference, 1),
      ...[2, 3, 4, 5].map((seed) => worker('read', file, reference, seed)),
    ]);
    const errors = reports.flatMap((report) => report.errors);
    expect(errors).toEqual([]);
    expect(reports.map((report) => report.mismatches)).toEqual([0, 0, 0, 0, 0]);
    expect(reports[0]!.ops).toBeGreaterThan(50);
    for (const report of reports.slice(1)) expect(report.ops).toBeGreaterThan(50);

    const unmounted = await imgmount(['unmount', mnt]);
    expect(unmounted.code).toBe(0);
    expect(await needCheck(image)).toBe(false);
    await qemuImg(['compare', '-f', 'qed', '-F', 'raw', image, reference]);
    const check = await run('qemu-img', ['check', '--output=json', image]);
    expect((JSON.parse(check.stdout) as { corruptions?: number }).corruptions ?? 0).toBe(0);
  });
});
