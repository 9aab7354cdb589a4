/**
 * Requests interrupted by signals: readers and writers killed in the middle of
 * their I/O (the kernel then sends FUSE_INTERRUPT for requests still pending,
 * and forgets their replies). The daemon keeps serving, every byte afterwards
 * is right, and the unmount is clean.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, qemuConvertToRaw, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';
import { imgmount, isAlive, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('interrupted requests'))('interrupted requests', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('readers and writers killed mid-request: the daemon keeps serving, the data is right, the unmount is clean', { timeout: 60_000 }, async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', image, '64M']);
    await qemuIo(image, ['write -P 0x61 0 64M']);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount([image], mnt);
    const file = join(mnt, 'disk.raw');
    for (let round = 0; round < 12; round++) {
      const writer = round % 3 === 2;
      const args = writer
        ? ['if=/dev/zero', `of=${file}`, 'bs=1M', 'count=8', `seek=${48 + (round % 8)}`, 'oflag=direct', 'conv=notrunc', 'status=none']
        : ['if=' + file, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none'];
      const child = spawn('dd', args, { stdio: 'ignore' });
      const exited = new Promise((resolve) => child.once('exit', resolve));
      await delay(5 + (round % 4) * 7);
      child.kill(round % 2 === 0 ? 'SIGINT' : 'SIGKILL');
      await exited;
    }
    expect(isAlive(pid)).toBe(true);
    // Writers wrote zeros somewhere in [48M, 64M); the first 48 MiB are untouched and read right.
    const head = (await readFile(file)).subarray(0, 48 * MiB);
    expect(head.equals(Buffer.alloc(48 * MiB, 0x61))).toBe(true);
    const seen = await readFile(file);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await qemuConvertToRaw(image, lab.dir)).equals(seen)).toBe(true);
    expect((await qemuCheck(image)).code).toBe(0);
    expect(await readFile(log, 'utf8')).not.toMatch(/unexpected error/);
  });

  // The delay filter holds every flush of the image file for a second, so the signal surely
  // comes while the daemon has the FSYNC: the kernel then sends FUSE_INTERRUPT for it. (Direct
  // and readahead reads are asynchronous in the kernel and are never interrupted; FSYNC waits
  // interruptibly.)
  test('a signal while the daemon holds an fsync: FUSE_INTERRUPT arrives, the fsync still completes, the data is there, the daemon keeps serving', { timeout: 60_000 }, async () => {
    const model = seededBytes(31, 4 * MiB);
    const image = await lab.file('disk.img', model);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount(['-d', '-f', 'raw', '--filter', 'delay:flush=1000', image], mnt);
    const file = join(mnt, 'disk.raw');
    /** dd writes one 4 KiB block of `fill` at `block`, then fsyncs (conv=fsync). */
    const writeBlock = (block: number, fill: number) => {
      const child = spawn('dd', [`of=${file}`, 'bs=4096', 'count=1', `seek=${block}`, 'conv=notrunc,fsync', 'status=none'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      child.stdin.end(Buffer.alloc(4096, fill));
      model.fill(fill, block * 4096, (block + 1) * 4096);
      const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) =>
        child.once('close', (code, signal) => resolve({ code, signal, stderr })),
      );
      return { child, done };
    };

    // dd handles SIGUSR1 (it prints its statistics) and goes on: its fsync is answered when the flush is done.
    const patient = writeBlock(100, 0x11);
    await delay(400);
    patient.child.kill('SIGUSR1');
    const answered = await patient.done;
    expect(answered.code, answered.stderr).toBe(0);

    // SIGKILL: the writer dies once the daemon has answered; the write it made before is kept.
    const killed = writeBlock(200, 0x22);
    await delay(400);
    killed.child.kill('SIGKILL');
    expect((await killed.done).signal).toBe('SIGKILL');

    expect((await writeBlock(300, 0x33).done).code).toBe(0);
    expect(isAlive(pid)).toBe(true);
    expect((await readFile(file)).equals(model)).toBe(true);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await readFile(image)).equals(model)).toBe(true);
    const text = await readFile(log, 'utf8');
    // One for each held FSYNC (at least: the dying writer's FLUSH at close may be interrupted too).
    expect(text.match(/interrupt of request \d+: in flight/g)?.length).toBeGreaterThanOrEqual(2);
    expect(text).not.toMatch(/unexpected error/);
  });
});
