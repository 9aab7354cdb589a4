/**
 * O_DIRECT and buffered opens of one mounted file stay coherent. An O_DIRECT
 * open is answered with FOPEN_DIRECT_IO (and parallel direct writes) while
 * buffered opens keep the kernel's page cache (FOPEN_KEEP_CACHE): a direct
 * write must never leave a buffered reader with stale cached pages, and a
 * buffered write must be what a direct read sees. Several O_DIRECT writers
 * at once (the parallel path) land every block.
 */
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuConvertToRaw, qemuImg, run, seededBytes } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('O_DIRECT and buffered opens'))('O_DIRECT and buffered opens of a mounted image', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  async function dd(args: string[]): Promise<void> {
    const result = await run('dd', [...args, 'status=none']);
    expect(result.code, result.stderr).toBe(0);
  }

  for (const format of ['qed', 'qcow2'] as const) {
    test(`${format}: cached pages never go stale under direct writes, direct reads see buffered writes, parallel direct writers all land`, async () => {
      const image = lab.path(`disk.${format}`);
      await qemuImg(['create', '-q', '-f', format, image, '8M']);
      const mnt = await lab.mountpoint();
      await lab.mount([image], mnt);
      const file = join(mnt, 'disk.raw');
      const expected = Buffer.alloc(8 * MiB);

      // A buffered read caches the first 1 MiB; a direct write then changes 64 KiB inside it.
      expect((await readFile(file)).subarray(0, MiB).equals(expected.subarray(0, MiB))).toBe(true);
      const direct = seededBytes(1, 64 * 1024);
      await writeFile(lab.path('direct.bin'), direct);
      await dd([`if=${lab.path('direct.bin')}`, `of=${file}`, 'bs=64k', 'seek=3', 'oflag=direct', 'conv=notrunc']);
      direct.copy(expected, 3 * 64 * 1024);
      expect((await readFile(file)).equals(expected)).toBe(true);

      // A buffered write, then a direct read of the same range.
      const buffered = seededBytes(2, 8192);
      const handle = await open(file, 'r+');
      await handle.write(buffered, 0, buffered.length, 5 * MiB + 4096);
      await handle.close();
      buffered.copy(expected, 5 * MiB + 4096);
      await dd([`if=${file}`, `of=${lab.path('read-direct.bin')}`, 'bs=4k', `skip=${(5 * MiB) / 4096 + 1}`, 'count=2', 'iflag=direct']);
      expect((await readFile(lab.path('read-direct.bin'))).equals(buffered)).toBe(true);

      // Four direct writers at once, each its own 256 KiB stripes.
      await Promise.all(
        [0, 1, 2, 3].map(async (writer) => {
          const blob = seededBytes(10 + writer, 256 * 1024);
          await writeFile(lab.path(`w${writer}.bin`), blob);
          for (let stripe = writer; stripe < 16; stripe += 4) {
            await dd([`if=${lab.path(`w${writer}.bin`)}`, `of=${file}`, 'bs=256k', `seek=${stripe}`, 'oflag=direct', 'conv=notrunc']);
            blob.copy(expected, stripe * 256 * 1024);
          }
        }),
      );
      expect((await readFile(file)).equals(expected)).toBe(true);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
      expect((await run('qemu-img', ['check', image])).code).toBe(0);
      expect((await qemuConvertToRaw(image, lab.dir, format)).equals(expected)).toBe(true);
    });
  }
});
