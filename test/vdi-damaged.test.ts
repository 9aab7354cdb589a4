/**
 * Seeded damage to qemu-made VDI images (header fields set to boundary and
 * random values, block map entries pointed anywhere, byte flips, truncation):
 * whatever the damage, opening, reading, mapping, checking and writing either
 * work or fail with one BlockError naming the problem; never another
 * exception, a hang or a read outside the file. Where the damage leaves the
 * image valid for both, a read that succeeds gives qemu-img convert's bytes,
 * and a write that succeeds reads back.
 */
import { copyFile, open as openFile, readFile, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, checkImage, openImage } from '../src/index.js';
import { makeTempDir, qemuImg, qemuIo, run, skipWithoutQemu } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const MiB = 1024 * 1024;
/** Header fields (offset, width) of the VDI 1.1 layout. */
const FIELDS: Array<[name: string, offset: number, width: 4 | 8]> = [
  ['signature', 0x40, 4], ['version', 0x44, 4], ['header_size', 0x48, 4], ['image_type', 0x4c, 4], ['image_flags', 0x50, 4],
  ['offset_bmap', 0x154, 4], ['offset_data', 0x158, 4], ['sector_size', 0x168, 4], ['disk_size', 0x170, 8], ['block_size', 0x178, 4],
  ['block_extra', 0x17c, 4], ['blocks_in_image', 0x180, 4], ['blocks_allocated', 0x184, 4], ['uuid_link', 0x1a8, 4], ['uuid_parent', 0x1b8, 4],
];

/** Runs `body`; a BlockError is an allowed answer (returned), anything else fails the test. */
async function allowed<T>(what: string, body: () => Promise<T>): Promise<T | BlockError> {
  try {
    return await body();
  } catch (error) {
    if (error instanceof BlockError && !error.message.includes('\n')) return error;
    throw new Error(`${what}: not a one-line BlockError: ${(error as Error).stack ?? String(error)}`);
  }
}

describe.skipIf(skipWithoutQemu('vdi damaged'))('vdi: seeded damage', () => {
  it('200 damaged images: every operation works or fails with one BlockError; successful reads are qemu\'s bytes when qemu opens the image too', { timeout: 300_000 }, async () => {
    const dir = await makeTempDir();
    const originals: string[] = [];
    for (const [name, options] of [['dynamic', []], ['static', ['-o', 'static=on']]] as const) {
      const path = join(dir, `${name}.vdi`);
      await qemuImg(['create', '-q', '-f', 'vdi', ...options, path, String(4 * MiB + 512)]);
      await qemuIo(path, ['write -P 0x11 0 5000', `write -P 0x22 ${2 * MiB - 7} 100`, `write -P 0x33 ${4 * MiB} 512`], 'vdi');
      originals.push(path);
    }
    const random = seededRandom(0x7d1);
    let opened = 0;
    let compared = 0;
    for (let n = 0; n < 200; n++) {
      const original = originals[n % 2]!;
      const path = join(dir, `case-${n}.vdi`);
      await copyFile(original, path);
      const size = (await stat(path)).size;
      const kind = random.int(0, 3);
      let what: string;
      const handle = await openFile(path, 'r+');
      try {
        if (kind === 0) {
          const [name, offset, width] = FIELDS[random.int(0, FIELDS.length - 1)]!;
          const choices = [0, 1, 511, 512, 513, 0x3fffffff, 0x40000000, 0xffffffff, 0xfffffffe, MiB, 2 * MiB, random.int(0, 0xffffffff)];
          const value = choices[random.int(0, choices.length - 1)]!;
          const bytes = Buffer.alloc(width);
          if (width === 8) bytes.writeBigUInt64LE(random.int(0, 1) ? BigInt(value) : BigInt(value) << 32n);
          else bytes.writeUInt32LE(value);
          await handle.write(bytes, 0, width, offset);
          what = `${name} = ${width === 8 ? bytes.readBigUInt64LE(0) : value}`;
        } else if (kind === 1) {
          const entry = random.int(0, 4);
          const choices = [0, 1, 2, 3, 4, 5, 100, 0x3fffffff, 0xfffffffd, 0xfffffffe, 0xffffffff, random.int(0, 0xffffffff)];
          const value = choices[random.int(0, choices.length - 1)]!;
          const bytes = Buffer.alloc(4);
          bytes.writeUInt32LE(value);
          await handle.write(bytes, 0, 4, 0x200 + entry * 4);
          what = `block map entry ${entry} = ${value}`;
        } else if (kind === 2) {
          const flips: string[] = [];
          for (let i = random.int(1, 8); i > 0; i--) {
            const at = random.int(0, 1023);
            const byte = Buffer.alloc(1);
            await handle.read(byte, 0, 1, at);
            byte[0] = byte[0]! ^ (1 << random.int(0, 7));
            await handle.write(byte, 0, 1, at);
            flips.push(String(at));
          }
          what = `bits flipped at ${flips.join(',')}`;
        } else {
          const length = random.int(0, 2) === 0 ? random.int(0, 2048) : random.int(0, size);
          await handle.truncate(length);
          what = `truncated to ${length}`;
        }
      } finally {
        await handle.close();
      }
      what = `case ${n} (${n % 2 ? 'static' : 'dynamic'}): ${what}`;

      const before = await readFile(path);
      const image = await allowed(`${what}: open`, () => openImage(path, { readOnly: true, format: 'vdi' }));
      await allowed(`${what}: check`, () => checkImage(path, { format: 'vdi' }));
      if (image instanceof BlockError) {
        expect(image.message, what).toContain('VDI');
        continue;
      }
      opened += 1;
      const qemuRaw = join(dir, `case-${n}.raw`);
      const qemuReads = (await run('qemu-img', ['convert', '-f', 'vdi', '-O', 'raw', path, qemuRaw])).code === 0;
      const theirs = qemuReads ? await readFile(qemuRaw) : undefined;
      try {
        await allowed(`${what}: map`, () => image.map());
        for (let offset = 0; offset < image.length; offset += MiB) {
          const piece = Buffer.alloc(Math.min(MiB, image.length - offset), 0xee);
          const result = await allowed(`${what}: read at ${offset}`, () => image.read(offset, piece));
          if (!(result instanceof BlockError) && theirs && theirs.length === image.length) {
            expect(piece.equals(theirs.subarray(offset, offset + piece.length)), `${what}: read at ${offset} differs from qemu-img convert`).toBe(true);
            compared += 1;
          }
        }
      } finally {
        await image.close();
      }
      expect((await readFile(path)).equals(before), `${what}: a read-only open changed the file`).toBe(true);

      const rw = await allowed(`${what}: read-write open`, () => openImage(path, { format: 'vdi' }));
      if (rw instanceof BlockError) continue;
      try {
        if (rw.readOnly) continue;
        const offset = random.int(0, Math.max(0, rw.length - 600));
        const data = Buffer.alloc(Math.min(600, rw.length - offset), 0xab);
        const written = await allowed(`${what}: write at ${offset}`, () => rw.write(offset, data));
        if (!(written instanceof BlockError)) {
          const back = Buffer.alloc(data.length);
          const read = await allowed(`${what}: read back at ${offset}`, () => rw.read(offset, back));
          if (!(read instanceof BlockError)) expect(back.equals(data), `${what}: a write at ${offset} did not read back`).toBe(true);
        }
      } finally {
        await rw.close();
      }
      await truncate(qemuRaw, 0).catch(() => undefined);
    }
    // The damage must leave enough images open to mean something.
    expect(opened).toBeGreaterThan(40);
    expect(compared).toBeGreaterThan(100);
  });
});
