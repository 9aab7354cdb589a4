/**
 * Optional abilities of formats, said once and by name: a format without
 * zero/discard stays writable and answers those requests with EOPNOTSUPP; a
 * format that cannot write opens read-only with a notice (EROFS for writes);
 * a format without internal snapshots refuses `snapshot` by name.
 */
import { join } from 'node:path';
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../src/index.js';
import { makeTempDir, qemuImg, skipWithoutQemu } from './helpers/qemu.js';

const { EOPNOTSUPP, EROFS } = constants.errno;

describe.skipIf(skipWithoutQemu('optional abilities of formats'))('optional abilities of formats', () => {
  it.each(['qed', 'raw'])('%s: zero and discard answer EOPNOTSUPP naming the format, and the image stays writable', async (format) => {
    const dir = await makeTempDir();
    const path = join(dir, `disk.${format === 'raw' ? 'img' : format}`);
    await createImage(path, format, { size: 1 << 20 });
    const image = await openImage(path, { format });
    try {
      for (const request of [image.zero(4096, 4096), image.discard(0, 65536)]) {
        await expect(request).rejects.toMatchObject({ errno: EOPNOTSUPP, message: expect.stringMatching(new RegExp(`${format} images do not support (zero|discard) requests`)) });
      }
      await image.write(4096, Buffer.alloc(4096, 0x42));
      const back = Buffer.alloc(4096);
      await image.read(4096, back);
      expect(back.equals(Buffer.alloc(4096, 0x42))).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('qcow2 (no writing yet): zero, discard and write answer EROFS on an image asked for read-write', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '1M']);
    const notices: string[] = [];
    const image = await openImage(path, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(notices).toEqual([`${path}: opened read-only: writing qcow2 images is not supported yet`]);
      for (const request of [image.zero(0, 512), image.discard(0, 512), image.write(0, Buffer.alloc(512))]) {
        await expect(request).rejects.toMatchObject({ errno: EROFS });
      }
    } finally {
      await image.close();
    }
  });

  it('a snapshot of a QED or raw image is refused by name', async () => {
    const dir = await makeTempDir();
    for (const format of ['qed', 'raw']) {
      const path = join(dir, `disk.${format === 'raw' ? 'img' : format}`);
      await createImage(path, format, { size: 1 << 20 });
      await expect(openImage(path, { snapshot: 'one' })).rejects.toThrow(new RegExp(`${format} images have no internal snapshots; -s/--snapshot cannot be used`));
    }
  });
});
