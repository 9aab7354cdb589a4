/**
 * qcow2 create against qemu-img 7.2 as the oracle: for a matrix of options the image
 * this library creates passes `qemu-img check` with no leaks, `qemu-img info` says
 * what it says of the image qemu-img creates with the same options (field by field,
 * except filename and actual-size), `qemu-img compare` finds the two identical, and
 * openImage reads the expected guest bytes (zeros, or the backing file). Where the
 * layout is qemu's own (the refcount table fits in one cluster, no falloc/full) the
 * two files are byte-identical. Every refused option or combination is refused by
 * qemu-img too, and through bin/imgmount it is one line, a non-zero exit and no file.
 */
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../src/index.js';
import { createQcow2 } from '../src/formats/qcow2/create.js';
import { makeTempDir, qemuImg, qemuIo, readAll, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const skip = skipWithoutQemu('qcow2 create against qemu-img');
const bin = resolve(import.meta.dirname, '../bin/imgmount');
const BASE_RAW_BYTES = 3 * MiB + 1000;
const BASE_QCOW2_BYTES = 2 * MiB + 512;

interface Case {
  name: string;
  /** The -o options, as given to both programs ('DATA' stands for the data file name). */
  options: string;
  /** Virtual size; undefined takes it from the backing file. */
  size?: number;
  backing?: 'raw' | 'qcow2';
  /** Pass -F (qemu-img always gets it: qemu 7.2 refuses a backing file without one). */
  withFormat?: boolean;
  /** The two files are expected to be byte-identical (qemu's layout). */
  identical: boolean;
  /** What the preallocation mode promises about the space the file takes. */
  space?: 'sparse' | 'allocated';
}

const SIZE = 5 * MiB + 512;

const CASES: Case[] = [
  { name: 'defaults', options: '', size: SIZE, identical: true },
  { name: 'compat=0.10', options: 'compat=0.10', size: SIZE, identical: true },
  { name: 'cluster_size=512', options: 'cluster_size=512', size: SIZE, identical: true },
  { name: 'cluster_size=4k', options: 'cluster_size=4k', size: SIZE, identical: true },
  { name: 'cluster_size=2M', options: 'cluster_size=2M', size: SIZE, identical: true },
  { name: 'refcount_bits=1 with 512-byte clusters', options: 'refcount_bits=1,cluster_size=512', size: SIZE, identical: true },
  { name: 'refcount_bits=8', options: 'refcount_bits=8', size: SIZE, identical: true },
  { name: 'refcount_bits=64, 4k clusters', options: 'refcount_bits=64,cluster_size=4k', size: SIZE, identical: true },
  { name: 'extended_l2=on', options: 'extended_l2=on', size: SIZE, identical: true },
  { name: 'extended_l2=on, 16k clusters', options: 'extended_l2=on,cluster_size=16k', size: SIZE, identical: true },
  { name: 'lazy_refcounts=on', options: 'lazy_refcounts=on', size: SIZE, identical: true },
  { name: 'compression_type=zstd', options: 'compression_type=zstd', size: SIZE, identical: true },
  { name: 'size 0', options: '', size: 0, identical: true },
  { name: 'unaligned size', options: 'cluster_size=4k', size: 3 * MiB + 1000, identical: true },
  { name: 'data_file', options: 'data_file=DATA', size: SIZE, identical: false },
  { name: 'data_file, data_file_raw=on', options: 'data_file=DATA,data_file_raw=on', size: SIZE, identical: false },
  { name: 'data_file, zstd, lazy refcounts', options: 'data_file=DATA,compression_type=zstd,lazy_refcounts=on', size: SIZE, identical: false },
  { name: 'data_file, preallocation=full', options: 'data_file=DATA,preallocation=full', size: SIZE, identical: false },
  { name: 'preallocation=metadata', options: 'preallocation=metadata', size: 8 * MiB, identical: true, space: 'sparse' },
  { name: 'preallocation=metadata, 4k clusters, unaligned', options: 'preallocation=metadata,cluster_size=4k', size: 3 * MiB + 1000, identical: true, space: 'sparse' },
  { name: 'preallocation=metadata, 512-byte clusters, 64-bit refcounts (many refcount blocks)', options: 'preallocation=metadata,cluster_size=512,refcount_bits=64', size: 2 * MiB, identical: false, space: 'sparse' },
  { name: 'preallocation=metadata, 1-bit refcounts', options: 'preallocation=metadata,cluster_size=512,refcount_bits=1', size: 5 * MiB, identical: true, space: 'sparse' },
  { name: 'preallocation=metadata, extended L2, 2M clusters (file cut at the last subcluster)', options: 'preallocation=metadata,extended_l2=on,cluster_size=2M', size: 5 * MiB, identical: true },
  { name: 'preallocation=falloc', options: 'preallocation=falloc,cluster_size=4k', size: 8 * MiB, identical: false, space: 'allocated' },
  { name: 'preallocation=full', options: 'preallocation=full', size: 8 * MiB, identical: false, space: 'allocated' },
  { name: 'backing raw with -F', options: '', size: SIZE, backing: 'raw', withFormat: true, identical: true },
  { name: 'backing raw without -F (probed, recorded as raw)', options: '', size: SIZE, backing: 'raw', withFormat: false, identical: true },
  { name: 'size from a raw backing file', options: 'cluster_size=4k', backing: 'raw', withFormat: true, identical: true },
  { name: 'size from a qcow2 backing file', options: '', backing: 'qcow2', withFormat: true, identical: true },
  { name: 'backing qcow2 without -F, shorter than the image', options: '', size: SIZE, backing: 'qcow2', withFormat: false, identical: true },
  { name: 'backing, compat=0.10', options: 'compat=0.10', size: SIZE, backing: 'raw', withFormat: true, identical: true },
  { name: 'backing, preallocation=metadata, extended_l2=on', options: 'preallocation=metadata,extended_l2=on', backing: 'raw', withFormat: true, identical: true },
  { name: 'backing, data_file, zstd, 512-byte clusters', options: 'data_file=DATA,compression_type=zstd,cluster_size=512', backing: 'qcow2', withFormat: true, identical: false },
];

/** The -o record from an option list ('a=1,b=2'). */
function optionRecord(list: string): Record<string, string> {
  const record: Record<string, string> = {};
  for (const item of list.split(',').filter(Boolean)) {
    const [key, value] = item.split('=') as [string, string];
    record[key] = value;
  }
  return record;
}

/** Makes base.raw (seeded bytes) and base.qcow2 (made by qemu, with data written by qemu-io) in `dir`. */
async function makeBases(dir: string): Promise<{ raw: Buffer; qcow2: Buffer }> {
  const raw = seededBytes(7001, BASE_RAW_BYTES);
  await writeFile(join(dir, 'base.raw'), raw);
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), String(BASE_QCOW2_BYTES)]);
  await qemuIo(join(dir, 'base.qcow2'), ['write -P 0x5a 1000 70000', `write -P 0xa5 ${2 * MiB - 100} 600`], 'qcow2');
  const qcow2 = Buffer.alloc(BASE_QCOW2_BYTES);
  qcow2.fill(0x5a, 1000, 71000);
  qcow2.fill(0xa5, 2 * MiB - 100, 2 * MiB + 500);
  return { raw, qcow2 };
}

