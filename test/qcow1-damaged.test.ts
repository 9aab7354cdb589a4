/**
 * Damaged qcow (version 1) images, from an image qemu-img made: every header
 * field qemu's block/qcow.c checks (and the CVE-2014-0222/-0223 sizes) is
 * refused at open naming the field, its value and the allowed range, and
 * qemu-img refuses the same images; damaged L1/L2 entries and compressed
 * clusters fail only the reads of their range (EIO, naming the entry) while
 * the rest reads like qemu-img convert; seeded random damage of the header and
 * tables never crashes, hangs or reads out of bounds, and whenever qemu-img and
 * this library both read a damaged image they read the same bytes.
 */
import { readFile, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { BlockError, CorruptImageError, openImage, UnsupportedFeatureError } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, run, skipWithoutQemu } from './helpers/qemu.js';
import { be32, be64, fuzzDamage, patchedCopy } from './helpers/small-fuzz.js';
import { openRefusal } from './helpers/refusal.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TIMEOUT = { timeout: 120_000 };

/** A 6 MiB qcow (4 KiB clusters, L2 tables of 512 entries: 2 MiB each) with data in all three L2 spans and one compressed cluster. */
async function candidate(): Promise<{ dir: string; path: string; reference: Buffer }> {
  const dir = await makeTempDir();
  const path = join(dir, 'disk.qcow');
  await qemuImg(['create', '-q', '-f', 'qcow', path, '6M']);
  await qemuIo(path, ['write -P 0x11 0 64k', 'write -P 0x22 2M 8k', 'write -P 0x33 5M 12k', 'write -c -P 0x44 1M 4k'], 'qcow');
  return { dir, path, reference: await qemuConvertToRaw(path, dir, 'qcow') };
}

/** Where the L1 table is, and the file offset of the L2 entry for `guest`. */
async function l2EntryAt(path: string, guest: number): Promise<{ l1: number; l2: number; entry: number }> {
  const file = await readFile(path);
  const l1 = Number(file.readBigUInt64BE(40));
  const l2 = Number(file.readBigUInt64BE(l1 + Math.floor(guest / (2 * MiB)) * 8));
  return { l1, l2, entry: l2 + (Math.floor(guest / 4096) % 512) * 8 };
}

function refusal(path: string): Promise<BlockError> {
  return openRefusal(path, 'qcow');
}

async function readError(path: string, offset: number, length: number): Promise<BlockError> {
  const image = await openImage(path, { format: 'qcow' });
  try {
    const error = await image.read(offset, Buffer.alloc(length)).then(
      () => undefined,
      (caught: unknown) => caught,
    );
    expect(error).toBeInstanceOf(CorruptImageError);
    expect((error as CorruptImageError).errno).toBe(constants.errno.EIO);
    return error as BlockError;
  } finally {
    await image.close();
  }
}

async function expectReadsExcept(path: string, reference: Buffer, badStart: number, badEnd: number): Promise<void> {
  const image = await openImage(path, { format: 'qcow' });
  try {
    for (let offset = 0; offset < image.length; offset += 64 * KiB) {
      const end = Math.min(image.length, offset + 64 * KiB);
      if (offset < badEnd && end > badStart) continue;
      const bytes = Buffer.alloc(end - offset);
      await image.read(offset, bytes);
      expect(bytes.equals(reference.subarray(offset, end)), `bytes ${offset}..${end}`).toBe(true);
    }
  } finally {
    await image.close();
  }
}

async function qemuRefuses(path: string): Promise<boolean> {
  return (await run('qemu-img', ['convert', '-f', 'qcow', '-O', 'raw', path, `${path}.raw`])).code !== 0;
}

