/**
 * Every qcow2 header check, on images qemu-img made and then patched: each
 * bad field is refused at open with a message naming the field and value,
 * and nothing is read from a table that lies outside the file. Features we
 * do not support (encryption, unknown incompatible bits) are refused by name;
 * dirty and corrupt images open read-only.
 */
import { stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, openImage, UnsupportedFeatureError } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, readAll, run, skipWithoutQemu } from './helpers/qemu.js';
import { QCOW2, readAt, readBE64, writeAt, writeBE32, writeBE64 } from './helpers/qcow2-layout.js';

const MiB = 1024 * 1024;

async function qcow2Image(options = 'compat=1.1', size = 4 * MiB): Promise<{ dir: string; path: string }> {
  const dir = await makeTempDir();
  const path = join(dir, 'disk.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, path, String(size)]);
  await qemuIo(path, ['write -P 0x5a 0 128k', 'write -P 0x6b 1M 64k'], 'qcow2');
  return { dir, path };
}

async function openError(path: string): Promise<BlockError> {
  const error = await openImage(path, { readOnly: true }).then(
    async (image) => {
      await image.close();
      throw new Error(`${path} opened, but it should have been refused`);
    },
    (caught: unknown) => caught,
  );
  expect(error).toBeInstanceOf(BlockError);
  expect((error as Error).message).not.toMatch(/\n/);
  return error as BlockError;
}

describe.skipIf(skipWithoutQemu('qcow2 header checks'))('qcow2 header checks', () => {
  it('a read-write open that writes nothing leaves the file byte-identical (no header write)', async () => {
    const { dir, path } = await qcow2Image();
    const before = await readAt(path, 0, (await stat(path)).size);
    const reference = await qemuConvertToRaw(path, dir, 'qcow2');
    const notices: string[] = [];
    const image = await openImage(path, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(image.readOnly).toBe(false);
      expect(notices).toEqual([]);
      expect((await readAll(image)).equals(reference)).toBe(true);
      await image.flush();
    } finally {
      await image.close();
    }
    expect((await stat(path)).size).toBe(before.length);
    expect((await readAt(path, 0, before.length)).equals(before)).toBe(true);
  });

  it.each([
    ['version 4', QCOW2.version, 4, /qcow2 version 4 is not supported/],
    ['cluster_bits 8', QCOW2.clusterBits, 8, /cluster_bits 8 is outside \[9, 21\]/],
    ['cluster_bits 22', QCOW2.clusterBits, 22, /cluster_bits 22 is outside \[9, 21\]/],
    ['l1_size too small', QCOW2.l1Size, 0, /l1_size 0 is too small for the virtual size 4194304/],
    ['l1_size above 32 MiB', QCOW2.l1Size, 5 * MiB, /l1_size 5242880 is above 4194304/],
    ['refcount_table_clusters 0', QCOW2.refcountTableClusters, 0, /refcount_table_clusters is 0/],
    ['refcount_table_clusters huge', QCOW2.refcountTableClusters, 1 << 20, /refcount_table_clusters 1048576 is above/],
    ['nb_snapshots above 65536', QCOW2.nbSnapshots, 70000, /nb_snapshots 70000 is above 65536/],
    ['refcount_order 7', QCOW2.refcountOrder, 7, /refcount_order 7 is outside \[0, 6\]/],
    ['header_length 96', QCOW2.headerLength, 96, /header_length 96 is not a multiple of 8 in \[104, 65536\]/],
    ['header_length past the cluster', QCOW2.headerLength, 70000, /header_length 70000/],
    ['backing_file_size 2000 (with an offset)', QCOW2.backingFileSize, 2000, /backing_file_size 2000 is outside \[1, 1023\]/, true],
  ])('refuses %s', async (_name, field, value, message, withBackingOffset = false) => {
    const { path } = await qcow2Image();
    if (withBackingOffset) await writeBE64(path, QCOW2.backingFileOffset, 512n);
    await writeBE32(path, field, value);
    const error = await openError(path);
    expect(error.message).toMatch(message);
    expect(error.message).toContain(path);
  });

  it.each([
    ['size above 2^53', QCOW2.size, 1n << 60n, /size 1152921504606846976 is above 2\^53/],
    ['an unaligned L1 table', QCOW2.l1TableOffset, 0x30200n, /l1_table_offset 197120 is not aligned to the cluster size 65536/],
    ['an L1 table in the header cluster', QCOW2.l1TableOffset, 0n, /l1_table_offset 0 points into the header cluster/],
    ['an L1 table past the end of the file (qemu reads zeros there; we refuse)', QCOW2.l1TableOffset, 1n << 30n, /l1_table_offset 1073741824 \(\+8 bytes\) lies outside the file/],
    ['a refcount table past the end of the file', QCOW2.refcountTableOffset, 1n << 30n, /refcount_table_offset 1073741824 .* lies outside the file/],
    ['a refcount table offset above 2^53', QCOW2.refcountTableOffset, 1n << 56n, /refcount_table_offset 72057594037927936 is above 2\^53/],
  ])('refuses %s', async (_name, field, value, message) => {
    const { path } = await qcow2Image();
    await writeBE64(path, field, value);
    expect((await openError(path)).message).toMatch(message);
  });

  it('refuses a snapshot table outside the file', async () => {
    const { path } = await qcow2Image();
    await writeBE32(path, QCOW2.nbSnapshots, 1);
    await writeBE64(path, QCOW2.snapshotsOffset, 1n << 30n);
    expect((await openError(path)).message).toMatch(/snapshots_offset 1073741824 lies outside the file/);
  });

  it('refuses a backing file name outside the header cluster', async () => {
    const { path } = await qcow2Image();
    await writeBE64(path, QCOW2.backingFileOffset, 65530n);
    await writeBE32(path, QCOW2.backingFileSize, 100);
    expect((await openError(path)).message).toMatch(/backing file name .* does not lie in the header cluster/);
  });

  it('refuses an unknown compression type', async () => {
    const { path } = await qcow2Image();
    await writeBE64(path, QCOW2.incompatibleFeatures, 1n << 3n);
    await writeAt(path, QCOW2.compressionType, Buffer.from([7]));
    const error = await openError(path);
    expect(error).toBeInstanceOf(UnsupportedFeatureError);
    expect(error.message).toMatch(/compression_type 7 is unknown/);
  });

  it('refuses unknown incompatible features, naming each bit (from the feature name table when the image has one)', async () => {
    const { path } = await qcow2Image();
    await writeBE64(path, QCOW2.incompatibleFeatures, (1n << 10n) | (1n << 40n));
    let error = await openError(path);
    expect(error).toBeInstanceOf(UnsupportedFeatureError);
    expect(error.message).toMatch(/unknown incompatible features: bit 10, bit 40/);
    // qemu writes a feature name table; give one of its entries bit 10 and a name of our own.
    const first = await readAt(path, 0, 65536);
    const table = first.indexOf(Buffer.from([0x68, 0x03, 0xf8, 0x57]));
    expect(table).toBeGreaterThan(0);
    const entry = table + 8;
    await writeAt(path, entry, Buffer.concat([Buffer.from([0, 10]), Buffer.from('frobnicated clusters'.padEnd(46, '\0'))]));
    error = await openError(path);
    expect(error.message).toMatch(/bit 10 \(frobnicated clusters\), bit 40/);
  });

  it('refuses encrypted images by name (LUKS made by qemu-img, AES by header)', async () => {
    const dir = await makeTempDir();
    const luks = join(dir, 'luks.qcow2');
    await qemuImg(['create', '-q', '--object', 'secret,id=sec0,data=passw0rd', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', luks, '4M']);
    expect((await openError(luks)).message).toMatch(/encrypted qcow2 images \(LUKS\) are not supported/);
    const { path } = await qcow2Image();
    await writeBE32(path, QCOW2.cryptMethod, 1);
    expect((await openError(path)).message).toMatch(/encrypted qcow2 images \(AES\) are not supported/);
  }, 30_000);

  it('refuses qcow2 that names a data file bit without a name', async () => {
    const { path } = await qcow2Image();
    await writeBE64(path, QCOW2.incompatibleFeatures, 1n << 2n);
    expect((await openError(path)).message).toMatch(/external data file but does not name it/);
  });

  it('an image left dirty (lazy refcounts): a read-only open changes nothing and reports the flag as qemu-img does; a read-write open repairs it and says so', async () => {
    const { dir, path } = await qcow2Image('compat=1.1,lazy_refcounts=on');
    const reference = await qemuConvertToRaw(path, dir, 'qcow2');
    await writeBE64(path, QCOW2.incompatibleFeatures, 1n);
    const before = await readAt(path, 0, (await stat(path)).size);
    expect((await qemuInfo(path))['dirty-flag']).toBe(true);
    const readOnly = await openImage(path, { readOnly: true });
    try {
      expect((await readOnly.info()).dirty).toBe(true);
      expect((await readAll(readOnly)).equals(reference)).toBe(true);
    } finally {
      await readOnly.close();
    }
    expect((await readAt(path, 0, before.length)).equals(before)).toBe(true);

    const notices: string[] = [];
    const image = await openImage(path, { notice: (line) => notices.push(line) });
    try {
      expect(image.readOnly).toBe(false);
      expect(notices.join('\n')).toMatch(/was not closed cleanly \(dirty bit set, lazy refcounts\); refcounts checked and repaired/);
      expect((await image.info()).dirty).toBe(false);
      expect((await readAll(image)).equals(reference)).toBe(true);
    } finally {
      await image.close();
    }
    expect((await qemuInfo(path))['dirty-flag']).toBe(false);
    const check = await run('qemu-img', ['check', path]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  });

  it('opens an image marked corrupt read-only, with a notice, and says so in info', async () => {
    const { dir, path } = await qcow2Image();
    const reference = await qemuConvertToRaw(path, dir, 'qcow2');
    await writeBE64(path, QCOW2.incompatibleFeatures, 1n << 1n);
    const notices: string[] = [];
    const image = await openImage(path, { readOnly: false, notice: (line) => notices.push(line) });
    try {
      expect(image.readOnly).toBe(true);
      expect(notices.join('\n')).toMatch(/marked corrupt; it is opened read-only/);
      const info = await image.info();
      expect(info.formatSpecific?.corrupt).toBe(true);
      expect((await readAll(image)).equals(reference)).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('reads an image whose file was cut inside its last data cluster: the missing bytes read as zeros, as in qemu', async () => {
    const { dir, path } = await qcow2Image();
    const size = (await stat(path)).size;
    const l1 = Number(await readBE64(path, QCOW2.l1TableOffset));
    expect(l1).toBeGreaterThan(0);
    await truncate(path, size - 100);
    const image = await openImage(path, { readOnly: true });
    try {
      expect((await readAll(image)).equals(await qemuConvertToRaw(path, dir, 'qcow2'))).toBe(true);
    } finally {
      await image.close();
    }
  });
});
