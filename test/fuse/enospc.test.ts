/**
 * A full host file system: writes through the mount fail with ENOSPC, the
 * daemon stays up, what was written before is intact, and after unmount the
 * image has neither corruption nor leaked clusters, and need-check is clear.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuImg, run, seededBytes } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, needCheck, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('a full host file system'))('a full host file system', () => {
  let lab: MountLab;
  let store: string;
  beforeEach(async () => {
    lab = await MountLab.create();
    store = await lab.mountpoint('store');
    const mounted = await run('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', store]);
    if (mounted.code !== 0) throw new Error(`mount tmpfs: ${mounted.stderr}`);
    lab.track(store);
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('writes fail with ENOSPC, earlier data survives, the image stays consistent', async () => {
    const image = join(store, 'disk.qed');
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096,table_size=2', image, '64M']);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const first = seededBytes(7, 1 * MiB);
    const file = await open(join(mnt, 'disk.raw'), 'r+');
    await file.write(first, 0, first.length, 0);
    await file.sync();

    let failure: NodeJS.ErrnoException | undefined;
    try {
      const chunk = seededBytes(8, 1 * MiB);
      for (let i = 1; i < 16; i++) await file.write(chunk, 0, chunk.length, i * MiB);
      await file.sync();
    } catch (error) {
      failure = error as NodeJS.ErrnoException;
    }
    expect(failure?.code).toBe('ENOSPC');

    const readBack = Buffer.alloc(first.length);
    await file.read(readBack, 0, readBack.length, 0);
    expect(readBack.equals(first)).toBe(true);
    await file.close();

    const unmounted = await imgmount(['unmount', mnt]);
    expect(unmounted.code).toBe(0);
    expect(await needCheck(image)).toBe(false);
    // Exit 0: no corruption and no leak either (the failed allocations were cut back).
    const check = await run('qemu-img', ['check', image]);
    expect(check.stdout + check.stderr).toMatch(/No errors were found/);
    expect(check.code).toBe(0);
    const converted = join(lab.dir, 'out.raw');
    await qemuImg(['convert', '-O', 'raw', image, converted]);
    expect((await readFile(converted)).subarray(0, first.length).equals(first)).toBe(true);
  });
});
