/**
 * Writing streamOptimized VMDK images (src/formats/vmdk/stream-write.ts,
 * create.ts), with qemu-img as the oracle: `imgmount create -o
 * subformat=streamOptimized` makes qemu-img create's file (byte for byte but
 * the CID); `imgmount convert` into it (with or without -c) from qcow2 and raw
 * sources gives an image qemu-img compares equal, checks clean, calls
 * streamOptimized and maps as compressed data (no host offset), which our own
 * reader reads back; grains that do not compress still round-trip; and the
 * refusals (an ordinary write, a grain out of order, a grain already written,
 * a partial grain, a plain read-write open) each say why.
 */
import { createHash } from 'node:crypto';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage, defaultFormats, openImage } from '../src/index.js';
import type { BlockImage } from '../src/index.js';
import { compare, compressedRuns, expectCheckClean, imgmount, qemuQcow2 } from './helpers/convert.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuMap, readAll, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const K = 1024;
const M = 1024 * K;
const GRAIN = 64 * K;
const TIMEOUT = { timeout: 120_000 };
const STREAM = { subformat: 'streamOptimized' };

const sha = async (path: string) => createHash('sha256').update(await readFile(path)).digest('hex');

/** The file with its descriptor's CID value blanked (the only random part of a new image). */
async function withoutCid(path: string): Promise<Buffer> {
  const file = await readFile(path);
  const descriptor = file.subarray(512, 21 * 512);
  const end = descriptor.indexOf(0);
  const text = descriptor.subarray(0, end === -1 ? descriptor.length : end).toString('latin1').replace(/^CID=[0-9a-f]+$/m, 'CID=-');
  return Buffer.concat([file.subarray(0, 512), Buffer.from(text, 'latin1'), file.subarray(21 * 512)]);
}

/** A raw source: random (incompressible) grains, zeros, text, and a short last grain of random bytes. */
async function rawSource(dir: string): Promise<string> {
  const path = join(dir, 'source.raw');
  await writeFile(path, Buffer.concat([seededBytes(7, 3 * GRAIN + 1000), Buffer.alloc(2 * M), Buffer.alloc(M, 'compressible text, '), seededBytes(8, 4608)]));
  return path;
}

/** What qemu-img says of a streamOptimized DEST converted from `source`: identical, clean, compressed data only where the source has data. */
async function expectStreamOf(source: string, format: string, dest: string, dir: string): Promise<void> {
  await compare(source, format, dest, 'vmdk');
  await expectCheckClean(dest, 'vmdk');
  const info = await qemuInfo(dest, 'vmdk');
  const data = (info['format-specific'] as { data: { 'create-type': string; extents: { compressed?: boolean }[] } }).data;
  expect(data['create-type']).toBe('streamOptimized');
  expect(data.extents[0]?.compressed).toBe(true);
  const runs = await qemuMap(dest, 'vmdk');
  const dataRuns = runs.filter((run) => run.data);
  expect(dataRuns.length).toBeGreaterThan(0);
  // every data run is compressed: qemu gives no host offset for them
  expect(compressedRuns(runs)).toEqual(dataRuns);
  // our reader reads back what qemu reads from the source
  const expected = await qemuConvertToRaw(source, dir, format);
  const image = await openImage(dest, { formats: defaultFormats, readOnly: true });
  try {
    expect((await readAll(image)).equals(expected)).toBe(true);
  } finally {
    await image.close();
  }
}

