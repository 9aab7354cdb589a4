/**
 * imgmount resize of a qcow2 image with persistent dirty bitmaps, against
 * qemu-img resize 7.2 of a copy: grown (so a bitmap table outgrows its
 * cluster and moves), shrunk across dirty bits, grown again. After each step
 * qemu-img check is clean, qemu-img compare equal, qemu-img info lists the
 * same bitmaps and size, and every bitmap holds the same bits as qemu's
 * (read here from the file: the bitmaps extension, directory, tables, data
 * clusters), so the bits past a shrink's end do not come back dirty.
 */
import { copyFile, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, patchBytes, qemuCheck, qemuCompare, qemuImg, qemuInfo, qemuIo, readBytes, run, skipWithoutQemu } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const bin = resolve(import.meta.dirname, '../bin/imgmount');
const EXT_BITMAPS = 0x23852875;

/** Every bitmap of a v3 image: name, granularity and its bits for the image's size (bit i = bit i % 8 of byte i / 8). */
async function bitmapBits(path: string): Promise<Record<string, { granularity: number; bits: string }>> {
  const head = await readBytes(path, 0, 4096);
  const clusterSize = 2 ** head.readUInt32BE(20);
  const size = Number(head.readBigUInt64BE(24));
  let at = head.readUInt32BE(100);
  let directory: { count: number; size: number; offset: number } | undefined;
  while (at + 8 <= head.length) {
    const type = head.readUInt32BE(at);
    const length = head.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === EXT_BITMAPS) directory = { count: head.readUInt32BE(at + 8), size: Number(head.readBigUInt64BE(at + 16)), offset: Number(head.readBigUInt64BE(at + 24)) };
    at += 8 + Math.ceil(length / 8) * 8;
  }
  expect(directory, 'the bitmaps extension').toBeDefined();
  const dir = await readBytes(path, directory!.offset, directory!.size);
  const result: Record<string, { granularity: number; bits: string }> = {};
  let entry = 0;
  for (let i = 0; i < directory!.count; i++) {
    const tableOffset = Number(dir.readBigUInt64BE(entry));
    const tableSize = dir.readUInt32BE(entry + 8);
    const granularity = 2 ** dir[entry + 17]!;
    const nameSize = dir.readUInt16BE(entry + 18);
    const extra = dir.readUInt32BE(entry + 20);
    const name = dir.subarray(entry + 24 + extra, entry + 24 + extra + nameSize).toString();
    entry = Math.ceil((entry + 24 + extra + nameSize) / 8) * 8;
    const bitCount = Math.ceil(size / granularity);
    const table = await readBytes(path, tableOffset, tableSize * 8);
    const bytes = Buffer.alloc(Math.ceil(bitCount / 8));
    for (let e = 0; e < tableSize; e++) {
      const value = table.readBigUInt64BE(e * 8);
      const data = Number(value & 0x00fffffffffffe00n);
      const from = e * clusterSize;
      if (from >= bytes.length) break;
      const chunk = data === 0 ? Buffer.alloc(clusterSize, value & 1n ? 0xff : 0) : await readBytes(path, data, clusterSize);
      chunk.copy(bytes, from, 0, Math.min(clusterSize, bytes.length - from));
    }
    if (bitCount % 8) bytes[bytes.length - 1]! &= (1 << (bitCount % 8)) - 1;
    // Dirty ranges as text (bit runs), so a failure shows where they differ.
    const runs: string[] = [];
    for (let bit = 0; bit < bitCount; ) {
      const set = (bytes[bit >> 3]! >> (bit & 7)) & 1;
      let end = bit + 1;
      while (end < bitCount && ((bytes[end >> 3]! >> (end & 7)) & 1) === set) end++;
      if (set) runs.push(`${bit}-${end}`);
      bit = end;
    }
    result[name] = { granularity, bits: runs.join(',') };
  }
  return result;
}

