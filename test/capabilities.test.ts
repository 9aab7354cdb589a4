/**
 * Optional abilities of formats, said once and by name: QED and raw zero and
 * discard ranges; a format without zero/discard stays writable and answers those
 * requests with EOPNOTSUPP; a
 * format that cannot write opens read-only with a notice (EROFS for writes);
 * a format without internal snapshots refuses `snapshot` by name.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { BlockImage, createImage, openImage, type FormatImage } from '../src/index.js';
import { makeTempDir, qemuImg, skipWithoutQemu } from './helpers/qemu.js';

const { EOPNOTSUPP, EROFS } = constants.errno;

describe.skipIf(skipWithoutQemu('optional abilities of formats'))('optional abilities of formats', () => {
  it.each(['qed', 'raw'])('%s: zero and discard make the range read as zeros, inside and across clusters; the rest is kept', async (format) => {
    const dir = await makeTempDir();
    const path = join(dir, `disk.${format === 'raw' ? 'img' : format}`);
    await createImage(path, format, { size: 1 << 20 });
    const image = await openImage(path, { format });
    try {
      await image.write(0, Buffer.alloc(1 << 20, 0x42));
      await image.zero(4096, 4096);
      await image.discard(60_000, 200_000);
      const expected = Buffer.alloc(1 << 20, 0x42);
      expected.fill(0, 4096, 8192);
      expected.fill(0, 60_000, 260_000);
      const back = Buffer.alloc(1 << 20);
      await image.read(0, back);
      expect(back.equals(expected)).toBe(true);
      await image.write(4096, Buffer.alloc(4096, 0x43));
      await image.read(4096, back.subarray(0, 4096));
      expect(back.subarray(0, 4096).equals(Buffer.alloc(4096, 0x43))).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('a format without zero/discard answers EOPNOTSUPP naming it, and stays writable', async () => {
    const bytes = Buffer.alloc(65536);
    const file = { path: 'mem', readOnly: false, read: async () => undefined, write: async () => undefined, flush: async () => undefined, size: async () => bytes.length, allocatedSize: async () => 0, truncate: async () => undefined, close: async () => undefined };
    const format: FormatImage = {
      virtualSize: bytes.length,
      backing: undefined,
      map: async (offset, length) => [{ kind: 'data', guestOffset: offset, length, hostOffset: offset }],
      write: async (offset, data) => void data.copy(bytes, offset),
      flush: async () => undefined,
      close: async () => undefined,
      info: () => ({}),
    };
    const image = new BlockImage({ path: 'mem', format: 'memory', file, image: format });
    for (const request of [image.zero(4096, 4096), image.discard(0, 65536)]) {
      await expect(request).rejects.toMatchObject({ errno: EOPNOTSUPP, message: expect.stringMatching(/memory images do not support (zero|discard) requests/) });
    }
    await image.write(0, Buffer.alloc(10, 1));
    expect(bytes.subarray(0, 10).equals(Buffer.alloc(10, 1))).toBe(true);
  });

  it('qcow2: write, zero and discard work; and on an image with an external data file too (qemu-img convert reads them back); one marked corrupt stays read-only with a notice and EROFS', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '1M']);
    const notices: string[] = [];
    const image = await openImage(path, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(notices).toEqual([]);
      expect(image.readOnly).toBe(false);
      await image.write(0, Buffer.alloc(4096, 0xaa));
      await image.zero(512, 512);
      await image.discard(2048, 1024);
      const back = Buffer.alloc(4096);
      await image.read(0, back);
      const expected = Buffer.alloc(4096, 0xaa);
      expected.fill(0, 512, 1024);
      expected.fill(0, 2048, 3072);
      expect(back.equals(expected)).toBe(true);
    } finally {
      await image.close();
    }

    const extended = join(dir, 'with-data-file.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=with-data-file.data', extended, '1M'], { cwd: dir });
    notices.length = 0;
    const withDataFile = await openImage(extended, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(notices).toEqual([]);
      expect(withDataFile.readOnly).toBe(false);
      await withDataFile.write(0, Buffer.alloc(4096, 0xbb));
      await withDataFile.zero(512, 512);
      await withDataFile.discard(2048, 1024);
    } finally {
      await withDataFile.close();
    }
    const expected = Buffer.alloc(4096, 0xbb);
    expected.fill(0, 512, 1024);
    expected.fill(0, 2048, 3072);
    const out = join(dir, 'with-data-file.raw');
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', extended, out], { cwd: dir });
    expect((await readFile(out)).subarray(0, 4096).equals(expected)).toBe(true);

    // One qcow2 image it will not write: marked corrupt (incompatible feature bit 1).
    const corrupt = join(dir, 'corrupt.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', corrupt, '1M']);
    const bytes = await readFile(corrupt);
    bytes.writeBigUInt64BE(bytes.readBigUInt64BE(72) | 2n, 72);
    await writeFile(corrupt, bytes);
    notices.length = 0;
    const readOnly = await openImage(corrupt, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(readOnly.readOnly).toBe(true);
      expect(notices.join('\n')).toMatch(/marked corrupt/);
      for (const request of [readOnly.zero(0, 512), readOnly.discard(0, 512), readOnly.write(0, Buffer.alloc(512))]) {
        await expect(request).rejects.toMatchObject({ errno: EROFS });
      }
    } finally {
      await readOnly.close();
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
