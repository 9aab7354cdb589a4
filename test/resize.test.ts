/**
 * imgmount resize against qemu-img 7.2 as the oracle: images made and filled by
 * qemu-img / qemu-io are resized through bin/imgmount, and an identical copy by
 * qemu-img resize; afterwards `qemu-img check` finds no error and no leak and
 * `qemu-img compare` finds both identical (for QED shrinks, which qemu refuses,
 * the image is compared with the original's first N bytes made raw by qemu-img
 * convert). The command line: sizes relative to the current one (`-1G` as the
 * last argument), --shrink needed to shrink (refused in one line, the file
 * byte-identical), a mounted or otherwise locked image refused, raw files.
 */
import { copyFile, readFile, stat, truncate } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage, resizeImage } from '../src/index.js';
import {
  makeTempDir, patchBytes, qemuCheck, qemuCompare, qemuConvertToRawFile, qemuImg, qemuInfo, qemuIo, readBytes, run, skipWithoutQemu, type RunResult,
} from './helpers/qemu.js';
import { MountLab, skipWithoutFuse } from './fuse/fuse-helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const bin = resolve(import.meta.dirname, '../bin/imgmount');
const skip = skipWithoutQemu('imgmount resize against qemu-img');

function imgmount(args: readonly string[], cwd?: string): Promise<RunResult> {
  return run(bin, args, { cwd });
}

async function setDirtyBit(path: string): Promise<void> {
  const byte = await readBytes(path, 79, 1);
  await patchBytes(path, 79, Buffer.from([byte[0]! | 1]));
}

async function expectClean(path: string, format: string): Promise<void> {
  const check = await qemuCheck(path, format);
  expect(check.code, `qemu-img check ${path}:\n${check.stdout}${check.stderr}`).toBe(0);
  expect(check.stdout).toMatch(/No errors were found on the image/);
}

async function expectIdentical(path: string, format: string, other: string, otherFormat: string): Promise<void> {
  const compare = await qemuCompare(path, format, other, otherFormat);
  expect(compare.code, `qemu-img compare ${path} ${other}:\n${compare.stdout}${compare.stderr}`).toBe(0);
  expect((await qemuInfo(path, format))['virtual-size']).toBe((await qemuInfo(other, otherFormat))['virtual-size']);
}

async function resizeOk(args: readonly string[], cwd?: string): Promise<void> {
  const result = await imgmount(['resize', ...args], cwd);
  expect(result.code, `imgmount resize ${args.join(' ')}: ${result.stderr}`).toBe(0);
  expect(result.stdout).toBe('Image resized.\n');
}

/**
 * Resizes `path` with imgmount and a copy with qemu-img (same arguments), then
 * checks both and compares them. Returns the copy's path.
 */
async function resizeLikeQemu(path: string, format: string, size: string, shrink = false): Promise<string> {
  const copy = `${path}.by-qemu`;
  await copyFile(path, copy);
  const flags = shrink ? ['--shrink'] : [];
  await resizeOk([...flags, '-f', format, path, size]);
  await qemuImg(['resize', ...flags, '-f', format, copy, size]);
  await expectClean(path, format);
  await expectIdentical(path, format, copy, format);
  return copy;
}

/** qemu-io writes of distinct patterns spread over [0, size): start, middle, near the end. */
function spreadWrites(size: number, chunk: number): string[] {
  const at = [0, Math.floor(size / 3), Math.floor(size / 2) - chunk / 2, size - 3 * chunk, size - chunk].map((offset) => Math.floor(offset / 512) * 512);
  return at.map((offset, i) => `write -P ${0x11 * (i + 1)} ${offset} ${chunk}`);
}

interface Qcow2Case {
  name: string;
  options: string;
  size: number;
  grownTo: number;
  shrunkTo: number;
  chunk: number;
}

