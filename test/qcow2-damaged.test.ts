/**
 * Damaged qcow2 images: an L2 entry that is unaligned, points past the end
 * of the file or into metadata, an L1 entry outside the file, a compressed
 * cluster outside the file or that does not decode, an impossible subcluster
 * bitmap. Each fails with EIO for the damaged range only; every other byte
 * reads as qemu-img read it before the damage, and nothing crashes or hangs.
 * A compressed cluster whose last sector runs past the end of the file is
 * legal and reads.
 */
import { stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { CorruptImageError, openImage, type BlockImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { l2EntryLocation, QCOW2, readAt, readBE64, writeAt, writeBE64 } from './helpers/qcow2-layout.js';
import { writeFile } from 'node:fs/promises';

const KiB = 1024;
const MiB = 1024 * 1024;
const EIO = constants.errno.EIO;

/** A 4 MiB qcow2 (64 KiB clusters unless given) with data in every cluster of its first 2 MiB, and its raw content. */
async function damagedCandidate(options = 'cluster_size=65536'): Promise<{ dir: string; path: string; reference: Buffer }> {
  const dir = await makeTempDir();
  const path = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, path, '4M']);
  await qemuIo(path, ['write -P 0x11 0 2M', 'write -P 0x22 3M 64k'], 'qcow2');
  return { dir, path, reference: await qemuConvertToRaw(path, dir, 'qcow2') };
}

/** Reads [offset, offset + length) expecting EIO from a CorruptImageError with a one-line message. */
async function expectEio(image: BlockImage, offset: number, length: number): Promise<CorruptImageError> {
  const error = await image.read(offset, Buffer.alloc(length)).then(
    () => {
      throw new Error(`read of ${length} at ${offset} succeeded on damaged metadata`);
    },
    (caught: unknown) => caught,
  );
  expect(error).toBeInstanceOf(CorruptImageError);
  expect((error as CorruptImageError).errno).toBe(EIO);
  expect((error as Error).message).not.toMatch(/\n/);
  return error as CorruptImageError;
}

/** Every cluster of the image outside [badStart, badEnd) reads like the reference. */
async function expectRestIntact(image: BlockImage, reference: Buffer, badStart: number, badEnd: number, chunk = 64 * KiB): Promise<void> {
  for (let offset = 0; offset < image.length; offset += chunk) {
    const end = Math.min(image.length, offset + chunk);
    if (offset < badEnd && end > badStart) continue;
    const buffer = Buffer.alloc(end - offset);
    await image.read(offset, buffer);
    expect(buffer.equals(reference.subarray(offset, end)), `bytes ${offset}..${end}`).toBe(true);
  }
}

async function patchL2Entry(path: string, guestOffset: number, change: (entry: bigint) => bigint, extendedL2 = false): Promise<void> {
  const { l2EntryOffset } = await l2EntryLocation(path, guestOffset, extendedL2);
  await writeBE64(path, l2EntryOffset, change(await readBE64(path, l2EntryOffset)));
}

