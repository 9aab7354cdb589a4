/**
 * kill -9 of the daemon while a writer does fdatasync'd writes through a
 * read-write qcow2 mount (plain, over a raw backing file, with lazy
 * refcounts): afterwards `qemu-img check` finds no corruption (leaks are
 * allowed: qcow2 without lazy refcounts has no mark of an unclean close), and
 * every write whose fdatasync returned is in the image. With lazy refcounts
 * the dirty bit stays set (refcounts may lag behind, which qemu-img check
 * reports as errors only while that bit is set), and the next read-write
 * mount rebuilds the refcounts, says so, and leaves the image clean.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { spawn } from 'node:child_process';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuConvertToRaw, qemuImg, run } from '../helpers/qemu.js';
import { seededRandom } from '../helpers/random.js';
import { imgmount, isAlive, MiB, MountLab, skipWithoutFuse, waitFor } from './fuse-helpers.js';

const KiB = 1024;

const SLOTS = 120;
const SLOT_STRIDE = 67 * KiB;
const WRITE_BYTES = 37 * KiB;

/** The writer: writes slot after slot (slot i holds byte i+1), fdatasyncs each, then records it as acknowledged. */
const WRITER = `
const fs = require('node:fs');
const [file, ack, order] = process.argv.slice(1);
const fd = fs.openSync(file, 'r+');
for (const slot of order.split(',').map(Number)) {
  const offset = slot * ${SLOT_STRIDE} + (slot % 7) * 512 + 3;
  fs.writeSync(fd, Buffer.alloc(${WRITE_BYTES}, slot + 1), 0, ${WRITE_BYTES}, offset);
  fs.fdatasyncSync(fd);
  fs.appendFileSync(ack, slot + '\\n');
}
`;

function slotOffset(slot: number): number {
  return slot * SLOT_STRIDE + (slot % 7) * 512 + 3;
}

interface Case {
  name: string;
  options: string;
  backing: boolean;
  lazy: boolean;
}

const CASES: Case[] = [
  { name: 'plain', options: 'compat=1.1', backing: false, lazy: false },
  { name: 'over a raw backing file', options: 'compat=1.1', backing: true, lazy: false },
  { name: 'lazy refcounts, 4 KiB clusters', options: 'compat=1.1,lazy_refcounts=on,cluster_size=4096', backing: false, lazy: true },
];

describe.skipIf(skipWithoutFuse('qcow2 and kill -9'))('qcow2 and kill -9 of the daemon during fsync\'d writes', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  for (const [index, shape] of CASES.entries()) {
    test(`${shape.name}: no acknowledged write is lost and qemu-img check finds no corruption`, { timeout: 120_000 }, async () => {
      const size = 8 * MiB + 512;
      const image = lab.path('disk.qcow2');
      const expected = Buffer.alloc(size);
      if (shape.backing) {
        const base = lab.path('base.raw');
        const content = Buffer.alloc(size - 3 * MiB, 0xbb);
        await writeFile(base, content);
        content.copy(expected);
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', shape.options, '-b', base, '-F', 'raw', image, String(size)]);
      } else {
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', shape.options, image, String(size)]);
      }
      const random = seededRandom(0xc4a5 + index);
      const mnt = await lab.mountpoint();
      for (let cycle = 0; cycle < 3; cycle++) {
        const order = Array.from({ length: SLOTS }, (_, i) => i);
        for (let i = order.length - 1; i > 0; i--) {
          const j = random.int(0, i);
          [order[i], order[j]] = [order[j]!, order[i]!];
        }
        const ack = lab.path(`ack-${cycle}`);
        await writeFile(ack, '');
        const { pid } = await lab.mount([image], mnt);
        const writer = spawn(process.execPath, ['-e', WRITER, join(mnt, 'disk.raw'), ack, order.join(',')], { stdio: 'ignore' });
        const writerDone = new Promise<void>((resolve) => writer.on('exit', () => resolve()));
        // Kill once some writes were acknowledged, at a different moment each cycle.
        await waitFor('the first acknowledged writes', async () => (await readFile(ack, 'utf8')).split('\n').length > 3 + cycle * 5, 30_000);
        await delay(random.int(0, 40));
        process.kill(pid, 'SIGKILL');
        await waitFor('the killed daemon to be gone', () => !isAlive(pid));
        await writerDone;
        expect((await imgmount(['unmount', mnt])).code).toBe(0);

        const acknowledged = (await readFile(ack, 'utf8')).split('\n').filter(Boolean).map(Number);
        expect(acknowledged.length).toBeGreaterThan(0);
        const check = await run('qemu-img', ['check', image]);
        if (shape.lazy && check.code === 2) {
          // Lazy refcounts may lag behind the L2 entries: allowed only while the dirty bit says so.
          const info = await run('qemu-img', ['info', '--output=json', image]);
          expect((JSON.parse(info.stdout) as { 'dirty-flag'?: boolean })['dirty-flag'], `cycle ${cycle}: corruption without the dirty bit: ${check.stdout}`).toBe(true);
        } else {
          // 0: clean, 3: leaks only. 2 (corruption) or 1 (cannot check) fail.
          expect([0, 3], `cycle ${cycle}: ${check.stdout}${check.stderr}`).toContain(check.code);
        }
        if (shape.lazy) {
          // The dirty bit is still set: a read-write mount rebuilds the refcounts first and says so.
          const { result } = await lab.mount([image], mnt);
          expect(result.stderr).toMatch(/not closed cleanly \(dirty bit set, lazy refcounts\); refcounts checked and repaired/);
          expect((await imgmount(['unmount', mnt])).code).toBe(0);
          const clean = await run('qemu-img', ['check', image]);
          expect(clean.code, clean.stdout + clean.stderr).toBe(0);
        } else if (check.code === 3) {
          const repair = await run('qemu-img', ['check', '-r', 'all', image]);
          expect(repair.code, repair.stdout + repair.stderr).toBe(0);
        }
        const raw = await qemuConvertToRaw(image, lab.dir, 'qcow2');
        for (const slot of acknowledged) {
          expected.fill(slot + 1, slotOffset(slot), slotOffset(slot) + WRITE_BYTES);
          const at = slotOffset(slot);
          expect(raw.subarray(at, at + WRITE_BYTES).equals(expected.subarray(at, at + WRITE_BYTES)), `cycle ${cycle}: slot ${slot} (acknowledged) is in the image`).toBe(true);
        }
        // Whatever else the image holds now is the next cycle's starting point.
        raw.copy(expected);
      }
    });
  }
});