const qcow2Cases: Qcow2Case[] = [
  { name: 'v3, 64 KiB clusters', options: 'compat=1.1', size: 64 * MiB, grownTo: 3 * GiB, shrunkTo: 20 * MiB + 512, chunk: 300 * KiB },
  { name: 'v2, 64 KiB clusters', options: 'compat=0.10', size: 64 * MiB, grownTo: 3 * GiB, shrunkTo: 20 * MiB + 512, chunk: 300 * KiB },
  // 1 MiB -> 1 GiB with 512-byte clusters: 32 L1 entries in one cluster become 32768 (256 KiB of new L1 table).
  { name: 'v3, 512-byte clusters (the L1 table must move)', options: 'compat=1.1,cluster_size=512', size: 1 * MiB, grownTo: 1 * GiB, shrunkTo: 600 * KiB, chunk: 20 * KiB },
  { name: 'v2, 512-byte clusters (the L1 table must move)', options: 'compat=0.10,cluster_size=512', size: 1 * MiB, grownTo: 256 * MiB, shrunkTo: 300 * KiB + 512, chunk: 20 * KiB },
  { name: 'v3, 2 MiB clusters', options: 'compat=1.1,cluster_size=2M', size: 40 * MiB, grownTo: 600 * GiB, shrunkTo: 7 * MiB, chunk: 3 * MiB },
  { name: 'v3, 4 KiB clusters, 1-bit refcounts', options: 'cluster_size=4096,refcount_bits=1', size: 8 * MiB, grownTo: 3 * GiB, shrunkTo: 3 * MiB, chunk: 100 * KiB },
  // 16-byte L2 entries: the entries (and subcluster bitmaps) past the new end go; growing again zeroes the kept cluster's tail with zero bits.
  { name: 'v3, extended L2 entries, 64 KiB clusters', options: 'extended_l2=on', size: 64 * MiB, grownTo: 3 * GiB, shrunkTo: 20 * MiB + 512, chunk: 300 * KiB },
  { name: 'v3, extended L2 entries, 16 KiB clusters (512-byte subclusters)', options: 'extended_l2=on,cluster_size=16k', size: 8 * MiB, grownTo: 1 * GiB, shrunkTo: 3 * MiB + 1536, chunk: 100 * KiB },
];