async function withStream<T>(path: string, body: (image: BlockImage) => Promise<T>): Promise<T> {
  const image = await openImage(path, { formats: defaultFormats, compressedWrites: true, idleCleanSeconds: 0 });
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

const refusal = (promise: Promise<unknown>): Promise<Error & { errno?: number }> => promise.then(() => new Error('no refusal'), (error: unknown) => error as Error & { errno?: number });

describe.skipIf(skipWithoutQemu('vmdk streamOptimized writes'))('vmdk streamOptimized writes', () => {
  it('imgmount create -o subformat=streamOptimized makes the file qemu-img create makes (but the CID): version 3, compressed and marker flags, deflate, tables preallocated', TIMEOUT, async () => {
    const ours = await makeTempDir();
    const theirs = await makeTempDir();
    const cases: [string, string[]][] = [
      ['100M', []],
      ['3G', []], // 96 grain tables
      ['1000000', []], // not a multiple of the grain (nor of a sector)
      ['5M', ['-o', 'adapter_type=lsilogic,zeroed_grain=on,hwversion=6']],
    ];
    for (const [size, extra] of cases) {
      const mine = join(ours, 'disk.vmdk');
      const qemu = join(theirs, 'disk.vmdk');
      const options = ['-o', 'subformat=streamOptimized', ...extra];
      await Promise.all([rm(mine, { force: true }), rm(qemu, { force: true })]);
      const made = await imgmount('create', '-f', 'vmdk', ...options, mine, size);
      expect(made.code, made.stderr).toBe(0);
      await qemuImg(['create', '-q', '-f', 'vmdk', ...options, qemu, size]);
      const [a, b] = [await withoutCid(mine), await withoutCid(qemu)];
      expect(a.length, `${size} ${extra.join(' ')}`).toBe(b.length);
      expect(a.equals(b), `${size} ${extra.join(' ')}`).toBe(true);
      const header = await readFile(mine);
      expect([header.readUInt32LE(4), header.readUInt32LE(8).toString(16), header.readUInt16LE(77)]).toEqual([3, extra.length ? '30007' : '30003', 1]);
      await expectCheckClean(mine, 'vmdk');
      const info = await qemuInfo(mine, 'vmdk');
      expect((info['format-specific'] as { data: Record<string, unknown> }).data['create-type']).toBe('streamOptimized');
    }
  });

  it('convert -c from qcow2 (data, zeros written as data, a zero cluster, holes) and from raw (random grains, zeros, text, a short last grain): qemu-img compare / check / info / map agree, we read it back', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const qcow2 = await qemuQcow2(dir);
    const raw = await rawSource(dir);
    for (const [source, format] of [[qcow2, 'qcow2'], [raw, 'raw']] as const) {
      const dest = join(dir, `${format}.vmdk`);
      await convertImage(source, dest, { formats: defaultFormats, sourceFormat: format, targetFormat: 'vmdk', options: STREAM, compress: true });
      await expectStreamOf(source, format, dest, dir);
    }
    // the qcow2's holes, its zero cluster and its 1 MiB of written zeros are no grains: qemu maps them unallocated
    const map = await qemuMap(join(dir, 'qcow2.vmdk'), 'vmdk');
    expect(map.filter((run) => run.data).map((run) => [run.start, run.start + run.length])).toEqual([[M, 4 * M], [15 * M, 15 * M + 128 * K]]);
  });

  it('convert without -c into streamOptimized compresses too (qemu-img does: the format is always compressed); the CLI does the same', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const raw = await rawSource(dir);
    const dest = join(dir, 'plain.vmdk');
    await convertImage(raw, dest, { formats: defaultFormats, sourceFormat: 'raw', targetFormat: 'vmdk', options: STREAM });
    await expectStreamOf(raw, 'raw', dest, dir);
    const cli = join(dir, 'cli.vmdk');
    const result = await imgmount('convert', '-c', '-f', 'qcow2', '-O', 'vmdk', '-o', 'subformat=streamOptimized', await qemuQcow2(dir), cli);
    expect(result.code, result.stderr).toBe(0);
    await expectStreamOf(join(dir, 'src.qcow2'), 'qcow2', cli, dir);
  });

  it('grains that do not compress: each record (marker + zlib data) is longer than a grain and still reads back, in qemu and here', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const source = join(dir, 'random.raw');
    await writeFile(source, seededBytes(99, 8 * GRAIN));
    const dest = join(dir, 'random.vmdk');
    await convertImage(source, dest, { formats: defaultFormats, sourceFormat: 'raw', targetFormat: 'vmdk', options: STREAM, compress: true });
    await expectStreamOf(source, 'raw', dest, dir);
    const file = await readFile(dest);
    const table = file.readUInt32LE(Number(file.readBigUInt64LE(56)) * 512) * 512;
    const sectors = Array.from({ length: 8 }, (_, i) => file.readUInt32LE(table + 4 * i));
    for (let i = 1; i < 8; i++) expect(sectors[i]! - sectors[i - 1]!, `grain ${i}`).toBeGreaterThan(GRAIN / 512);
    expect(file.readBigUInt64LE(sectors[3]! * 512), 'the marker names the grain by its guest sector').toBe(BigInt((3 * GRAIN) / 512));
  });

  it('refusals, one line each, leaving the image valid: an ordinary write, a zero, a partial grain, a grain out of order, a grain already written, a plain read-write open', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 's.vmdk');
    expect((await imgmount('create', '-f', 'vmdk', '-o', 'subformat=streamOptimized', path, '1M')).code).toBe(0);
    const created = await sha(path);
    const grain = Buffer.alloc(GRAIN, 'grain two ');
    await withStream(path, async (image) => {
      const write = await refusal(image.write(0, Buffer.alloc(512, 1)));
      expect(write.message).toBe(`${path}: a streamOptimized VMDK image takes only whole compressed grains in increasing order (imgmount convert -c); ordinary writes are refused`);
      expect(write.errno).toBe(30); // EROFS
      expect((await refusal(image.zero(0, GRAIN))).message).toMatch(/streamOptimized VMDK image takes only whole compressed grains .*; zero requests are refused$/);
      expect((await refusal(image.writeCompressed(GRAIN + 512, Buffer.alloc(GRAIN)))).message).toMatch(/a compressed VMDK write must cover one whole grain \(65536 bytes at a multiple of it, less only at the end\), not 65536 bytes at 66048$/);
      expect(await sha(path), 'refusals change nothing').toBe(created);
      await image.writeCompressed(2 * GRAIN, grain);
      expect((await refusal(image.writeCompressed(GRAIN, grain))).message).toBe(
        `${path}: the grain at guest offset ${GRAIN} comes after the one at ${2 * GRAIN}: a streamOptimized VMDK image takes grains in increasing guest order only`,
      );
    });
    const written = await sha(path);
    await withStream(path, async (image) => {
      expect((await refusal(image.writeCompressed(2 * GRAIN, grain))).message).toMatch(/: the grain at guest offset 131072 is already written \(sector \d+\); a streamOptimized VMDK grain is written only once$/);
      await image.writeCompressed(15 * GRAIN, Buffer.alloc(GRAIN, 'last grain ')); // a later grain still goes
    });
    expect(await sha(path)).not.toBe(written);
    await expectCheckClean(path, 'vmdk');
    const expected = Buffer.alloc(M);
    grain.copy(expected, 2 * GRAIN);
    Buffer.alloc(GRAIN, 'last grain ').copy(expected, 15 * GRAIN);
    expect((await qemuConvertToRaw(path, dir, 'vmdk')).equals(expected)).toBe(true);
    // a read-write open by anyone but convert: read-only, saying why
    const notices: string[] = [];
    const before = await sha(path);
    const plain = await openImage(path, { formats: defaultFormats, notice: (line) => notices.push(line), idleCleanSeconds: 0 });
    try {
      expect(plain.readOnly).toBe(true);
      expect(notices).toEqual([`${path}: opened read-only: a stream-optimized VMDK image takes only whole compressed grains in increasing order, which only imgmount convert writes`]);
    } finally {
      await plain.close();
    }
    expect(await sha(path)).toBe(before);
    // convert -n into a stream would have to overwrite or zero grains: refused before anything is written
    const source = join(dir, 'one.raw');
    await writeFile(source, Buffer.alloc(M, 1));
    await expect(convertImage(source, path, { formats: defaultFormats, sourceFormat: 'raw', targetFormat: 'vmdk', existing: true })).rejects.toThrow(
      `convert -n: ${path} takes only compressed clusters written once, in order (a vmdk stream); convert into a new DEST instead`,
    );
    expect(await sha(path)).toBe(before);
  });
});
