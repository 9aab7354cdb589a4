/**
 * One writer per image: while an image is open read-write (a mount, a library
 * open), another read-write open, a second mount, `check -r` and
 * `create --force` over it are refused with one line and nothing is written;
 * read-only access stays possible, and the lock goes away with its holder,
 * even when the holder is killed.
 */
import { readFile } from 'node:fs/promises';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { openImage } from '../../src/index.js';
import { qemuImg, skipWithoutQemu } from '../helpers/qemu.js';
import { daemonPid, imgmount, isAlive, MountLab, skipWithoutFuse, waitFor } from './fuse-helpers.js';

describe.skipIf(skipWithoutQemu('one read-write open per image (library)'))('one read-write open per image (library)', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('a second read-write open fails with EBUSY; read-only opens still work; close releases it', async () => {
    const path = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', path, '4M']);
    const writer = await openImage(path);
    await expect(openImage(path)).rejects.toMatchObject({ errno: 16, message: expect.stringMatching(/already open for writing/) });
    const reader = await openImage(path, { readOnly: true });
    await reader.close();
    await writer.close();
    const again = await openImage(path);
    await again.close();
  });
});

describe.skipIf(skipWithoutFuse('one writer per image (mounts)'))('one writer per image (mounts)', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('a second mount, check -r and create --force are refused while mounted; a read-only mount is not', async () => {
    const path = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', path, '4M']);
    await lab.mount([path], await lab.mountpoint('first'));
    const before = await readFile(path);

    const second = await imgmount([path, await lab.mountpoint('second')]);
    expect(second.code).not.toBe(0);
    expect(second.stderr).toMatch(/already open for writing/);
    expect(second.stderr.trim().split('\n')).toHaveLength(1);

    const repair = await imgmount(['check', '-r', path]);
    expect(repair.code).toBe(1);
    expect(repair.stderr).toMatch(/already open for writing/);

    const overwrite = await imgmount(['create', '-f', 'qed', '--force', path, '8M']);
    expect(overwrite.code).not.toBe(0);
    expect(overwrite.stderr).toMatch(/already open for writing/);
    expect((await readFile(path)).equals(before)).toBe(true);

    await lab.mount(['-r', path], await lab.mountpoint('readonly'));
  });

  test('the lock goes away with a killed daemon: the next read-write mount works', async () => {
    const path = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', path, '4M']);
    const { pid } = await lab.mount([path], await lab.mountpoint('first'));
    process.kill(pid, 'SIGKILL');
    await waitFor('the daemon to die', () => !isAlive(pid));
    const { log } = await lab.mount([path], await lab.mountpoint('second'));
    expect(await daemonPid(log)).toBeGreaterThan(0);
  });
});
