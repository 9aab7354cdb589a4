/**
 * Corrupt and hostile QED images: every header field out of range is refused
 * with a message naming the field and its value; feature bits follow the
 * specification; tables pointing outside the file fail reads of just that
 * region without reading outside the file; truncated files; the consistency
 * check counts and repairs corruptions and leaks so that `qemu-img check` is
 * clean afterwards; a file whose name and content disagree.
 */
import { appendFile, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  BlockError, CorruptImageError, UnsupportedFeatureError, checkImage, createImage, openImage,
  type BlockImage, type OpenImageOptions,
} from '../src/index.js';
import {
  makeTempDir, openQedOver, patchBytes, qedEntryLocations, qemuCheck, readAll, readBytes, readU64, seededBytes,
  skipWithoutQemu, spyProtocol, writeU32, writeU64, QED_F_BACKING_FILE, QED_HEADER,
} from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const skipQemu = skipWithoutQemu('QED corrupt images checked with qemu-img');

/** The error openImage rejects with (fails the test if it opens). */
async function openError(path: string, options: OpenImageOptions = {}): Promise<Error> {
  let image: BlockImage;
  try {
    image = await openImage(path, options);
  } catch (error) {
    return error as Error;
  }
  await image.close();
  throw new Error(`${path} opened, but it should have been refused`);
}

/** A valid, empty image: 64 KiB clusters, table_size 4 (header at 0, L1 at 64 KiB, 320 KiB file). */
async function validImage(dir: string, name = 'disk.qed'): Promise<string> {
  const path = join(dir, name);
  await createImage(path, 'qed', { size: 4 * MiB, options: { cluster_size: '65536', table_size: '4' } });
  return path;
}