async function info(dir: string, file: string): Promise<Record<string, unknown>> {
  // qemu 7.2 resolves a relative data file name against its working directory: run it in the image's.
  const { stdout } = await qemuImg(['info', '-f', 'qcow2', '--output=json', file], { cwd: dir });
  return JSON.parse(stdout) as Record<string, unknown>;
}

describe.skipIf(skip)('qcow2 create against qemu-img', () => {
  for (const testCase of CASES) {
    it(testCase.name, async () => {
      const dir = await makeTempDir('imgmount-qcow2-create-');
      const bases = testCase.backing !== undefined ? await makeBases(dir) : undefined;
      const backingFile = testCase.backing !== undefined ? `base.${testCase.backing}` : undefined;
      const ours = join(dir, 'ours.qcow2');
      const theirs = join(dir, 'theirs.qcow2');

      await createImage(ours, 'qcow2', {
        size: testCase.size,
        backingFile,
        backingFormat: testCase.withFormat ? testCase.backing : undefined,
        options: optionRecord(testCase.options.replace('DATA', 'ours.data')),
      });
      const qemuArgs = ['create', '-q', '-f', 'qcow2'];
      if (testCase.options !== '') qemuArgs.push('-o', testCase.options.replace('DATA', 'theirs.data'));
      if (backingFile !== undefined) qemuArgs.push('-b', backingFile, '-F', testCase.backing!);
      qemuArgs.push('theirs.qcow2');
      if (testCase.size !== undefined) qemuArgs.push(String(testCase.size));
      await qemuImg(qemuArgs, { cwd: dir });

      // qemu-img check: clean, nothing leaked.
      const check = await run('qemu-img', ['check', '-f', 'qcow2', '--output=json', 'ours.qcow2'], { cwd: dir });
      expect(check.code, `qemu-img check exit status\n${check.stdout}${check.stderr}`).toBe(0);
      const checked = JSON.parse(check.stdout) as Record<string, unknown>;
      expect(checked.leaks ?? 0).toBe(0);
      expect(checked.corruptions ?? 0).toBe(0);
      expect(checked['check-errors']).toBe(0);

      // qemu-img info: the same, field by field.
      const ourInfo = await info(dir, 'ours.qcow2');
      const theirInfo = await info(dir, 'theirs.qcow2');
      for (const json of [ourInfo, theirInfo]) {
        delete json.filename;
        delete json['actual-size'];
      }
      const ourSpecific = (ourInfo['format-specific'] as { data: Record<string, unknown> }).data;
      const theirSpecific = (theirInfo['format-specific'] as { data: Record<string, unknown> }).data;
      if (testCase.options.includes('data_file=')) {
        expect(ourSpecific['data-file']).toBe('ours.data');
        expect(theirSpecific['data-file']).toBe('theirs.data');
        delete ourSpecific['data-file'];
        delete theirSpecific['data-file'];
      }
      expect(ourInfo).toEqual(theirInfo);

      // qemu-img compare: the same guest bytes (backing files included).
      const compare = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', 'ours.qcow2', 'theirs.qcow2'], { cwd: dir });
      expect(compare.code, `qemu-img compare\n${compare.stdout}${compare.stderr}`).toBe(0);

      if (testCase.identical) {
        const [a, b] = await Promise.all([readFile(ours), readFile(theirs)]);
        expect(a.length, 'file length').toBe(b.length);
        expect(a.equals(b), 'the image file is byte for byte the one qemu-img creates').toBe(true);
      }
      if (testCase.options.includes('data_file=')) {
        const [a, b] = await Promise.all([stat(join(dir, 'ours.data')), stat(join(dir, 'theirs.data'))]);
        expect(a.size, 'data file size').toBe(b.size);
      }
      const virtualSize = ourInfo['virtual-size'] as number;
      if (testCase.space !== undefined) {
        const { blocks } = await stat(ours);
        if (testCase.space === 'sparse') expect(blocks * 512, 'metadata preallocation leaves the data sparse').toBeLessThan(virtualSize / 2);
        else expect(blocks * 512, `${testCase.options} allocates the data`).toBeGreaterThanOrEqual(virtualSize);
      }
      if (testCase.options.includes('preallocation=full') && testCase.options.includes('data_file=')) {
        const { blocks } = await stat(join(dir, 'ours.data'));
        expect(blocks * 512).toBeGreaterThanOrEqual(virtualSize);
      }

      // Our own reader: zeros, or the backing file's bytes (zeros past its end).
      const image = await openImage(ours, { readOnly: true });
      try {
        expect(image.length).toBe(virtualSize);
        const expected = Buffer.alloc(virtualSize);
        if (bases !== undefined) bases[testCase.backing!].copy(expected, 0, 0, Math.min(virtualSize, bases[testCase.backing!].length));
        const actual = await readAll(image);
        expect(actual.equals(expected), 'openImage reads the expected guest bytes').toBe(true);
      } finally {
        await image.close();
      }
    });
  }
});