async function expectLikeQemu(ours: string, theirs: string): Promise<void> {
  const check = await qemuCheck(ours, 'qcow2');
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const compare = await qemuCompare(ours, 'qcow2', theirs, 'qcow2');
  expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  const [a, b] = [await qemuInfo(ours, 'qcow2'), await qemuInfo(theirs, 'qcow2')];
  expect(a['virtual-size']).toBe(b['virtual-size']);
  expect((a['format-specific'] as { data: { bitmaps: unknown } }).data.bitmaps).toEqual((b['format-specific'] as { data: { bitmaps: unknown } }).data.bitmaps);
  expect(await bitmapBits(ours)).toEqual(await bitmapBits(theirs));
}

async function resizeBoth(ours: string, theirs: string, size: number, shrink: boolean): Promise<void> {
  const flags = shrink ? ['--shrink'] : [];
  const result = await run(bin, ['resize', ...flags, '-f', 'qcow2', ours, String(size)]);
  expect(result.code, result.stderr).toBe(0);
  await qemuImg(['resize', '-q', ...flags, '-f', 'qcow2', theirs, String(size)]);
}

describe.skipIf(skipWithoutQemu('qcow2 resize with bitmaps'))('qcow2 resize with persistent dirty bitmaps, against qemu-img resize', () => {
  it('grows (a table moves), shrinks across dirty bits, grows again: the same bitmaps and bits as qemu', async () => {
    const dir = await makeTempDir();
    const ours = join(dir, 'ours.qcow2');
    const theirs = join(dir, 'theirs.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', ours, '64M']);
    await qemuImg(['bitmap', '--add', '-g', '512', ours, 'fine']);
    await qemuImg(['bitmap', '--add', ours, 'coarse']);
    await qemuIo(ours, ['write -q -P 1 0 1M', 'write -q -P 2 19M 2M', 'write -q -P 3 60M 4M', 'write -q -P 4 40M 512'], 'qcow2');
    await copyFile(ours, theirs);
    const before = await bitmapBits(ours);
    expect(before['fine']!.bits, 'qemu-io made the bitmap dirty').not.toBe('');

    // 10 GiB at 512-byte granularity: 640 table entries, 5 KiB, more than the table's one 4 KiB cluster.
    await resizeBoth(ours, theirs, 10 * GiB, false);
    await expectLikeQemu(ours, theirs);
    await resizeBoth(ours, theirs, 20 * MiB, true);
    await expectLikeQemu(ours, theirs);
    await resizeBoth(ours, theirs, 48 * MiB, false);
    await expectLikeQemu(ours, theirs);
    // The bits of 20-21 MiB were dropped with the shrink and stay clean.
    expect((await bitmapBits(ours))['fine']!.bits).toBe(before['fine']!.bits.split(',').filter((run) => Number(run.split('-')[0]) < 40960).map((run) => run.replace(/-(\d+)$/, (_, end: string) => `-${Math.min(Number(end), 40960)}`)).join(','));
  }, 300_000); // 12 s here alone; qemu-img compare of the 10 GiB images is slower under load

  it('refuses a bitmap marked in use (inconsistent), as qemu-img does, in one line, changing nothing', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '8M']);
    await qemuImg(['bitmap', '--add', path, 'b0']);
    // The directory's first entry: flags (u32 at +12), bit 0 in_use.
    const head = await readBytes(path, 0, 4096);
    let at = head.readUInt32BE(100);
    while (head.readUInt32BE(at) !== EXT_BITMAPS) at += 8 + Math.ceil(head.readUInt32BE(at + 4) / 8) * 8;
    const directory = Number(head.readBigUInt64BE(at + 24));
    const flags = (await readBytes(path, directory + 12, 4)).readUInt32BE(0);
    const patched = Buffer.alloc(4);
    patched.writeUInt32BE(flags | 1);
    await patchBytes(path, directory + 12, patched);
    const qemu = await run('qemu-img', ['resize', '-f', 'qcow2', path, '16M']);
    expect(qemu.code, 'qemu-img refuses it too').not.toBe(0);
    const before = await readFile(path);
    const result = await run(bin, ['resize', '-f', 'qcow2', path, '16M']);
    expect(result.code).toBe(1);
    expect(result.stderr.trim().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(/bitmap 'b0' is marked in use/);
    expect((await readFile(path)).equals(before)).toBe(true);
  });
});