describe('header fields out of range are refused, naming the field and the value', () => {
  interface Case {
    name: string;
    patch: (path: string) => Promise<void>;
    message: RegExp[];
    kind?: typeof CorruptImageError | typeof UnsupportedFeatureError;
  }
  const u32 = (offset: number, value: number) => (path: string) => writeU32(path, offset, value);
  const u64 = (offset: number, value: bigint) => (path: string) => writeU64(path, offset, value);
  const backingName = (offset: number, size: number) => async (path: string) => {
    await writeU64(path, QED_HEADER.features, QED_F_BACKING_FILE);
    await writeU32(path, QED_HEADER.backingFilenameOffset, offset);
    await writeU32(path, QED_HEADER.backingFilenameSize, size);
  };
  const H = QED_HEADER;
  const cases: Case[] = [
    { name: 'cluster_size not a power of two', patch: u32(H.clusterSize, 5000), message: [/cluster_size/, /5000/] },
    { name: 'cluster_size too small', patch: u32(H.clusterSize, 2048), message: [/cluster_size/, /2048/] },
    { name: 'cluster_size too big', patch: u32(H.clusterSize, 2 ** 27), message: [/cluster_size/, /134217728/] },
    { name: 'cluster_size 0', patch: u32(H.clusterSize, 0), message: [/cluster_size/, /\b0\b/] },
    { name: 'table_size 0', patch: u32(H.tableSize, 0), message: [/table_size/, /\b0\b/] },
    { name: 'table_size 3', patch: u32(H.tableSize, 3), message: [/table_size/, /\b3\b/] },
    { name: 'table_size 32', patch: u32(H.tableSize, 32), message: [/table_size/, /\b32\b/] },
    { name: 'header_size 0', patch: u32(H.headerSize, 0), message: [/header_size/, /\b0\b/] },
    { name: 'header_size past the L1 table', patch: u32(H.headerSize, 3), message: [/header_size/, /\b3\b/] },
    {
      name: 'unknown features bit 0x10',
      patch: u64(H.features, 0x10n),
      message: [/features/, /0x10\b/],
      kind: UnsupportedFeatureError,
    },
    {
      name: 'unknown features bits 0x30 with known ones',
      patch: u64(H.features, 0x30n | 0x02n),
      message: [/features/, /0x30\b/],
      kind: UnsupportedFeatureError,
    },
    { name: 'l1_table_offset misaligned', patch: u64(H.l1TableOffset, 65536n + 4096n), message: [/l1_table_offset/, /69632/] },
    { name: 'l1_table_offset past the end of the file', patch: u64(H.l1TableOffset, 10n * 65536n), message: [/l1_table_offset/, /655360/] },
    { name: 'l1_table_offset above 2^53', patch: u64(H.l1TableOffset, 1n << 60n), message: [/l1_table_offset/, /1152921504606846976/] },
    { name: 'image_size not a multiple of 512', patch: u64(H.imageSize, 1000n), message: [/image_size/, /\b1000\b/] },
    { name: 'image_size beyond what the tables address', patch: u64(H.imageSize, 1n << 47n), message: [/image_size/, /140737488355328/] },
    { name: 'backing_filename_size 0', patch: backingName(64, 0), message: [/backing_filename_size/, /\b0\b/] },
    { name: 'backing file name running past the header', patch: backingName(65500, 100), message: [/backing_filename/, /65500/] },
    { name: 'backing file name overlapping the header fields', patch: backingName(8, 10), message: [/backing_filename_offset/, /\b8\b/] },
  ];

  it.each(cases)('$name', async ({ patch, message, kind }) => {
    const dir = await makeTempDir();
    const path = await validImage(dir);
    await patch(path);
    for (const readOnly of [true, false]) {
      const before = await readFile(path);
      const error = await openError(path, { readOnly });
      expect(error).toBeInstanceOf(BlockError);
      expect(error).toBeInstanceOf(kind ?? CorruptImageError);
      for (const pattern of message) expect(error.message).toMatch(pattern);
      expect(error.message).not.toMatch(/\n/);
      expect((await readFile(path)).equals(before), 'a refused open must not change the file').toBe(true);
    }
  });

  it('bad magic: probing says the name and content disagree; naming the format says which field', async () => {
    const dir = await makeTempDir();
    const path = await validImage(dir);
    await patchBytes(path, 0, Buffer.from('QEE\0', 'latin1'));
    const probed = await openError(path);
    expect(probed).toBeInstanceOf(BlockError);
    expect(probed.message).toContain(path);
    expect(probed.message).toMatch(/qed/);
    expect(probed.message).toMatch(/content/);
    const named = await openError(path, { format: 'qed' });
    expect(named).toBeInstanceOf(CorruptImageError);
    expect(named.message).toMatch(/magic/);
    expect(named.message).toMatch(/51454500|QEE/);
  });

  it('a file shorter than the header is refused', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'short.qed');
    await writeFile(path, Buffer.from('QED\x00\x00\x00\x01\x00', 'latin1'));
    const error = await openError(path);
    expect(error).toBeInstanceOf(CorruptImageError);
    expect(error.message).toMatch(/header|truncated/);
  });
});

describe('feature bits', () => {
  it('unknown compat_features bits open read-write, work, and are kept', async () => {
    const dir = await makeTempDir();
    const path = await validImage(dir);
    await writeU64(path, QED_HEADER.compatFeatures, 0xf0f0n);
    const image = await openImage(path);
    try {
      await image.write(70000, Buffer.alloc(100, 0x42));
      const back = Buffer.alloc(100);
      await image.read(70000, back);
      expect(back.every((byte) => byte === 0x42)).toBe(true);
    } finally {
      await image.close();
    }
    expect(await readU64(path, QED_HEADER.compatFeatures)).toBe(0xf0f0n);
  });

  it('unknown autoclear_features bits are cleared by a read-write open and left by a read-only open', async () => {
    const dir = await makeTempDir();
    const path = await validImage(dir);
    await writeU64(path, QED_HEADER.autoclearFeatures, 0x8001n);
    const readOnly = await openImage(path, { readOnly: true });
    await readOnly.read(0, Buffer.alloc(512));
    await readOnly.close();
    expect(await readU64(path, QED_HEADER.autoclearFeatures)).toBe(0x8001n);

    const notices: string[] = [];
    const image = await openImage(path, { notice: (line) => notices.push(line) });
    try {
      expect(await readU64(path, QED_HEADER.autoclearFeatures)).toBe(0n); // cleared on open, not just on close
    } finally {
      await image.close();
    }
    expect(await readU64(path, QED_HEADER.autoclearFeatures)).toBe(0n);
  });
});

