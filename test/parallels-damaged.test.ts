/**
 * Damaged Parallels images, from images qemu-img made: each header field
 * qemu's block/parallels.c checks (CVE-2014-0142: tracks 0; the catalog size
 * bounds) is refused at open naming the field, its value and the allowed
 * range, and qemu-img refuses the same images; so is a damaged format
 * extension (checksum, unknown feature, flags, a dirty bitmap that does not
 * fit the disk). A catalog entry or data_off past the end of the file is
 * refused too, as qemu 8 does (qemu 7.2 reads zeros there). `check` counts what `qemu-img check -f parallels` counts on
 * clean, in-use, leaking, fragmented and out-of-image images. Seeded random
 * damage of the header and catalog never crashes, hangs or reads out of
 * bounds, and what both read agrees with qemu-img.
 */
import { createHash } from 'node:crypto';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, checkImage, CorruptImageError, openImage } from '../src/index.js';
import { addDirtyBitmapExtension, toV1 } from './helpers/formats-parallels.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, run, skipWithoutQemu } from './helpers/qemu.js';
import { fuzzDamage, le32, le64, patchedCopy } from './helpers/small-fuzz.js';
import { openRefusal } from './helpers/refusal.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TIMEOUT = { timeout: 120_000 };
const MAX_TRACKS = Math.floor(0x7fffffff / 513);

/** A 4 MiB parallels image (64 KiB clusters, 64 BAT entries) with data in clusters 0, 16 and 48. */
async function candidate(options = 'cluster_size=65536'): Promise<{ dir: string; path: string }> {
  const dir = await makeTempDir();
  const path = join(dir, 'disk.hdd');
  await qemuImg(['create', '-q', '-f', 'parallels', '-o', options, path, '4M']);
  await qemuIo(path, ['write -P 0x11 0 64k', 'write -P 0x22 1M 8k', 'write -P 0x33 3M 12k'], 'parallels');
  return { dir, path };
}

function refusal(path: string): Promise<BlockError> {
  return openRefusal(path, 'parallels');
}

async function qemuRefuses(path: string): Promise<boolean> {
  return (await run('qemu-img', ['convert', '-f', 'parallels', '-O', 'raw', path, `${path}.raw`])).code !== 0;
}

/** Rewrites the extension cluster at ext_off with `change`, then its MD5 (unless `keepSum`). */
async function changeExtension(path: string, change: (ext: Buffer) => void, keepSum = false): Promise<void> {
  const file = await readFile(path);
  const clusterSize = file.readUInt32LE(28) * 512;
  const at = Number(file.readBigUInt64LE(56)) * 512;
  const ext = file.subarray(at, at + clusterSize);
  change(ext);
  if (!keepSum) createHash('md5').update(ext.subarray(24)).digest().copy(ext, 8);
  await writeFile(path, file);
}

/** qemu-img check --output=json's counts, with zeros for the keys it leaves out. */
async function qemuCheckCounts(path: string): Promise<{ code: number; counts: Record<string, number>; messages: string[] }> {
  const result = await run('qemu-img', ['check', '-f', 'parallels', '--output=json', path]);
  const json = JSON.parse(result.stdout) as Record<string, number>;
  const keys = ['corruptions', 'leaks', 'image-end-offset', 'total-clusters', 'allocated-clusters', 'fragmented-clusters'];
  const messages = result.stderr.split('\n').filter((line) => line !== '');
  return { code: result.code, counts: Object.fromEntries(keys.map((key) => [key, json[key] ?? 0])), messages };
}

async function ourCheckCounts(path: string): Promise<{ counts: Record<string, number>; messages: string[] }> {
  const report = (await checkImage(path, { format: 'parallels' })) as Awaited<ReturnType<typeof checkImage>> & { fragmentedClusters?: number };
  const counts = {
    corruptions: report.corruptions,
    leaks: report.leaks,
    'image-end-offset': report.imageEndOffset ?? 0,
    'total-clusters': report.totalClusters ?? 0,
    'allocated-clusters': report.allocatedClusters ?? 0,
    'fragmented-clusters': report.fragmentedClusters ?? 0,
  };
  return { counts, messages: report.messages };
}