/** Runs bin/imgmount in `cwd`. */
function imgmount(args: readonly string[], cwd: string) {
  return run(bin, args, { cwd });
}

async function requireBuild(): Promise<void> {
  const built = await stat(resolve(import.meta.dirname, '../dist/formats/qcow2/create.js')).catch(() => undefined);
  if (!built) throw new Error('dist/ has no qcow2 create: run `npm run build` before this suite');
}

/** Option lists that qemu-img 7.2 refuses, each with a word our message must name. */
const REFUSED: Array<{ args: string[]; names: RegExp }> = [
  { args: ['-o', 'cluster_size=256'], names: /cluster_size/ },
  { args: ['-o', 'cluster_size=4M'], names: /cluster_size/ },
  { args: ['-o', 'cluster_size=3000'], names: /cluster_size/ },
  { args: ['-o', 'cluster_size=1.5k'], names: /cluster_size/ },
  { args: ['-o', 'cluster_size=0'], names: /cluster_size/ },
  { args: ['-o', 'cluster_size=abc'], names: /cluster_size/ },
  { args: ['-o', 'compat=2'], names: /compat/ },
  { args: ['-o', 'compat=v1'], names: /compat/ },
  { args: ['-o', 'refcount_bits=3'], names: /refcount_bits/ },
  { args: ['-o', 'refcount_bits=128'], names: /refcount_bits/ },
  { args: ['-o', 'refcount_bits=0'], names: /refcount_bits/ },
  { args: ['-o', 'refcount_bits=abc'], names: /refcount_bits/ },
  { args: ['-o', 'compat=0.10,refcount_bits=8'], names: /refcount_bits/ },
  { args: ['-o', 'compat=0.10,lazy_refcounts=on'], names: /lazy_refcounts/ },
  { args: ['-o', 'lazy_refcounts=maybe'], names: /lazy_refcounts/ },
  { args: ['-o', 'lazy_refcounts=ON'], names: /lazy_refcounts/ },
  { args: ['-o', 'extended_l2=on,cluster_size=8k'], names: /extended_l2/ },
  { args: ['-o', 'extended_l2=on,compat=0.10'], names: /extended_l2/ },
  { args: ['-o', 'extended_l2=1'], names: /extended_l2/ },
  { args: ['-o', 'compression_type=zstd,compat=0.10'], names: /compression_type/ },
  { args: ['-o', 'compression_type=lz4'], names: /compression_type/ },
  { args: ['-o', 'data_file=d.raw,compat=0.10'], names: /data_file/ },
  { args: ['-o', 'data_file_raw=on'], names: /data_file_raw/ },
  { args: ['-o', 'data_file='], names: /data_file/ },
  { args: ['-o', 'preallocation=foo'], names: /preallocation/ },
  { args: ['-o', 'foo=bar'], names: /foo/ },
  { args: ['-o', 'encrypt.format=luks'], names: /encrypt/ },
  { args: ['-b', 'base.raw', '-F', 'raw', '-o', 'preallocation=metadata'], names: /preallocation/ },
  { args: ['-b', 'base.raw', '-F', 'raw', '-o', 'preallocation=full'], names: /preallocation/ },
  { args: ['-b', 'base.raw', '-F', 'raw', '-o', 'data_file=d.raw,data_file_raw=on'], names: /data_file_raw/ },
  { args: ['-b', 'missing.raw', '-F', 'raw'], names: /missing\.raw/ },
  { args: ['-b', 'base.raw', '-F', 'qcow2'], names: /base\.raw/ },
  { args: ['-F', 'raw'], names: /backing/ },
  // 128 GiB + 512 is past what 512-byte clusters address (an L1 table of 32 MiB); 64k clusters reach 2 PiB.
  { args: ['-o', 'cluster_size=512', 'SIZE=137438953984'], names: /size/ },
  { args: ['-o', 'cluster_size=16k,extended_l2=on', 'SIZE=70368744178176'], names: /size/ },
  // The backing file name must fit in the header cluster: 376 bytes do at 512-byte clusters (v3), 377 do not.
  { args: ['-o', 'cluster_size=512', '-b', `.${'/'.repeat(368)}base.raw`, '-F', 'raw'], names: /backing file name|fit/ },
  { args: ['-b', `.${'/'.repeat(1016)}base.raw`, '-F', 'raw'], names: /backing file name/ },
  { args: [], names: /size/ },
];