/**
 * An image with 4 KiB clusters and table_size 1 (each L2 table covers 2 MiB)
 * holding data in three L2 tables; returns the bytes it holds.
 */
async function imageWithThreeTables(dir: string): Promise<{ path: string; model: Buffer }> {
  const path = join(dir, 'disk.qed');
  await createImage(path, 'qed', { size: 8 * MiB, options: { cluster_size: '4096', table_size: '1' } });
  const model = Buffer.alloc(8 * MiB);
  const image = await openImage(path);
  try {
    for (const [offset, length, seed] of [[0, 10000, 1], [2 * MiB + 100, 9000, 2], [4 * MiB + 4096, 4096, 3]] as const) {
      const data = seededBytes(seed, length);
      await image.write(offset, data);
      data.copy(model, offset);
    }
  } finally {
    await image.close();
  }
  return { path, model };
}

async function expectRead(image: BlockImage, model: Buffer, offset: number, length: number): Promise<void> {
  const buffer = Buffer.alloc(length);
  await image.read(offset, buffer);
  expect(buffer.equals(model.subarray(offset, offset + length)), `read of ${length} at ${offset}`).toBe(true);
}

async function expectReadFails(image: BlockImage, offset: number, length: number): Promise<BlockError> {
  const error = await image.read(offset, Buffer.alloc(length)).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, `read of ${length} at ${offset} should fail`).toBeInstanceOf(BlockError);
  expect((error as BlockError).errno).toBeGreaterThan(0);
  return error as BlockError;
}

describe('tables pointing outside the file', () => {
  const badL1Values: Array<[string, (l2: number) => bigint]> = [
    ['past the end of the file', () => 1n << 40n],
    ['misaligned', (l2) => BigInt(l2 + 512)],
    ['above 2^53', () => 0xfffffffffffff000n],
  ];

  it.each(badL1Values)('an L1 entry %s fails reads of that L2 table only, never reading outside the file', async (_, value) => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithThreeTables(dir);
    const { l1EntryOffset, l2Offset } = await qedEntryLocations(path, 2 * MiB);
    await writeU64(path, l1EntryOffset, value(l2Offset));

    const protocol = await spyProtocol(path, true);
    const image = await openQedOver(protocol);
    try {
      await expectRead(image, model, 0, 10000);
      await expectRead(image, model, 4 * MiB, 8192);
      const error = await expectReadFails(image, 2 * MiB, 4096);
      expect(error).toBeInstanceOf(CorruptImageError);
      expect(error.message).toMatch(/L1|L2/);
      await expectReadFails(image, 2 * MiB - 10, 20); // a read that only partly covers the bad table
      await expect(image.map(2 * MiB + 5, 10)).rejects.toBeInstanceOf(BlockError);
      await expectRead(image, model, 2 * MiB - 4096, 4096); // still fine after the failures
    } finally {
      await image.close();
    }
    expect(protocol.readsPastEnd).toEqual([]);

    // a read-write open refuses to write there instead of allocating over the damage
    const before = await readFile(path);
    const writable = await openImage(path);
    try {
      await expect(writable.write(2 * MiB + 1, Buffer.alloc(10, 9))).rejects.toBeInstanceOf(BlockError);
      await writable.write(10, Buffer.alloc(10, 9));
      model.fill(9, 10, 20);
      await expectRead(writable, model, 0, 10000);
    } finally {
      await writable.close();
    }
    expect((await readFile(path)).subarray(l1EntryOffset, l1EntryOffset + 8).equals(before.subarray(l1EntryOffset, l1EntryOffset + 8))).toBe(true);
  });

  const badL2Values: Array<[string, (data: number) => bigint]> = [
    ['past the end of the file', () => 1n << 40n],
    ['misaligned', (data) => BigInt(data + 512)],
    ['above 2^53', () => 0xfffffffffffff000n],
  ];

  it.each(badL2Values)('an L2 entry %s fails reads of that cluster only, never reading outside the file', async (_, value) => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithThreeTables(dir);
    const guest = 2 * MiB + 4096; // the second cluster of the data at 2 MiB + 100
    const { l2EntryOffset } = await qedEntryLocations(path, guest);
    const dataOffset = Number(await readU64(path, l2EntryOffset));
    expect(dataOffset).toBeGreaterThan(0);
    await writeU64(path, l2EntryOffset, value(dataOffset));

    const protocol = await spyProtocol(path, true);
    const image = await openQedOver(protocol);
    try {
      await expectRead(image, model, 2 * MiB, 4096); // same L2 table, neighbouring cluster
      await expectRead(image, model, guest + 4096, 4096);
      await expectRead(image, model, 0, 10000);
      const error = await expectReadFails(image, guest + 100, 1);
      expect(error).toBeInstanceOf(CorruptImageError);
      await expectReadFails(image, guest - 50, 100);
    } finally {
      await image.close();
    }
    expect(protocol.readsPastEnd).toEqual([]);
  });
});

