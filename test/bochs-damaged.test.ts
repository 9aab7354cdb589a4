/**
 * Damaged Bochs images, from an image bximage made: each header field qemu's
 * block/bochs.c checks (CVE-2014-0143: the catalog size, and the extent size
 * bounds) is refused at open naming the field, its value and the allowed
 * range, and qemu-img refuses the same images; a catalog entry pointing past
 * the end of the file, or a bitmap marking sectors past it, fails the reads
 * of that extent only; seeded random damage of the header, catalog and
 * bitmaps never crashes, hangs or reads out of bounds, and what both read
 * agrees with qemu-img.
 */
import { readFile, truncate } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { BlockError, CorruptImageError, openImage } from '../src/index.js';
import { convertedBochs } from './helpers/formats-bochs.js';
import { makeTempDir, qemuConvertToRaw, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { fuzzDamage, le32, le64, patchedCopy } from './helpers/small-fuzz.js';
import { openRefusal } from './helpers/refusal.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 120_000 };

/** A 10 MiB growing image (16 KiB extents, 1024 catalog entries) with data in its first 100 KiB and at 5 MiB. */
async function candidate(): Promise<{ dir: string; path: string }> {
  const dir = await makeTempDir();
  const path = await convertedBochs(dir, 'disk.img', 10, (size) => {
    const out = Buffer.alloc(size);
    seededBytes(3, 100 * 1024).copy(out, 0);
    seededBytes(4, 40 * 1024).copy(out, 5 * MiB);
    return out;
  });
  return { dir, path };
}

function refusal(path: string): Promise<BlockError> {
  return openRefusal(path, 'bochs');
}

async function qemuRefuses(path: string): Promise<boolean> {
  return (await run('qemu-img', ['convert', '-f', 'bochs', '-O', 'raw', path, `${path}.raw`])).code !== 0;
}

describe.skipIf(skipWithoutQemu('damaged bochs images'))('damaged bochs images', () => {
  const headerCases: Array<[string, Array<[number, Buffer]>, string, boolean]> = [
    ['a catalog of 2^20 + 1 entries (CVE-2014-0143)', [[72, le32(0x100001)]], 'bochs catalog 1048577 (entries) is not in [0, 1048576]', true],
    ['a catalog too small for the disk', [[72, le32(100)]], 'bochs catalog 100 (entries) is too small for the disk size 10321920: it needs 630', true],
    ['a catalog past the end of the file', [[68, le32(0x7fffffff)]], 'bochs header 2147483647 with catalog 1024 puts the catalog past the end of the', false],
    ['extent 256', [[80, le32(256)]], 'bochs extent 256 (bytes) is not a power of two in [512, 8388608]', true],
    ['extent 3 * 4096', [[80, le32(3 * 4096)]], 'bochs extent 12288 (bytes) is not a power of two in [512, 8388608]', true],
    ['extent 16 MiB', [[80, le32(16 * MiB)]], 'bochs extent 16777216 (bytes) is not a power of two in [512, 8388608]', true],
    ['a bitmap too small for the extent', [[76, le32(2)]], 'bochs bitmap 2 (bytes) is not in [4, 8388608] (one bit per sector of a 16384-byte extent)', false],
    ['version 3', [[64, le32(0x30000)]], 'bochs version 0x30000 is not 0x20000 or 0x10000', true],
    ['subtype "Undoable"', [[48, Buffer.from('Undoable\0', 'latin1')]], 'bochs subtype "Undoable" is not "Growing" (only growing redolog images are read)', true],
    ['a disk size of 2^60', [[88, le64(1n << 60n)]], 'bochs disk size 1152921504606846976 is above the largest supported size 2^53-1', true],
  ];

  it.each(headerCases)('%s is refused at open, naming the field and the allowed range', TIMEOUT, async (_name, patches, message, qemuToo) => {
    const { dir, path } = await candidate();
    const damaged = await patchedCopy(path, dir, 'damaged.img', patches);
    const error = await refusal(damaged);
    expect(error).toBeInstanceOf(CorruptImageError);
    expect(error.message).toContain(`${damaged}: ${message}`);
    if (qemuToo) expect(await qemuRefuses(damaged)).toBe(true);
  });

  it('a catalog entry past the end of the file, or a truncated extent, fails the reads of that extent only', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const reference = await qemuConvertToRaw(path, dir, 'bochs');
    const file = await readFile(path);
    const catalogAt = file.readUInt32LE(68);
    const damaged = await patchedCopy(path, dir, 'far.img', [[catalogAt + 4 * 2, le32(1_000_000)]]);
    const image = await openImage(damaged, { format: 'bochs' });
    try {
      const error = await image.read(2 * 16384, Buffer.alloc(512)).then(() => undefined, (caught: unknown) => caught);
      expect(error).toBeInstanceOf(CorruptImageError);
      expect((error as Error).message).toMatch(new RegExp(`^${damaged}: bochs catalog entry 2 \\(guest bytes 32768\\.\\.\\) points to extent 1000000 at \\d+, whose bitmap is past the end of the \\d+-byte file$`));
      const rest = Buffer.alloc(image.length - 3 * 16384);
      await image.read(3 * 16384, rest);
      expect(rest.equals(reference.subarray(3 * 16384))).toBe(true);
    } finally {
      await image.close();
    }
    // the last stored extent (5 MiB + 32 KiB..) cut short: its stored sectors are past the end
    const short = await patchedCopy(path, dir, 'short.img', []);
    await truncate(short, file.length - 12288);
    const cut = await openImage(short, { format: 'bochs' });
    try {
      const error = await cut.read(5 * MiB + 32768, Buffer.alloc(8192)).then(() => undefined, (caught: unknown) => caught);
      expect(error).toBeInstanceOf(CorruptImageError);
      expect((error as Error).message).toContain('past the end of the');
      const head = Buffer.alloc(5 * MiB);
      await cut.read(0, head);
      expect(head.equals(reference.subarray(0, 5 * MiB))).toBe(true);
    } finally {
      await cut.close();
    }
  });

  it('seeded random damage of the header, catalog and bitmaps: refused with a message, never a crash or hang; what both read agrees with qemu-img', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const file = await readFile(path);
    const catalogAt = file.readUInt32LE(68);
    const dataAt = catalogAt + 4 * file.readUInt32LE(72);
    const regions = [{ start: 64, end: 96 }, { start: catalogAt, end: catalogAt + 4 * 8 }, { start: catalogAt + 4 * 320, end: catalogAt + 4 * 324 }, { start: dataAt, end: dataAt + 512 }];
    const summary = await fuzzDamage(dir, path, 'bochs', regions, 0xb0c, 150);
    expect(summary.cases).toBe(150);
    expect(summary.refusedAtOpen + summary.refusedAtRead).toBeGreaterThan(0);
    expect(summary.agreedWithQemu).toBeGreaterThan(0);
    console.log(`bochs fuzz: ${JSON.stringify({ ...summary, messages: summary.messages.size, stricterThanQemu: [...summary.stricterThanQemu] })}`);
  });
});