describe.skipIf(skip)('qcow2 resize against qemu-img resize', () => {
  for (const c of qcow2Cases) {
    it(`${c.name}: grows, then shrinks, as qemu-img does`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qcow2');
      await qemuImg(['create', '-f', 'qcow2', '-o', c.options, path, String(c.size)]);
      await qemuIo(path, spreadWrites(c.size, c.chunk), 'qcow2');
      const l1Before = await readBytes(path, 40, 8);
      await resizeLikeQemu(path, 'qcow2', String(c.grownTo));
      // l1_table_offset changed: the L1 table moved to new clusters.
      if (c.options.includes('cluster_size=512')) expect((await readBytes(path, 40, 8)).equals(l1Before)).toBe(false);
      // Write past the old end too, so the shrink has tables and clusters past the new end to drop.
      // Across the new end too: the cluster holding it keeps bytes past the end.
      await qemuIo(
        path,
        [`write -P 0x77 ${c.grownTo - 4 * c.chunk} ${c.chunk}`, `write -P 0x78 ${c.size} ${c.chunk}`, `write -P 0x79 ${c.shrunkTo - 4096} 8192`],
        'qcow2',
      );
      await resizeLikeQemu(path, 'qcow2', String(c.shrunkTo), true);
      // Grow again: the bytes the last cluster kept past the end read as zeros.
      const expected = join(dir, 'expected.raw');
      await qemuConvertToRawFile(path, 'qcow2', expected);
      await truncate(expected, c.shrunkTo + 2 * MiB);
      await resizeOk(['-f', 'qcow2', path, `+${2 * MiB}`]);
      await expectClean(path, 'qcow2');
      await expectIdentical(path, 'qcow2', expected, 'raw');
    }, 300_000); // qemu-img compare of 1 GiB in 512-byte clusters takes about a minute
  }

  it('cuts the file after its last cluster in use when shrinking, as qemu does', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, String(64 * MiB)]);
    await qemuIo(path, ['write -P 0x5a 0 1M', 'write -P 0x5b 32M 16M'], 'qcow2');
    const before = (await stat(path)).size;
    const copy = await resizeLikeQemu(path, 'qcow2', String(8 * MiB), true);
    expect((await stat(path)).size).toBeLessThan(before - 15 * MiB);
    expect((await stat(path)).size).toBeLessThanOrEqual((await stat(copy)).size);
  });

  it('over a longer backing file: the grown area reads as zeros, not as the backing file (v3)', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.raw');
    await qemuImg(['create', '-f', 'raw', base, String(8 * MiB)]);
    await qemuIo(base, ['write -P 0xbb 0 8M'], 'raw');
    const path = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', path, String(2 * MiB + 512)]);
    await qemuIo(path, ['write -P 0x22 1M 4096'], 'qcow2');
    await resizeLikeQemu(path, 'qcow2', String(6 * MiB));
    const raw = join(dir, 'expected.raw');
    await qemuConvertToRawFile(base, 'raw', raw);
    await qemuIo(raw, ['write -P 0x22 1M 4096', `write -z ${2 * MiB + 512} ${4 * MiB - 512}`], 'raw');
    await truncate(raw, 6 * MiB);
    await expectIdentical(path, 'qcow2', raw, 'raw');
    await resizeLikeQemu(path, 'qcow2', String(1 * MiB), true);
  });

  it('over a longer backing file, v2 (no zero clusters): writes zeros where qemu-img fails', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.raw');
    await qemuImg(['create', '-f', 'raw', base, String(4 * MiB)]);
    await qemuIo(base, ['write -P 0xbb 0 4M'], 'raw');
    const path = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw', path, String(1 * MiB)]);
    await resizeOk([path, '3M']);
    await expectClean(path, 'qcow2');
    const raw = join(dir, 'expected.raw');
    await qemuConvertToRawFile(base, 'raw', raw);
    await qemuIo(raw, ['write -z 1M 2M'], 'raw');
    await truncate(raw, 3 * MiB);
    await expectIdentical(path, 'qcow2', raw, 'raw');
  });

  it('with lazy refcounts, left dirty: repairs first (and says so), then resizes', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'lazy.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', path, String(16 * MiB)]);
    await qemuIo(path, spreadWrites(16 * MiB, 64 * KiB), 'qcow2');
    // The dirty bit (incompatible_features bit 0, big-endian at 72), as a crash under lazy refcounts leaves it.
    await setDirtyBit(path);
    const copy = `${path}.by-qemu`;
    await copyFile(path, copy);
    const result = await imgmount(['resize', '--shrink', path, '-5M']);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/dirty bit set.*repaired before resizing/);
    await qemuImg(['resize', '--shrink', copy, '-5M']);
    await expectClean(path, 'qcow2');
    await expectIdentical(path, 'qcow2', copy, 'qcow2');
    expect((await readBytes(path, 79, 1))[0]! & 1).toBe(0);
    await resizeLikeQemu(path, 'qcow2', '+40M');
  });

  it('with compressed clusters: drops them when shrinking (refcounts of shared host clusters too)', async () => {
    const dir = await makeTempDir();
    const source = join(dir, 'source.raw');
    await qemuImg(['create', '-f', 'raw', source, String(8 * MiB)]);
    await qemuIo(source, ['write -P 0x31 0 3M', 'write -P 0x32 4M 4M'], 'raw');
    for (const cluster of ['4096', '65536']) {
      const path = join(dir, `compressed-${cluster}.qcow2`);
      await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, source, path]);
      await resizeLikeQemu(path, 'qcow2', String(5 * MiB + 1536), true);
      // Growing zeroes the rest of the compressed cluster holding the old end (qemu-img shows its old bytes).
      await resizeOk([path, '1G']);
      await expectClean(path, 'qcow2');
      const expected = join(dir, `expected-${cluster}.raw`);
      await copyFile(source, expected);
      await truncate(expected, 5 * MiB + 1536);
      await truncate(expected, 1 * GiB);
      await expectIdentical(path, 'qcow2', expected, 'raw');
    }
  });

  it('with internal snapshots (v3): the snapshots keep their content; shared L2 tables are copied, not changed', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'snap.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', path, String(8 * MiB)]);
    await qemuIo(path, spreadWrites(8 * MiB, 200 * KiB), 'qcow2');
    await qemuImg(['snapshot', '-c', 'before', path]);
    const snapshotBefore = join(dir, 'snapshot-before.raw');
    await qemuConvertToRawFile(path, 'qcow2', snapshotBefore, { snapshot: { name: 'before' } });
    await qemuIo(path, ['write -P 0x66 7M 4096'], 'qcow2');
    // qemu-img convert -l reads a snapshot at the image's current size: compare with what
    // it reads from the copy qemu-img resized, and with the snapshot's bytes before.
    const snapshotOf = async (image: string, name: string): Promise<Buffer> => {
      const out = join(dir, name);
      await qemuConvertToRawFile(image, 'qcow2', out, { snapshot: { name: 'before' } });
      return readFile(out);
    };
    const original = await readFile(snapshotBefore);
    for (const [size, shrink] of [[String(3 * MiB + 4096 + 512), true], ['64M', false]] as const) {
      const copy = await resizeLikeQemu(path, 'qcow2', size, shrink);
      const ours = await snapshotOf(path, `ours-${size}.raw`);
      expect(ours.equals(await snapshotOf(copy, `theirs-${size}.raw`)), size).toBe(true);
      const common = Math.min(ours.length, original.length);
      expect(ours.subarray(0, common).equals(original.subarray(0, common)), size).toBe(true);
    }
  });

  it('refuses what it does not handle, by name, changing nothing', async () => {
    const dir = await makeTempDir();
    const cases: { options: string; snapshot?: boolean; size: string; pattern: RegExp }[] = [
      { options: 'compat=0.10', snapshot: true, size: '2M', pattern: /Can't resize a v2 image which has snapshots/ },
      { options: 'compat=1.1', size: String(2 * MiB + 100), pattern: /not a multiple of 512/ },
      { options: 'cluster_size=512', size: '200G', pattern: /larger than 137438953472, the most .* 512-byte clusters/ },
    ];
    for (const [i, c] of cases.entries()) {
      const path = join(dir, `refused-${i}.qcow2`);
      await qemuImg(['create', '-f', 'qcow2', '-o', c.options, path, String(1 * MiB)], { cwd: dir });
      if (c.snapshot) await qemuImg(['snapshot', '-c', 's', path]);
      const before = await readFile(path);
      const result = await imgmount(['resize', path, c.size], dir);
      expect(result.code, c.options).toBe(1);
      expect(result.stderr.trim().split('\n'), c.options).toHaveLength(1);
      expect(result.stderr).toMatch(c.pattern);
      expect((await readFile(path)).equals(before)).toBe(true);
    }
  });
});