/** Option lists qemu-img 7.2 accepts; so must we (byte for byte the same file unless marked). */
const NOT_IDENTICAL = new Set(['-o cluster_size=512 SIZE=137438953472']);
const ACCEPTED: string[][] = [
  ['-o', 'compat=v2'], ['-o', 'compat=v3'], ['-o', 'cluster_size=64K'], ['-o', 'refcount_bits=0x10'],
  ['-o', 'lazy_refcounts=yes'], ['-o', 'lazy_refcounts=false'], ['-o', 'lazy_refcounts=y'], ['-o', 'extended_l2=true'],
  ['-o', 'data_file_raw=off'], ['-o', 'compat=0.10,refcount_bits=16,compression_type=zlib,lazy_refcounts=off,extended_l2=off'],
  // The largest image 512-byte clusters address; its refcount table needs 5 clusters, which qemu places elsewhere.
  ['-o', 'cluster_size=512', 'SIZE=137438953472'],
  ['-o', 'cluster_size=512', '-b', `.${'/'.repeat(367)}base.raw`, '-F', 'raw'],
  ['-o', 'cluster_size=512,compat=0.10', '-b', `.${'/'.repeat(407)}base.raw`, '-F', 'raw'],
];

/** Splits a test's args into the command's options and the size (default 1M; none when the list is empty). */
function commandLine(args: string[], file: string): string[] {
  const size = args.find((arg) => arg.startsWith('SIZE='));
  const rest = args.filter((arg) => !arg.startsWith('SIZE='));
  const sizeArg = size !== undefined ? [size.slice(5)] : args.length === 0 || rest.includes('-b') ? [] : ['1M'];
  return [...rest, file, ...sizeArg];
}

