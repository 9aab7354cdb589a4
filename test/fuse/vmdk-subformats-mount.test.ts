/**
 * VMDK images of several extent files through a real read-write mount: dd
 * writes across the 2 GiB and 4 GiB extent boundaries of a 5 GiB
 * twoGbMaxExtentSparse image (made by imgmount create), and mkfs.ext4 over a
 * 3 GiB twoGbMaxExtentFlat one; after unmount qemu-img check is clean and
 * qemu-img compare equals a raw model (sparse host files: no disk cost).
 */
import { open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { createImage, defaultFormats } from '../../src/index.js';
import { run } from '../helpers/qemu.js';
import { seededRandom } from '../helpers/random.js';
import { imgmount, MountLab, skipWithoutFuse } from './fuse-helpers.js';

const K = 1024;
const G = 1024 * 1024 * K;

describe.skipIf(skipWithoutFuse('vmdk descriptor-file images through the FUSE mount', ['mkfs.ext4', 'e2fsck']))('vmdk descriptor-file images through the FUSE mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('twoGbMaxExtentSparse, 5 GiB: dd writes across both extent boundaries read back through the mount; unmounted, qemu-img check is clean and compare equals the model', { timeout: 120_000 }, async () => {
    const image = lab.path('disk.vmdk');
    const size = 5 * G;
    await createImage(image, 'vmdk', { formats: defaultFormats, size, options: { subformat: 'twoGbMaxExtentSparse' } });
    const model = lab.path('model.raw');
    await writeFile(model, '');
    await truncate(model, size);
    const mnt = await lab.mountpoint();
    const { result } = await lab.mount([image], mnt);
    expect(result.stderr).not.toMatch(/read-only/);
    const file = join(mnt, 'disk.raw');
    expect((await stat(file)).size).toBe(size);
    const random = seededRandom(0x2b0d);
    const written: Array<[number, Buffer]> = [];
    for (const [n, edge] of [2 * G, 4 * G, 2 * G + 4096, 4 * G - 70 * K].entries()) {
      const data = Buffer.alloc(random.int(1, 200) * K + random.int(0, 511));
      random.fill(data);
      const offset = edge - random.int(0, data.length);
      const blob = lab.path(`blob-${n}`);
      await writeFile(blob, data);
      const dd = await run('dd', [`if=${blob}`, `of=${file}`, 'bs=64k', `seek=${offset}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none']);
      expect(dd.code, dd.stderr).toBe(0);
      const handle = await open(model, 'r+');
      await handle.write(data, 0, data.length, offset);
      await handle.close();
      written.push([offset, data]);
    }
    const mounted = await open(file, 'r');
    try {
      for (const [offset, data] of written) {
        const back = Buffer.alloc(data.length);
        await mounted.read(back, 0, back.length, offset);
        const expected = Buffer.alloc(data.length);
        const m = await open(model, 'r');
        await m.read(expected, 0, expected.length, offset);
        await m.close();
        expect(back.equals(expected), `read back at ${offset}`).toBe(true);
      }
    } finally {
      await mounted.close();
    }
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    const check = await run('qemu-img', ['check', '-f', 'vmdk', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const compare = await run('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', image, model]);
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  });

  test('twoGbMaxExtentFlat, 3 GiB: mkfs.ext4 through the mount spans both extent files; e2fsck of the unmounted image (qemu-img convert) is clean', { timeout: 180_000 }, async () => {
    const image = lab.path('flat.vmdk');
    await createImage(image, 'vmdk', { formats: defaultFormats, size: 3 * G, options: { subformat: 'twoGbMaxExtentFlat' } });
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const file = join(mnt, 'flat.raw');
    const mkfs = await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', file]);
    expect(mkfs.code, mkfs.stderr).toBe(0);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    // the second extent file holds the file system's later block groups
    expect((await stat(lab.path('flat-f002.vmdk'))).blocks).toBeGreaterThan(0);
    const check = await run('qemu-img', ['check', '-f', 'vmdk', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const raw = lab.path('flat.raw');
    const convert = await run('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', image, raw]);
    expect(convert.code, convert.stderr).toBe(0);
    const fsck = await run('e2fsck', ['-fn', raw]);
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    expect((await readFile(lab.path('flat.vmdk'), 'utf8')).includes('createType="twoGbMaxExtentFlat"')).toBe(true);
  });
});