describe.skipIf(skip)('QED resize', () => {
  for (const cluster of [65536, 4096]) {
    it(`${cluster}-byte clusters: grows as qemu-img does, shrinks (which qemu-img refuses) to the original's first bytes`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qed');
      const size = 24 * MiB;
      await qemuImg(['create', '-f', 'qed', '-o', `cluster_size=${cluster}`, path, String(size)]);
      await qemuIo(path, spreadWrites(size, 300 * KiB), 'qed');
      await resizeLikeQemu(path, 'qed', '2G');
      await qemuIo(path, ['write -P 0x44 2000M 1M', `write -P 0x45 ${size} 64K`, `write -P 0x46 ${5 * MiB - 4096} 8192`], 'qed');
      const original = join(dir, 'original.raw');
      await qemuConvertToRawFile(path, 'qed', original);
      for (const shrunk of [1 * GiB, 9 * MiB + 512, 5 * MiB + 512]) {
        await resizeOk(['--shrink', path, String(shrunk)]);
        await expectClean(path, 'qed');
        const expected = join(dir, `expected-${shrunk}.raw`);
        await copyFile(original, expected);
        await truncate(expected, shrunk);
        await expectIdentical(path, 'qed', expected, 'raw');
      }
      // Growing again shows zeros past the old end (the clusters kept there were punched).
      await resizeOk([path, '+3M']);
      await expectClean(path, 'qed');
      const expected = join(dir, 'expected-regrown.raw');
      await copyFile(original, expected);
      await truncate(expected, 5 * MiB + 512);
      await truncate(expected, 8 * MiB + 512);
      await expectIdentical(path, 'qed', expected, 'raw');
    }, 120_000);
  }

  it('cuts the file when the dropped clusters are at its end', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'tail.qed');
    await qemuImg(['create', '-f', 'qed', path, String(64 * MiB)]);
    await qemuIo(path, ['write -P 0x10 0 1M', 'write -P 0x11 40M 8M'], 'qed');
    const before = (await stat(path)).size;
    await resizeOk(['--shrink', path, '16M']);
    await expectClean(path, 'qed');
    expect((await stat(path)).size).toBeLessThanOrEqual(before - 8 * MiB);
  });

  it('grows to the largest size its geometry addresses, and not one byte past it', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'max.qed');
    // 4 KiB clusters, table_size 4: 2048 entries per table, 2048 * 2048 * 4096 = 16 GiB.
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096', path, String(1 * MiB)]);
    await qemuIo(path, ['write -P 0x12 0 64K'], 'qed');
    const copy = await resizeLikeQemu(path, 'qed', String(16 * GiB));
    expect((await qemuInfo(path, 'qed'))['virtual-size']).toBe(16 * GiB);
    const before = await readFile(path);
    const result = await imgmount(['resize', path, '+512']);
    expect(result.code).toBe(1);
    expect(result.stderr.trim().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(/larger than 17179869184, the most a QED image with cluster_size 4096 and table_size 4 can address/);
    expect((await readFile(path)).equals(before)).toBe(true);
    // qemu-img refuses it too.
    expect((await run('qemu-img', ['resize', '-f', 'qed', copy, '+512'])).code).toBe(1);
  });

  it('over a longer backing file: the grown area reads as zeros (qemu-img refuses this)', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.raw');
    await qemuImg(['create', '-f', 'raw', base, String(4 * MiB)]);
    await qemuIo(base, ['write -P 0xbb 0 4M'], 'raw');
    const path = join(dir, 'top.qed');
    await qemuImg(['create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', path, String(1 * MiB + 512)]);
    await resizeOk([path, '6M']);
    await expectClean(path, 'qed');
    const raw = join(dir, 'expected.raw');
    await qemuConvertToRawFile(base, 'raw', raw);
    await qemuIo(raw, [`write -z ${1 * MiB + 512} ${3 * MiB - 512}`], 'raw');
    await truncate(raw, 6 * MiB);
    await expectIdentical(path, 'qed', raw, 'raw');
  });
});