describe('truncated files', () => {
  it('cut in the middle of the L1 table: refused, naming the problem', async () => {
    const dir = await makeTempDir();
    const path = await validImage(dir);
    await truncate(path, 65536 + 100000);
    for (const readOnly of [true, false]) {
      const error = await openError(path, { readOnly });
      expect(error).toBeInstanceOf(CorruptImageError);
      expect(error.message).toMatch(/l1_table_offset|L1/);
      expect(error.message).toMatch(/truncated|end of the/);
    }
    expect((await stat(path)).size).toBe(65536 + 100000);
  });

  /** Data at guest 0 and 8192; the cluster for 8192 is the last one in the file. Returns the file cut 2000 bytes short. */
  async function cutInDataCluster(dir: string): Promise<{ path: string; model: Buffer }> {
    const path = join(dir, 'disk.qed');
    await createImage(path, 'qed', { size: MiB, options: { cluster_size: '4096', table_size: '2' } });
    const model = Buffer.alloc(MiB);
    const image = await openImage(path);
    try {
      for (const [offset, seed] of [[0, 1], [8192, 2]] as const) {
        const data = seededBytes(seed, 4096);
        await image.write(offset, data);
        data.copy(model, offset);
      }
    } finally {
      await image.close();
    }
    const { l2EntryOffset } = await qedEntryLocations(path, 8192);
    const size = (await stat(path)).size;
    expect(Number(await readU64(path, l2EntryOffset))).toBe(size - 4096); // the layout this test relies on
    await truncate(path, size - 2000);
    return { path, model };
  }

  it('cut in the middle of a data cluster: that cluster fails to read, the rest reads', async () => {
    const dir = await makeTempDir();
    const { path, model } = await cutInDataCluster(dir);
    const protocol = await spyProtocol(path, true);
    const image = await openQedOver(protocol);
    try {
      await expectRead(image, model, 0, 4096);
      await expectRead(image, model, 4096, 4096);
      await expectReadFails(image, 8192, 4096);
      await expectReadFails(image, 8192, 1); // even the part that survived: the cluster is not whole
    } finally {
      await image.close();
    }
    expect(protocol.readsPastEnd).toEqual([]);
  });

  it('cut in the middle of a data cluster: a later allocation never lands on the damaged cluster', async () => {
    const dir = await makeTempDir();
    const { path, model } = await cutInDataCluster(dir);
    const fresh = seededBytes(9, 4096);
    const image = await openImage(path);
    try {
      await image.write(20480, fresh);
      const back = Buffer.alloc(4096);
      await image.read(20480, back);
      expect(back.equals(fresh)).toBe(true);
      // guest 8192 still points at the damaged cluster; it must not now show the bytes written to 20480
      const damaged = await image.read(8192, back).then(() => Buffer.from(back), () => undefined);
      if (damaged) expect(damaged.equals(fresh), 'guest 8192 reads the data written at guest 20480').toBe(false);
      await expectRead(image, model, 0, 8192);
    } finally {
      await image.close();
    }
    const report = await checkImage(path);
    expect(report.messages.filter((line) => /more than once/.test(line))).toEqual([]);
  });
});

