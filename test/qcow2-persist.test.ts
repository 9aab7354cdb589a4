/**
 * qcow2 without lazy refcounts writes new L2 entries after a shared fdatasync
 * (writable.ts). That fdatasync is made with the allocation lock free: while a
 * persist of pending entries waits for it, allocating writes go on (before,
 * each one waited for the whole flush: 100-280 ms stalls of sequential 1 MiB
 * writes every second here). The entries each persist writes are still only
 * those whose data a flush made durable first (read from the log-writes
 * record), a crash at that moment (a copy of the file) leaves no corruption,
 * and afterwards the image is clean for qemu-img check and reads what was written.
 */
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { parseWriteLog } from '../src/block/filters/write-log.js';
import { makeTempDir, qemuCheck, qemuConvertToRaw, qemuImg, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { expectDataFlushedFirst } from './helpers/write-order.js';

const CLUSTER = 65536;
const FLUSH_DELAY_MS = 2500;

describe.skipIf(skipWithoutQemu('qcow2 persist'))('qcow2: pending L2 entries are persisted without stopping allocating writes', () => {
  it('writes into new clusters finish while the persist\'s fdatasync is held; ordering, a crash copy and the result are sound', { timeout: 60_000 }, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '64M']);
    const logPath = join(dir, 'writes.log');
    const image = await openImage(path, {
      format: 'qcow2',
      idleCleanSeconds: 0,
      filters: [{ name: 'log-writes', log: logPath }, { name: 'delay', flush: String(FLUSH_DELAY_MS) }],
    });
    const model = Buffer.alloc(64 * 1024 * 1024);
    const write = async (cluster: number, seed: number) => {
      const data = seededBytes(seed, 4096);
      await image.write(cluster * CLUSTER + 512, data);
      data.copy(model, cluster * CLUSTER + 512);
    };
    // The first write allocates the L2 table (flushed before the L1 entry): done before the clock starts.
    for (let i = 0; i < 16; i++) await write(2 * i, i + 1);
    const flushed = image.flush(); // its fdatasync waits FLUSH_DELAY_MS in the delay filter
    await sleep(200);
    const started = performance.now();
    for (let i = 0; i < 16; i++) await write(2 * i + 1, 100 + i);
    const took = performance.now() - started;
    expect(took, 'sixteen allocating writes took longer than half the held flush: they waited for it').toBeLessThan(FLUSH_DELAY_MS / 2);
    // A crash now: the file as it is, page cache included.
    const crashed = join(dir, 'crashed.qcow2');
    await copyFile(path, crashed);
    await flushed;
    await image.close();

    const log = parseWriteLog(await readFile(logPath));
    const reopened = await openImage(path, { format: 'qcow2', readOnly: true });
    for (let cluster = 0; cluster < 32; cluster++) {
      const [run] = await reopened.map(cluster * CLUSTER, CLUSTER);
      expect(run!.data, `cluster ${cluster} holds data`).toBe(true);
      expectDataFlushedFirst(log, run!.hostOffset!, run!.hostOffset! + 512);
    }
    await reopened.close();

    const crashCheck = await qemuCheck(crashed, 'qcow2');
    expect(crashCheck.stdout, 'the crash copy').not.toMatch(/ERROR|corrupt/i);
    expect([0, 3]).toContain(crashCheck.code); // clean, or leaked clusters only
    const check = await qemuCheck(path, 'qcow2');
    expect(check.code, check.stdout).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(model)).toBe(true);
  });
});