describe.skipIf(skip)('imgmount resize, the command line', () => {
  it('takes -1G as a relative size (the last argument), +512M too', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, '2G']);
    await resizeOk(['--shrink', path, '-1G']);
    expect((await qemuInfo(path))['virtual-size']).toBe(1 * GiB);
    await resizeOk([path, '+512M']);
    expect((await qemuInfo(path))['virtual-size']).toBe(1 * GiB + 512 * MiB);
    await resizeOk([path, '--shrink', '-f', 'qcow2', '1M']);
    expect((await qemuInfo(path))['virtual-size']).toBe(1 * MiB);
    await expectClean(path, 'qcow2');
  });

  it('refuses a shrink without --shrink: one line, exit 1, the file byte-identical', async () => {
    const dir = await makeTempDir();
    for (const [format, name] of [['qcow2', 'a.qcow2'], ['qed', 'a.qed'], ['raw', 'a.raw']] as const) {
      const path = join(dir, name);
      await qemuImg(['create', '-f', format, path, '64M']);
      await qemuIo(path, ['write -P 0x21 0 1M', 'write -P 0x22 60M 1M'], format);
      const before = await readFile(path);
      for (const size of ['-1M', '32M']) {
        const result = await imgmount(['resize', '-f', format, path, size]);
        expect(result.code, format).toBe(1);
        expect(result.stdout).toBe('');
        expect(result.stderr.trim().split('\n')).toHaveLength(1);
        expect(result.stderr).toMatch(/use --shrink/);
        expect((await readFile(path)).equals(before), format).toBe(true);
      }
    }
  });

  it('refuses sizes that are not positive, as qemu-img', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    await qemuImg(['create', '-f', 'qed', path, '1G']);
    for (const size of ['0', '-1G', '-2G', 'huge']) {
      const result = await imgmount(['resize', '--shrink', path, size]);
      expect(result.code, size).toBe(1);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
    }
    expect((await qemuInfo(path))['virtual-size']).toBe(1 * GiB);
  });

  it('grows and shrinks raw files (sparse growth, --shrink truncates)', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.raw');
    await qemuImg(['create', '-f', 'raw', path, '1M']);
    await qemuIo(path, ['write -P 0x33 0 1M'], 'raw');
    await resizeOk(['-f', 'raw', path, '+1G']);
    expect((await stat(path)).size).toBe(1 * GiB + 1 * MiB);
    expect((await stat(path)).blocks * 512).toBeLessThan(4 * MiB);
    await resizeOk(['--shrink', '-f', 'raw', path, '1000']);
    expect((await stat(path)).size).toBe(1000);
    expect((await readFile(path)).equals(Buffer.alloc(1000, 0x33))).toBe(true);
  });

  it('refuses an image another imgmount process is writing (the write lock), changing nothing', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'busy.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, '64M']);
    const image = await openImage(path, { readOnly: false });
    try {
      const before = await readFile(path);
      const result = await imgmount(['resize', path, '+1G']);
      expect(result.code).toBe(1);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
      expect(result.stderr).toMatch(/already open for writing by an imgmount process/);
      expect((await readFile(path)).equals(before)).toBe(true);
    } finally {
      await image.close();
    }
    await expect(resizeImage(path, { delta: 1 * GiB })).resolves.toMatchObject({ format: 'qcow2', oldSize: 64 * MiB, newSize: 64 * MiB + GiB });
  });
});

describe.skipIf(skipWithoutFuse('imgmount resize of a mounted image'))('imgmount resize of a mounted image', () => {
  it('is refused while mounted, and works once unmounted', async () => {
    const lab = await MountLab.create();
    try {
      const path = lab.path('disk.qed');
      await qemuImg(['create', '-f', 'qed', path, '64M']);
      const mountpoint = await lab.mountpoint();
      await lab.mount([path], mountpoint);
      const result = await imgmount(['resize', path, '+64M']);
      expect(result.code).toBe(1);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
      expect(result.stderr).toMatch(/already open for writing/);
      expect((await stat(join(mountpoint, 'disk.raw'))).size).toBe(64 * MiB);
      expect((await imgmount(['unmount', mountpoint])).code).toBe(0);
      await resizeOk([path, '+64M']);
      expect((await qemuInfo(path, 'qed'))['virtual-size']).toBe(128 * MiB);
    } finally {
      await lab.cleanup();
    }
  });
});