describe.skipIf(skip)('qcow2 create: options qemu-img refuses', () => {
  for (const { args, names } of REFUSED) {
    it(`refuses ${args.join(' ') || 'a missing size'}`, async () => {
      await requireBuild();
      const dir = await makeTempDir('imgmount-qcow2-refused-');
      await writeFile(join(dir, 'base.raw'), Buffer.alloc(MiB));
      const oracle = await run('qemu-img', ['create', '-f', 'qcow2', ...commandLine(args, 'theirs.qcow2')], { cwd: dir });
      expect(oracle.code, `qemu-img refuses it too\n${oracle.stdout}${oracle.stderr}`).not.toBe(0);
      const before = (await readdir(dir)).sort();
      const result = await imgmount(['create', '-f', 'qcow2', ...commandLine(args, 'ours.qcow2')], dir);
      expect(result.code).not.toBe(0);
      const message = result.stderr.trimEnd();
      expect(message.split('\n'), 'one line').toHaveLength(1);
      expect(message).toMatch(names);
      expect(result.stdout).toBe('');
      expect((await readdir(dir)).sort(), 'no file was created').toEqual(before);
    });
  }
});

describe.skipIf(skip)('qcow2 create: spellings qemu-img accepts', () => {
  for (const args of ACCEPTED) {
    it(`accepts ${args.join(' ')}`, async () => {
      await requireBuild();
      const dir = await makeTempDir('imgmount-qcow2-accepted-');
      await writeFile(join(dir, 'base.raw'), Buffer.alloc(MiB));
      await qemuImg(['create', '-q', '-f', 'qcow2', ...commandLine(args, 'theirs.qcow2')], { cwd: dir });
      const result = await imgmount(['create', '-f', 'qcow2', ...commandLine(args, 'ours.qcow2')], dir);
      expect(result.code, result.stderr).toBe(0);
      expect(result.stdout).toMatch(/^Formatting 'ours\.qcow2', fmt=qcow2/);
      const check = await run('qemu-img', ['check', '-f', 'qcow2', 'ours.qcow2'], { cwd: dir });
      expect(check.code, check.stdout + check.stderr).toBe(0);
      if (!NOT_IDENTICAL.has(args.join(' '))) {
        const [a, b] = await Promise.all([readFile(join(dir, 'ours.qcow2')), readFile(join(dir, 'theirs.qcow2'))]);
        expect(a.equals(b), 'byte for byte what qemu-img creates').toBe(true);
      }
    }, 60_000); // qemu-img takes about 5 s for the 128 GiB image of 512-byte clusters
  }
});

