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
import { qemuCheck, qemuConvertToRaw, qemuImg, qemuIo } from '../helpers/qemu.js';
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
});