describe('checkImage counts corruptions and leaks and repairs them', () => {
  async function imageWithData(dir: string): Promise<{ path: string; model: Buffer }> {
    const path = join(dir, 'disk.qed');
    await createImage(path, 'qed', { size: 4 * MiB, options: { cluster_size: '4096', table_size: '2' } });
    const model = Buffer.alloc(4 * MiB);
    const image = await openImage(path);
    try {
      const data = seededBytes(7, 3 * 4096);
      await image.write(0, data);
      data.copy(model, 0);
    } finally {
      await image.close();
    }
    return { path, model };
  }

  async function expectContent(path: string, model: Buffer): Promise<void> {
    const image = await openImage(path, { readOnly: true });
    try {
      expect((await readAll(image)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
  }

  it('a clean image: nothing found, nothing changed', async () => {
    const dir = await makeTempDir();
    const { path } = await imageWithData(dir);
    const before = await readFile(path);
    const report = await checkImage(path, { repair: true });
    expect(report).toMatchObject({ corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, format: 'qed' });
    expect((await readFile(path)).equals(before)).toBe(true);
  });

  it.skipIf(skipQemu)('leaked clusters appended at the end are counted, then truncated away', async () => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithData(dir);
    const size = (await stat(path)).size;
    await appendFile(path, seededBytes(8, 2 * 4096));
    expect((await qemuCheck(path)).code).toBe(3); // qemu agrees: leaks only

    const before = await readFile(path);
    const found = await checkImage(path);
    expect(found).toMatchObject({ corruptions: 0, leaks: 2, leaksFixed: 0 });
    expect((await readFile(path)).equals(before), 'check without repair changes nothing').toBe(true);

    const repaired = await checkImage(path, { repair: true });
    expect(repaired).toMatchObject({ corruptions: 0, leaks: 2, leaksFixed: 2 });
    expect((await stat(path)).size).toBe(size);
    const check = await qemuCheck(path);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    expect(await checkImage(path)).toMatchObject({ corruptions: 0, leaks: 0 });
    await expectContent(path, model);
  });

  it.skipIf(skipQemu)('a data cluster referenced twice: both references keep their data after repair', async () => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithData(dir);
    const a = await qedEntryLocations(path, 4096);
    const b = await qedEntryLocations(path, 64 * 4096); // unallocated, same L2 table
    expect(await readU64(path, b.l2EntryOffset)).toBe(0n);
    const shared = await readU64(path, a.l2EntryOffset);
    await writeU64(path, b.l2EntryOffset, shared);
    model.copy(model, 64 * 4096, 4096, 8192); // what guest B reads now
    expect((await qemuCheck(path)).code).toBe(2); // qemu agrees: a corruption

    const found = await checkImage(path);
    expect(found.corruptions).toBeGreaterThanOrEqual(1);
    expect(found.messages.join('\n')).toMatch(/more than once|twice|referenced/);

    const repaired = await checkImage(path, { repair: true });
    expect(repaired.corruptionsFixed).toBe(repaired.corruptions);
    const check = await qemuCheck(path);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    await expectContent(path, model);
    expect(await readU64(path, b.l2EntryOffset)).not.toBe(shared);

    // the two guest clusters are independent again
    const image = await openImage(path);
    try {
      await image.write(64 * 4096 + 10, Buffer.alloc(100, 0xcc));
      model.fill(0xcc, 64 * 4096 + 10, 64 * 4096 + 110);
      expect((await readAll(image)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
  });

  it.skipIf(skipQemu)('an L2 table referenced by two L1 entries: both ranges keep their data after repair', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    const size = 12 * MiB;
    await createImage(path, 'qed', { size, options: { cluster_size: '4096', table_size: '2' } }); // 4 MiB per L2 table
    const model = Buffer.alloc(size);
    let image = await openImage(path);
    try {
      const data = seededBytes(12, 3 * 4096 + 5);
      await image.write(4000, data);
      data.copy(model, 4000);
    } finally {
      await image.close();
    }
    const first = await qedEntryLocations(path, 0);
    const third = await qedEntryLocations(path, 8 * MiB);
    expect(await readU64(path, third.l1EntryOffset)).toBe(0n);
    await writeU64(path, third.l1EntryOffset, BigInt(first.l2Offset));
    model.copy(model, 8 * MiB, 0, 4 * MiB);
    expect((await qemuCheck(path)).code).toBe(2);
    expect((await checkImage(path)).corruptions).toBeGreaterThanOrEqual(1);

    const repaired = await checkImage(path, { repair: true });
    expect(repaired.corruptions).toBeGreaterThanOrEqual(1);
    expect(repaired.corruptionsFixed).toBe(repaired.corruptions);
    const check = await qemuCheck(path);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    await expectContent(path, model);
    image = await openImage(path);
    try {
      await image.write(8 * MiB + 4100, Buffer.alloc(10, 0xee));
      model.fill(0xee, 8 * MiB + 4100, 8 * MiB + 4110);
      expect((await readAll(image)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
  });

  it.skipIf(skipQemu)('an L2 entry outside the file is counted and cleared; other data survives', async () => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithData(dir);
    const { l2EntryOffset } = await qedEntryLocations(path, 4096);
    await writeU64(path, l2EntryOffset, 1n << 40n);
    expect((await qemuCheck(path)).code).toBe(2);

    const found = await checkImage(path);
    expect(found.corruptions).toBe(1);
    expect(found.messages.join('\n')).toMatch(/outside|misaligned/);
    const repaired = await checkImage(path, { repair: true });
    expect(repaired).toMatchObject({ corruptions: 1, corruptionsFixed: 1 });
    model.fill(0, 4096, 8192); // unallocated now
    await expectContent(path, model);
    // no corruption left for qemu either; the cluster it used to point to is a leak in the middle (exit 3)
    const check = await qemuCheck(path);
    expect([0, 3], check.stdout + check.stderr).toContain(check.code);
  });

  it('an L1 entry past the end of the file is counted and cleared by repair', async () => {
    const dir = await makeTempDir();
    const { path, model } = await imageWithData(dir);
    // L1 entry 1 (each L2 table covers 4 MiB here): unallocated, past the image size, still checked
    const { l1EntryOffset } = await qedEntryLocations(path, 4 * MiB);
    expect(await readU64(path, l1EntryOffset)).toBe(0n);
    await writeU64(path, l1EntryOffset, 1n << 40n);
    expect((await checkImage(path)).corruptions).toBe(1);
    expect(await checkImage(path, { repair: true })).toMatchObject({ corruptions: 1, corruptionsFixed: 1 });
    expect(await checkImage(path)).toMatchObject({ corruptions: 0 });
    await expectContent(path, model);
  });
});

describe('a file whose name says QED but whose content is not', () => {
  it('fails with a message saying the name and content disagree, and opens as raw when asked', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'notqed.qed');
    const content = seededBytes(11, 64 * KiB);
    await writeFile(path, content);
    const error = await openError(path);
    expect(error).toBeInstanceOf(BlockError);
    expect(error.message).toContain('notqed.qed');
    expect(error.message).toMatch(/name/);
    expect(error.message).toMatch(/content/);
    expect(error.message).toMatch(/raw/); // says how to open it anyway

    const image = await openImage(path, { format: 'raw', readOnly: true });
    try {
      expect(image.format).toBe('raw');
      expect((await readAll(image)).equals(content)).toBe(true);
    } finally {
      await image.close();
    }
    // checkImage probes too, and must not treat the file as QED
    await expect(checkImage(path)).rejects.toBeInstanceOf(BlockError);
    expect((await readBytes(path, 0, 16)).equals(content.subarray(0, 16))).toBe(true);
  });
});