describe.skipIf(skipWithoutQemu('damaged qcow2 images'))('damaged qcow2 images', () => {
  it('an unaligned L2 entry fails its cluster with EIO; the rest reads', async () => {
    const { path, reference } = await damagedCandidate();
    await patchL2Entry(path, 128 * KiB, (entry) => entry + 512n);
    const image = await openImage(path);
    try {
      const error = await expectEio(image, 128 * KiB + 100, 4 * KiB);
      expect(error.message).toMatch(/guest offset 131072 .* not aligned/);
      await expectRestIntact(image, reference, 128 * KiB, 192 * KiB);
    } finally {
      await image.close();
    }
  });

  it('an L2 entry past the end of the file fails with EIO, and nothing is read there', async () => {
    const { path, reference } = await damagedCandidate();
    await patchL2Entry(path, 64 * KiB, (entry) => (entry & 0xff00000000000000n) | (1n << 40n));
    const image = await openImage(path);
    try {
      expect((await expectEio(image, 64 * KiB, 64 * KiB)).message).toMatch(/past the end of the file/);
      await expectRestIntact(image, reference, 64 * KiB, 128 * KiB);
    } finally {
      await image.close();
    }
  });

  it.each([
    ['the L1 table', async (path: string) => readBE64(path, QCOW2.l1TableOffset)],
    ['the refcount table', async (path: string) => readBE64(path, QCOW2.refcountTableOffset)],
    ['its own L2 table', async (path: string) => BigInt((await l2EntryLocation(path, 0)).l2Offset)],
  ])('an L2 entry pointing into %s fails with EIO instead of showing metadata as data', async (_what, target) => {
    const { path, reference } = await damagedCandidate();
    const pointer = await target(path);
    expect(pointer).toBeGreaterThan(0n);
    await patchL2Entry(path, 256 * KiB, (entry) => (entry & 0xff00000000000000n) | pointer);
    const image = await openImage(path);
    try {
      expect((await expectEio(image, 256 * KiB, 512)).message).toMatch(/holds the image's metadata/);
      await expectRestIntact(image, reference, 256 * KiB, 320 * KiB);
    } finally {
      await image.close();
    }
  });

  it('an L1 entry outside the file fails its L2 range only', async () => {
    // 4 KiB clusters: one L2 table covers 2 MiB, so the image has two L1 entries in use.
    const { path, reference } = await damagedCandidate('cluster_size=4096');
    const { l1EntryOffset } = await l2EntryLocation(path, 0);
    await writeBE64(path, l1EntryOffset, (1n << 63n) | (1n << 40n));
    const image = await openImage(path);
    try {
      expect((await expectEio(image, 5000, 100)).message).toMatch(/L1 entry 0 .* unaligned or outside the file/);
      await expectRestIntact(image, reference, 0, 2 * MiB);
    } finally {
      await image.close();
    }
  });

  async function compressedImage(): Promise<{ dir: string; path: string; reference: Buffer }> {
    const dir = await makeTempDir();
    const source = join(dir, 'source.raw');
    const text = Buffer.from('compressible text for a compressed qcow2 cluster\n'.repeat(30_000)).subarray(0, MiB);
    await writeFile(source, Buffer.concat([text, seededBytes(7, MiB)]));
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', source, path]);
    return { dir, path, reference: await qemuConvertToRaw(path, dir, 'qcow2') };
  }

  const COMPRESSED_FLAG = 1n << 62n;
  const COMPRESSED_OFFSET_MASK = (1n << 54n) - 1n; // 64 KiB clusters: 62 - (16 - 8) offset bits

  it('a compressed cluster that starts outside the file fails with EIO', async () => {
    const { path, reference } = await compressedImage();
    await patchL2Entry(path, 64 * KiB, (entry) => {
      expect(entry & COMPRESSED_FLAG).toBe(COMPRESSED_FLAG);
      return (entry & ~COMPRESSED_OFFSET_MASK) | (1n << 35n);
    });
    const image = await openImage(path);
    try {
      expect((await expectEio(image, 64 * KiB, 4 * KiB)).message).toMatch(/compressed at 34359738368, past the end of the file/);
      await expectRestIntact(image, reference, 64 * KiB, 128 * KiB);
    } finally {
      await image.close();
    }
  });

  it('a compressed cluster that does not decode fails with EIO, every time, and its neighbours read', async () => {
    const { path, reference } = await compressedImage();
    const { l2EntryOffset } = await l2EntryLocation(path, 3 * 64 * KiB);
    const hostOffset = Number((await readBE64(path, l2EntryOffset)) & COMPRESSED_OFFSET_MASK);
    await writeAt(path, hostOffset, seededBytes(99, 200));
    const image = await openImage(path);
    try {
      for (let attempt = 0; attempt < 2; attempt++) {
        expect((await expectEio(image, 3 * 64 * KiB + 10, 4 * KiB)).message).toMatch(/compressed cluster for guest offset 196608/);
      }
      await expectRestIntact(image, reference, 3 * 64 * KiB, 4 * 64 * KiB, 4 * KiB);
    } finally {
      await image.close();
    }
  });

  it('a compressed cluster whose last sector runs past the end of the file is legal and reads', async () => {
    const dir = await makeTempDir();
    const source = join(dir, 'source.raw');
    await writeFile(source, Buffer.from('the last compressed cluster ends the file\n'.repeat(5000)).subarray(0, 4 * 64 * KiB));
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', source, path]);
    const reference = await qemuConvertToRaw(path, dir, 'qcow2');
    const last = await readBE64(path, (await l2EntryLocation(path, 3 * 64 * KiB)).l2EntryOffset);
    const previous = await readBE64(path, (await l2EntryLocation(path, 2 * 64 * KiB)).l2EntryOffset);
    const lastOffset = Number(last & COMPRESSED_OFFSET_MASK);
    const streamBytes = lastOffset - Number(previous & COMPRESSED_OFFSET_MASK); // qemu packs them back to back
    expect(lastOffset + streamBytes).toBeLessThanOrEqual((await stat(path)).size);
    await truncate(path, lastOffset + streamBytes + 3);
    expect((lastOffset + streamBytes + 3) % 512).not.toBe(0);
    const image = await openImage(path);
    try {
      const all = Buffer.alloc(image.length);
      await image.read(0, all);
      expect(all.equals(reference)).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('an extended L2 entry with a subcluster both allocated and zero fails that subcluster only', async () => {
    const { path, reference } = await damagedCandidate('cluster_size=65536,extended_l2=on');
    const { l2EntryOffset } = await l2EntryLocation(path, 0, true);
    const bitmap = await readBE64(path, l2EntryOffset + 8);
    expect(bitmap & 0xffffffffn).toBe(0xffffffffn); // all 32 subclusters allocated
    await writeBE64(path, l2EntryOffset + 8, bitmap | (1n << (32n + 5n))); // subcluster 5 also "zero"
    const image = await openImage(path);
    try {
      const sub = 2 * KiB;
      expect((await expectEio(image, 5 * sub, sub)).message).toMatch(/impossible subcluster bitmap/);
      await expectRestIntact(image, reference, 5 * sub, 6 * sub, sub);
    } finally {
      await image.close();
    }
  });

  it('a header that qemu-img itself reads is never written by a read-only open', async () => {
    const { path } = await damagedCandidate();
    const before = await readAt(path, 0, (await stat(path)).size);
    const image = await openImage(path, { readOnly: false });
    await image.read(0, Buffer.alloc(MiB));
    await image.close();
    expect((await readAt(path, 0, before.length)).equals(before)).toBe(true);
  });
});
