/**
 * Damaged cloop images, from an image create_compressed_fs made: each field
 * qemu's block/cloop.c checks (the CVE-2014-0144..0147 bounds: block size,
 * n_blocks and the offsets table size, offsets monotonic, compressed blocks
 * bounded) is refused at open naming the field, its value and the allowed
 * range, and qemu-img refuses the same images; a block that does not inflate
 * or runs past the end of the file fails the reads of that block only; seeded
 * random damage of the header, offsets and blocks never crashes, hangs or
 * reads out of bounds, and what both read agrees with qemu-img.
 */
import { readFile, truncate } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { BlockError, CorruptImageError, openImage } from '../src/index.js';
import { mixedContent } from './helpers/formats.js';
import { makeCloop } from './helpers/formats-cloop.js';
import { makeTempDir, qemuConvertToRaw, run, skipWithoutQemu } from './helpers/qemu.js';
import { be32, be64, fuzzDamage, patchedCopy } from './helpers/small-fuzz.js';
import { openRefusal } from './helpers/refusal.js';

const KiB = 1024;
const TIMEOUT = { timeout: 120_000 };
const BLOCK = 64 * KiB;

/** A 1 MiB cloop (16 blocks of 64 KiB) of mixed content. */
async function candidate(): Promise<{ dir: string; path: string; offsets: bigint[] }> {
  const dir = await makeTempDir();
  const path = await makeCloop(dir, 'disk.cloop', mixedContent(16 * BLOCK, 77), BLOCK);
  const file = await readFile(path);
  const offsets = Array.from({ length: 17 }, (_, i) => file.readBigUInt64BE(136 + 8 * i));
  return { dir, path, offsets };
}

function refusal(path: string): Promise<BlockError> {
  return openRefusal(path, 'cloop');
}

async function qemuRefuses(path: string): Promise<boolean> {
  return (await run('qemu-img', ['convert', '-f', 'cloop', '-O', 'raw', path, `${path}.raw`])).code !== 0;
}

