/**
 * The main job end to end: losetup on the mounted raw file, mkfs.ext4, mount it,
 * write files, unmount everything, then mount the image again: e2fsck -fn is clean
 * and the files are intact; qemu-img check is clean and need-check clear.
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, qemuImg, run, seededBytes } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, needCheck, skipWithoutFuse } from './fuse-helpers.js';

async function succeeds(command: string, args: string[]): Promise<void> {
  const result = await run(command, args);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}: ${result.stdout}${result.stderr}`);
}

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

describe.skipIf(skipWithoutFuse('ext4 on a loop device over the mount', ['losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount']))(
  'ext4 on a loop device over the mount',
  () => {
    let lab: MountLab;
    beforeEach(async () => {
      lab = await MountLab.create();
    });
    afterEach(async () => {
      await lab.cleanup();
    });

    test('mkfs.ext4, write files, unmount all, mount again: e2fsck -fn is clean and the files are intact', async () => {
      const image = lab.path('disk.qed');
      await qemuImg(['create', '-f', 'qed', image, '256M']);
      const mnt = await lab.mountpoint();
      await lab.mount([image], mnt);
      const raw = join(mnt, 'disk.raw');

      const loop = await lab.loop(raw);
      await succeeds('mkfs.ext4', ['-q', '-F', '-L', 'imgmount-test', loop]);
      const fs = lab.path('fs');
      await mkdir(fs);
      await succeeds('mount', [loop, fs]);
      lab.track(fs);
      const big = seededBytes(42, 5 * MiB + 123);
      await writeFile(join(fs, 'big.bin'), big);
      await mkdir(join(fs, 'dir'));
      for (let index = 0; index < 50; index++) await writeFile(join(fs, 'dir', `file-${index}.txt`), `file ${index}\n`.repeat(index + 1));
      await succeeds('umount', [fs]);
      await lab.unloop(loop);
      const unmounted = await imgmount(['unmount', mnt]);
      expect(unmounted.stderr).toBe('');
      expect(unmounted.code).toBe(0);

      expect(await needCheck(image)).toBe(false);
      const check = await qemuCheck(image);
      expect(check.stdout).toContain('No errors were found');
      expect(check.code).toBe(0);

      await lab.mount([image], mnt);
      const fsck = await run('e2fsck', ['-fn', raw]);
      expect(fsck.stdout + fsck.stderr).toMatch(/imgmount-test: \d+\/\d+ files/);
      expect(fsck.code).toBe(0);
      const readOnlyLoop = await lab.loop(raw, true);
      await succeeds('mount', ['-o', 'ro', readOnlyLoop, fs]);
      expect(sha256(await readFile(join(fs, 'big.bin')))).toBe(sha256(big));
      for (let index = 0; index < 50; index++) {
        expect(await readFile(join(fs, 'dir', `file-${index}.txt`), 'utf8')).toBe(`file ${index}\n`.repeat(index + 1));
      }
      await succeeds('umount', [fs]);
      await lab.unloop(readOnlyLoop);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
      expect(await needCheck(image)).toBe(false);
    }, 60_000);
  },
);