describe.skipIf(skipWithoutQemu('damaged qcow images'))('damaged qcow (version 1) images', () => {
  const u8 = (value: number) => Buffer.from([value]);
  // [name, patches, message, qemu refuses it too]
  const headerCases: Array<[string, Array<[number, Buffer]>, string, boolean]> = [
    ['cluster_bits 8', [[32, u8(8)]], 'qcow cluster_bits 8 is not in [9, 16]', true],
    ['cluster_bits 17 (CVE-2014-0223)', [[32, u8(17)]], 'qcow cluster_bits 17 is not in [9, 16]', true],
    ['l2_bits 5', [[33, u8(5)]], 'qcow l2_bits 5 is not in [6, 13]', true],
    ['l2_bits 14 (CVE-2014-0223)', [[33, u8(14)]], 'qcow l2_bits 14 is not in [6, 13]', true],
    ['size 1', [[24, be64(1n)]], 'qcow size 1 is too small (at least 2 bytes)', true],
    ['size 2^63', [[24, be64(1n << 63n)]], 'qcow size 9223372036854775808 is above the largest supported value 2^53-1', true],
    ['size 2^50: an L1 table of 2^29 entries (CVE-2014-0222)', [[24, be64(1n << 50n)]], 'qcow size 1125899906842624 needs 536870912 L1 entries, more than the 268435455 allowed', true],
    ['size 2^40: an L1 table past the end of the file', [[24, be64(1n << 40n)]], 'qcow l1_table_offset 48 with 4194304 bytes of L1 table is not inside the file', false],
    ['crypt_method 2', [[36, be32(2)]], 'qcow crypt_method 2 is not 0 (none) or 1 (AES)', true],
    ['l1_table_offset 2^60', [[40, be64(1n << 60n)]], 'qcow l1_table_offset 1152921504606846976 is above the largest supported value 2^53-1', false],
    ['l1_table_offset 0 (on the header)', [[40, be64(0n)]], 'qcow l1_table_offset 0 with 24 bytes of L1 table is not inside the file [48,', false],
    ['backing_file_size 1024', [[8, be64(48n)], [16, be32(1024)]], 'qcow backing_file_size 1024 is not in [0, 1023]', true],
    ['backing_file_offset past the end of the file', [[8, be64(1n << 40n)], [16, be32(10)]], 'qcow backing_file_offset 1099511627776 with size 10 is not inside the file', false],
    ['magic', [[0, be32(0x51464900)]], 'qcow magic 51464900 is not 514649fb', true],
  ];

  it.each(headerCases)('%s is refused at open, naming the field and the allowed range', TIMEOUT, async (_name, patches, message, qemuToo) => {
    const { dir, path } = await candidate();
    const damaged = await patchedCopy(path, dir, 'damaged.qcow', patches);
    const error = await refusal(damaged);
    expect(error).toBeInstanceOf(CorruptImageError);
    expect(error.message).toContain(`${damaged}: ${message}`);
    if (qemuToo) expect(await qemuRefuses(damaged)).toBe(true);
  });

  it('version 2 with -f qcow, an encrypted image, and a truncated header are refused by name', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const v2 = await patchedCopy(path, dir, 'v2.qcow', [[4, be32(2)]]);
    const versionError = await refusal(v2);
    expect(versionError).toBeInstanceOf(UnsupportedFeatureError);
    expect(versionError.message).toBe(`${v2}: qcow version 2 is not 1 (versions 2 and 3 are qcow2)`);
    const encrypted = await patchedCopy(path, dir, 'aes.qcow', [[36, be32(1)]]);
    const cryptError = await refusal(encrypted);
    expect(cryptError).toBeInstanceOf(UnsupportedFeatureError);
    expect(cryptError.message).toBe(`${encrypted}: qcow image is encrypted (crypt_method 1, AES-CBC); encrypted qcow images are not supported`);
    // qemu-img needs a key to read it, too
    expect(await qemuRefuses(encrypted)).toBe(true);
    const short = await patchedCopy(path, dir, 'short.qcow', []);
    await truncate(short, 40);
    expect((await refusal(short)).message).toBe(`${short}: qcow header is truncated: the file is 40 bytes, the header needs 48`);
  });

  it('an L1 entry above 2^53, past the end of the file or onto the L1 table fails reads of its 2 MiB only', TIMEOUT, async () => {
    const { dir, path, reference } = await candidate();
    const { l1 } = await l2EntryAt(path, 0);
    for (const [value, problem] of [
      [1n << 60n, 'points to 1152921504606846976, above 2^53-1'],
      [1n << 40n, `points to an L2 table at 1099511627776, whose 4096 bytes run past the end of the ${(await readFile(path)).length}-byte file`],
      [48n, 'points to an L2 table at 48, on the header or the L1 table'],
    ] as const) {
      const damaged = await patchedCopy(path, dir, 'l1.qcow', [[l1 + 8, be64(value)]]);
      const error = await readError(damaged, 2 * MiB + 100, 10);
      expect(error.message).toBe(`${damaged}: qcow L1 entry 1 (guest bytes 2097152..) ${problem}`);
      await expectReadsExcept(damaged, reference, 2 * MiB, 4 * MiB);
    }
  });

  it('an L2 entry unaligned, past the end of the file, or a compressed cluster that does not decode fails reads of its cluster; qemu-img fails them too', TIMEOUT, async () => {
    const { dir, path, reference } = await candidate();
    const data = await l2EntryAt(path, 5 * MiB);
    const file = await readFile(path);
    const host = file.readBigUInt64BE(data.entry);
    const unaligned = await patchedCopy(path, dir, 'unaligned.qcow', [[data.entry, be64(host + 1n)]]);
    expect((await readError(unaligned, 5 * MiB, 4096)).message).toBe(`${unaligned}: qcow L2 entry for guest offset ${5 * MiB} points to ${host + 1n}, which is not a multiple of 512`);
    await expectReadsExcept(unaligned, reference, 5 * MiB, 5 * MiB + 4096);
    expect(await qemuRefuses(unaligned)).toBe(true);
    const past = await patchedCopy(path, dir, 'past.qcow', [[data.entry, be64(1n << 40n)]]);
    expect((await readError(past, 5 * MiB + 4000, 200)).message).toContain(`qcow L2 entry for guest offset ${5 * MiB} points to 1099511627776, past the end of the`);
    await expectReadsExcept(past, reference, 5 * MiB, 5 * MiB + 4096);
    const compressed = await l2EntryAt(path, MiB);
    const entry = file.readBigUInt64BE(compressed.entry);
    expect(entry >> 63n).toBe(1n);
    const at = Number(entry & ((1n << 51n) - 1n));
    const garbage = await patchedCopy(path, dir, 'garbage.qcow', [[at, Buffer.alloc(16, 0xff)]]);
    expect((await readError(garbage, MiB, 4096)).message).toMatch(new RegExp(`qcow compressed cluster for guest offset ${MiB} \\(host offset ${at}\\) (does not decode|decodes to)`));
    await expectReadsExcept(garbage, reference, MiB, MiB + 4096);
    expect(await qemuRefuses(garbage)).toBe(true);
  });

  it('seeded random damage of the header, the L1 and the L2 tables: refused with a message, never a crash or hang; what both read agrees with qemu-img', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const { l1 } = await l2EntryAt(path, 0);
    const tables = [0, 2 * MiB, 4 * MiB].map(async (guest) => (await l2EntryAt(path, guest)).l2);
    const regions = [{ start: 0, end: 48 }, { start: l1, end: l1 + 24 }, ...(await Promise.all(tables)).map((l2) => ({ start: l2, end: l2 + 4096 }))];
    const summary = await fuzzDamage(dir, path, 'qcow', regions, 0x9c0, 150);
    expect(summary.cases).toBe(150);
    expect(summary.refusedAtOpen + summary.refusedAtRead).toBeGreaterThan(0);
    expect(summary.agreedWithQemu).toBeGreaterThan(0);
    console.log(`qcow fuzz: ${JSON.stringify({ ...summary, messages: summary.messages.size, stricterThanQemu: [...summary.stricterThanQemu] })}`);
  });
});