describe.skipIf(skip)('qcow2 create: the external data file', () => {
  it('is created relative to the image directory, not the working directory (qemu 7.2 uses its working directory)', async () => {
    await requireBuild();
    const dir = await makeTempDir('imgmount-qcow2-datafile-');
    const elsewhere = await makeTempDir('imgmount-qcow2-cwd-');
    const result = await imgmount(['create', '-f', 'qcow2', '-o', 'data_file=disk.data', join(dir, 'disk.qcow2'), '1M'], elsewhere);
    expect(result.code, result.stderr).toBe(0);
    expect((await stat(join(dir, 'disk.data'))).size).toBe(MiB);
    expect(await readdir(elsewhere)).toEqual([]);
    const image = await openImage(join(dir, 'disk.qcow2'), { readOnly: true });
    await image.close();
  });

  it('is not overwritten without --force, and then no image is created', async () => {
    await requireBuild();
    const dir = await makeTempDir('imgmount-qcow2-datafile-');
    await writeFile(join(dir, 'disk.data'), 'keep me');
    const result = await imgmount(['create', '-f', 'qcow2', '-o', 'data_file=disk.data', 'disk.qcow2', '1M'], dir);
    expect(result.code).not.toBe(0);
    expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(/data_file.*exists/);
    expect(await readFile(join(dir, 'disk.data'), 'utf8')).toBe('keep me');
    expect(await readdir(dir)).toEqual(['disk.data']);
  });

  it('is overwritten when the create is forced (driver option force)', async () => {
    const dir = await makeTempDir('imgmount-qcow2-datafile-');
    await writeFile(join(dir, 'disk.data'), 'old contents');
    await createQcow2(join(dir, 'disk.qcow2'), { size: 2 * MiB, options: { data_file: 'disk.data' }, force: true });
    const data = await readFile(join(dir, 'disk.data'));
    expect(data.length).toBe(2 * MiB);
    expect(data.equals(Buffer.alloc(2 * MiB)), 'the old contents are gone').toBe(true);
    const check = await run('qemu-img', ['check', '-f', 'qcow2', 'disk.qcow2'], { cwd: dir });
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const image = await openImage(join(dir, 'disk.qcow2'), { readOnly: true });
    try {
      expect((await readAll(image)).equals(Buffer.alloc(2 * MiB))).toBe(true);
    } finally {
      await image.close();
    }
  });
});