describe.skipIf(skipWithoutQemu('damaged cloop images'))('damaged cloop images', () => {
  const offsetAt = (i: number) => 136 + 8 * i;
  const headerCases: Array<[string, (o: bigint[]) => Array<[number, Buffer]>, string]> = [
    ['block_size 0', () => [[128, be32(0)]], 'cloop block_size 0 is not a multiple of 512 in [512, 67108864]'],
    ['block_size 1000', () => [[128, be32(1000)]], 'cloop block_size 1000 is not a multiple of 512 in [512, 67108864]'],
    ['block_size 128 MiB', () => [[128, be32(128 * 1024 * 1024)]], 'cloop block_size 134217728 is not a multiple of 512 in [512, 67108864]'],
    ['n_blocks 2^29 (the offsets size overflows 32 bits in qemu)', () => [[132, be32(2 ** 29)]], 'cloop n_blocks 536870912 is not in [0, 67108863]'],
    ['n_blocks 2^26 (an offsets table above 512 MiB)', () => [[132, be32(2 ** 26)]], 'cloop n_blocks 67108864 is not in [0, 67108863]'],
    ['offsets not monotonic', (o) => [[offsetAt(3), be64(o[2]! - 1n)]], `cloop offsets are not monotonically increasing at index 3`],
    ['a compressed block above 128 MiB', (o) => [[offsetAt(16), be64(o[15]! + (1n << 27n) + 1n)]], `cloop block 15 is ${(1 << 27) + 1} bytes compressed, not in [0, 134217728]`],
    ['an offset above 2^53', (o) => [[offsetAt(16), be64(1n << 60n)]], 'cloop offset 16 (1152921504606846976) is above the largest supported offset 2^53-1'],
    ['offset 0 inside the offsets table', () => [[offsetAt(0), be64(0n)]], 'cloop offset 0 (0) is inside the header and offsets table (272 bytes)'],
  ];

  it.each(headerCases)('%s is refused at open, naming the field and the allowed range; qemu-img refuses it too', TIMEOUT, async (_name, patches, message) => {
    const { dir, path, offsets } = await candidate();
    const damaged = await patchedCopy(path, dir, 'damaged.cloop', patches(offsets));
    const error = await refusal(damaged);
    expect(error).toBeInstanceOf(CorruptImageError);
    expect(error.message).toContain(`${damaged}: ${message}`);
    expect(await qemuRefuses(damaged)).toBe(true);
  });

  it('an offsets table past the end of the file is refused at open', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const damaged = await patchedCopy(path, dir, 'long.cloop', [[132, be32(1_000_000)]]);
    expect((await refusal(damaged)).message).toContain(`${damaged}: cloop n_blocks 1000000 puts the 8000008-byte offsets table past the end of the`);
  });

  it('a block that does not inflate, or runs past the end of the file, fails the reads of that block only; qemu-img fails too', TIMEOUT, async () => {
    const { dir, path, offsets } = await candidate();
    const reference = await qemuConvertToRaw(path, dir, 'cloop');
    const garbage = await patchedCopy(path, dir, 'garbage.cloop', [[Number(offsets[5]!), Buffer.alloc(8, 0x5a)]]);
    const image = await openImage(garbage, { format: 'cloop' });
    try {
      const error = await image.read(5 * BLOCK + 100, Buffer.alloc(10)).then(() => undefined, (caught: unknown) => caught);
      expect(error).toBeInstanceOf(CorruptImageError);
      expect((error as Error).message).toContain(`${garbage}: cloop block 5 (guest bytes ${5 * BLOCK}.., host offset ${offsets[5]}) does not inflate`);
      const rest = Buffer.alloc(10 * BLOCK);
      await image.read(6 * BLOCK, rest);
      expect(rest.equals(reference.subarray(6 * BLOCK))).toBe(true);
    } finally {
      await image.close();
    }
    expect(await qemuRefuses(garbage)).toBe(true);
    const short = await patchedCopy(path, dir, 'short.cloop', []);
    await truncate(short, Number(offsets[16]!) - 10);
    const cut = await openImage(short, { format: 'cloop' });
    try {
      const error = await cut.read(15 * BLOCK, Buffer.alloc(512)).then(() => undefined, (caught: unknown) => caught);
      expect(error).toBeInstanceOf(CorruptImageError);
      expect((error as Error).message).toBe(`${short}: cloop block 15 (guest bytes ${15 * BLOCK}..) at [${offsets[15]}, ${offsets[16]}) runs past the end of the ${Number(offsets[16]!) - 10}-byte file`);
      const head = Buffer.alloc(15 * BLOCK);
      await cut.read(0, head);
      expect(head.equals(reference.subarray(0, 15 * BLOCK))).toBe(true);
    } finally {
      await cut.close();
    }
    expect(await qemuRefuses(short)).toBe(true);
  });

  it('seeded random damage of the header, offsets and blocks: refused with a message, never a crash or hang; what both read agrees with qemu-img', TIMEOUT, async () => {
    const { dir, path, offsets } = await candidate();
    // the script's tail (bytes 88..128: "exit $?" and padding) is read by nobody once the format is given: damage there must read alike
    const regions = [{ start: 88, end: 128 }, { start: 128, end: 136 }, { start: 136, end: 136 + 17 * 8 }, { start: Number(offsets[0]!), end: Number(offsets[0]!) + 64 }, { start: Number(offsets[9]!), end: Number(offsets[9]!) + 64 }];
    const summary = await fuzzDamage(dir, path, 'cloop', regions, 0xc10, 150);
    expect(summary.cases).toBe(150);
    expect(summary.refusedAtOpen + summary.refusedAtRead).toBeGreaterThan(0);
    expect(summary.agreedWithQemu).toBeGreaterThan(0);
    console.log(`cloop fuzz: ${JSON.stringify({ ...summary, messages: summary.messages.size, stricterThanQemu: [...summary.stricterThanQemu] })}`);
  });
});