describe.skipIf(skipWithoutQemu('damaged parallels images'))('damaged parallels images', () => {
  // [name, patches, message, qemu refuses it too]
  const headerCases: Array<[string, Array<[number, Buffer]>, string, boolean]> = [
    ['tracks 0 (CVE-2014-0142: a division by zero)', [[28, le32(0)]], `parallels tracks (sectors per cluster) 0 is not in [1, ${MAX_TRACKS}]`, true],
    ['tracks too big', [[28, le32(MAX_TRACKS + 1)]], `parallels tracks (sectors per cluster) ${MAX_TRACKS + 1} is not in [1, ${MAX_TRACKS}]`, true],
    ['bat_entries above INT_MAX / 4', [[32, le32(0x20000000)]], 'parallels bat_entries 536870912 is not in [0, 536870911]', true],
    ['bat_entries past the end of the file', [[32, le32(10_000_000)]], 'parallels bat_entries 10000000 puts the 40000000-byte catalog past the end of the', false],
    ['version 3', [[16, le32(3)]], 'parallels version 3 is not 2', true],
    ['magic', [[0, Buffer.from('WithoutFreeSpacX', 'latin1')]], 'parallels magic "WithoutFreeSpacX" is not "WithoutFreeSpace" or "WithouFreSpacExt"', true],
    ['nb_sectors 2^62', [[36, le64(1n << 62n)]], 'parallels nb_sectors 4611686018427387904 is above the largest supported size 2^53-1 bytes', false],
    ['data_off past the end of the file', [[48, le32(0xffffffff)]], 'parallels data_off 4294967295 (sectors) is past the end of the', false],
    ['a BAT entry past the end of the file', [[64 + 4 * 16, le32(1000)]], 'parallels BAT entry 16 (guest bytes 1048576..) points to sector 128000, whose 65536-byte cluster ends past the end of the', false],
    ['ext_off past the end of the file', [[56, le64(1n << 30n)]], 'parallels ext_off 1073741824 (sectors) puts the 65536-byte format extension past the end of the', true],
  ];

  it.each(headerCases)('%s is refused at open, naming the field and the allowed range', TIMEOUT, async (_name, patches, message, qemuToo) => {
    const { dir, path } = await candidate();
    const damaged = await patchedCopy(path, dir, 'damaged.hdd', patches);
    const error = await refusal(damaged);
    expect(error).toBeInstanceOf(CorruptImageError);
    expect(error.message).toContain(`${damaged}: ${message}`);
    if (qemuToo) expect(await qemuRefuses(damaged)).toBe(true);
  });

  const extensionCases: Array<[string, (ext: Buffer) => void, boolean, string]> = [
    ['a wrong checksum', (ext) => (ext[100] = 0x55), true, 'is not the MD5 of the cluster'],
    ['a wrong magic', (ext) => ext.writeBigUInt64LE(1n, 0), false, 'parallels format extension: magic 0x1 is not 0xab234cef23dcea87'],
    ['an unknown feature', (ext) => ext.writeBigUInt64LE(0x1234n, 24), false, 'parallels format extension: unknown feature 0x1234'],
    ['feature flags', (ext) => ext.writeBigUInt64LE(1n, 32), false, 'has flags 0x1; no flags are supported'],
    ['a feature data_size past the cluster', (ext) => ext.writeUInt32LE(70000, 40), false, 'data_size 70000 is not in [0, 65488]'],
    ['a bitmap size that is not the disk size', (ext) => ext.writeBigUInt64LE(77n, 48), false, 'size 77 (sectors) is not the disk size 8192'],
    ['a bitmap l1_size that does not match', (ext) => ext.writeUInt32LE(0, 76), false, 'l1_size 0 does not match its size and granularity (expected 1)'],
    ['a bitmap l1_size past its data', (ext) => ext.writeUInt32LE(2, 76), false, 'l1_size 2 is not in [0, 1] (its data_size)'],
  ];

  it.each(extensionCases)('a format extension with %s is refused, as qemu-img refuses it', TIMEOUT, async (_name, change, keepSum, message) => {
    const { dir, path } = await candidate();
    await addDirtyBitmapExtension(path);
    const reference = await qemuConvertToRaw(path, dir, 'parallels');
    const image = await openImage(path, { format: 'parallels' });
    const bytes = Buffer.alloc(image.length);
    await image.read(0, bytes);
    await image.close();
    expect(bytes.equals(reference)).toBe(true);
    const damaged = await patchedCopy(path, dir, 'damaged.hdd', []);
    await changeExtension(damaged, change, keepSum);
    expect((await refusal(damaged)).message).toContain(message);
    expect(await qemuRefuses(damaged)).toBe(true);
  });

  it('a v1 BAT entry on the catalog fails the reads of its cluster only (qemu would show the catalog as data)', TIMEOUT, async () => {
    const { dir, path } = await candidate('cluster_size=4096');
    await toV1(path);
    const reference = await qemuConvertToRaw(path, dir, 'parallels');
    const damaged = await patchedCopy(path, dir, 'on-bat.hdd', [[64 + 4 * 5, le32(1)]]);
    const image = await openImage(damaged, { format: 'parallels' });
    try {
      await expect(image.read(5 * 4096, Buffer.alloc(10))).rejects.toThrow(`${damaged}: parallels BAT entry 5 (guest bytes 20480..) points to sector 1, on the header or the catalog (4160 bytes)`);
      const rest = Buffer.alloc(image.length - 6 * 4096);
      await image.read(6 * 4096, rest);
      expect(rest.equals(reference.subarray(6 * 4096))).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('check counts what qemu-img check -f parallels counts: clean, in use, leaked space, fragmented, a cluster outside the image', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    const variants: Array<[string, string, number]> = [['clean', path, 0]];
    const inUse = await patchedCopy(path, dir, 'in-use.hdd', [[44, le32(0x746f6e59)]]);
    variants.push(['in use', inUse, 2]);
    const leaking = await patchedCopy(path, dir, 'leaking.hdd', []);
    await truncate(leaking, (await readFile(path)).length + 3 * 64 * KiB + 100);
    variants.push(['leaked space', leaking, 3]);
    const fragmented = join(dir, 'fragmented.hdd');
    await qemuImg(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=65536', fragmented, '4M']);
    await qemuIo(fragmented, ['write -P 0x44 64k 64k', 'write -P 0x45 0 64k', 'write -P 0x46 2M 64k', 'write -P 0x47 3M 128k'], 'parallels');
    variants.push(['fragmented', fragmented, 0]);
    const outside = await patchedCopy(path, dir, 'outside.hdd', [[64 + 4 * 20, le32(1000)]]);
    variants.push(['outside', outside, 2]);
    for (const [name, file, code] of variants) {
      const theirs = await qemuCheckCounts(file);
      expect(theirs.code, name).toBe(code);
      expect(await ourCheckCounts(file), name).toEqual({ counts: theirs.counts, messages: theirs.messages });
    }
    expect((await qemuCheckCounts(fragmented)).counts['fragmented-clusters']).toBeGreaterThan(0);
  });

  it('seeded random damage of the header and catalog: refused with a message, never a crash or hang; what both read agrees with qemu-img', TIMEOUT, async () => {
    const { dir, path } = await candidate();
    await addDirtyBitmapExtension(path);
    const file = await readFile(path);
    const extAt = Number(file.readBigUInt64LE(56)) * 512;
    const catalog = { start: 64, end: 64 + 4 * 64 };
    const regions = [{ start: 0, end: 64 }, catalog, catalog, catalog, { start: extAt, end: extAt + 128 }];
    const summary = await fuzzDamage(dir, path, 'parallels', regions, 0x9a1, 150);
    expect(summary.cases).toBe(150);
    expect(summary.refusedAtOpen).toBeGreaterThan(0);
    expect(summary.agreedWithQemu).toBeGreaterThan(0);
    console.log(`parallels fuzz: ${JSON.stringify({ ...summary, messages: summary.messages.size, stricterThanQemu: [...summary.stricterThanQemu] })}`);
  });
});
