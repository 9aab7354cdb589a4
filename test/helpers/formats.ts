/**
 * The conformance matrix: one entry per format (raw, qed, qcow2), each with the
 * *shapes* of image qemu makes in that format (geometry, features, how the data
 * got there), built with qemu-img / qemu-io only, so the oracle is always qemu.
 *
 *   describeEachFormat(title, (format) => { ...tests... }, { needs: 'write' })
 *
 * registers the same test bodies once per format entry that can do them (a
 * describe per format). Shapes are built lazily, once per test file (the first
 * test that needs one builds it; later tests reuse it), in one temp directory
 * removed after the file. `oracleRaw` memoizes `qemu-img convert -O raw` of a
 * built image the same way.
 *
 * Every image of one format lives in one directory under a name unique to its
 * shape (`v3.qcow2`, `v3.data`...), so one mount can carry all of them (each
 * shown as `<shape>.raw`).
 */
import { mkdtemp, mkdir, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import type { MapRun } from '../../src/index.js';
import { normalizeMap, qemuConvertToRawFile, qemuImg, qemuIo, skipWithoutQemu, type MapShape, type QemuMapRun, type SnapshotSelector } from './qemu.js';
import { seededRandom } from './random.js';
import { dmgEntry } from './formats-dmg.js';
import { vdiFormat } from './formats-vdi.js';
import { vhdxFormat } from './formats-vhdx.js';
import { vmdkEntry } from './formats-vmdk.js';
import { vpcEntry } from './formats-vpc.js';
import { qcowEntry } from './formats-qcow.js';
import { parallelsEntry } from './formats-parallels.js';
import { bochsEntry } from './formats-bochs.js';
import { cloopEntry } from './formats-cloop.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export type FormatName = 'raw' | 'qed' | 'qcow2' | 'vdi' | 'vhdx' | 'vmdk' | 'vpc' | 'qcow' | 'parallels' | 'bochs' | 'cloop' | 'dmg';

/** An image a shape built, and what the tests need to know about it. */
export interface BuiltImage {
  /** Absolute path of the top image. */
  path: string;
  format: FormatName;
  description: string;
  /** The format of each layer, top first: ['qcow2', 'qed', 'raw'] for qcow2 over qed over raw. */
  layers: FormatName[];
  /** The top image's cluster size (raw: a nominal 4 KiB), for the sizes of random writes. */
  clusterSize: number;
  /** Where the top image's data lives when not in its own file (qcow2 external data file). */
  dataFile?: string;
  /**
   * The directory qemu-img must run in to open the image: qemu resolves a relative
   * external data file name against its cwd, not against the image's directory.
   */
  qemuCwd?: string;
  /** Virtual size of the backing file, when it is shorter than the image. */
  backingLength?: number;
  /** Internal snapshots to open and compare with `qemu-img convert -l`. */
  snapshots?: SnapshotCase[];
  /** What qemu-img says about the built image: its map shows these kinds of run (and not those in `mapNot`), its info has these fields. */
  qemuSays: QemuSays;
}

export interface QemuSays {
  map?: MapFeature[];
  mapNot?: MapFeature[];
  info?: Record<string, unknown>;
}

export interface SnapshotCase {
  /** What openImage's `snapshot` option is given (a name or an id). */
  open: string;
  qemu: SnapshotSelector;
}

/**
 * Kinds of run a shape's `qemu-img map` must show, so a shape cannot silently
 * stop testing what it is named for (a qemu change, a wrong option):
 * compressed (depth 0 data without an offset), zero (a zero cluster or
 * subcluster), zero-allocated (zero with an offset: qcow2 write -z without -u,
 * preallocation, or a hole in a raw file), unallocated (depth 0, not present),
 * data-over-host-hole (data: true and zero: true: allocated, never written,
 * a hole in the host file), backing-data (data in a backing file),
 * backing-compressed, depth-2 (data two layers down), subclusters (a zero or
 * unallocated run not aligned to the cluster size).
 */
export type MapFeature =
  | 'compressed' | 'zero' | 'zero-allocated' | 'unallocated' | 'data-over-host-hole'
  | 'backing-data' | 'backing-compressed' | 'depth-2' | 'subclusters';

/** Whether qemu-img map's runs show `feature`. */
export function qemuMapHas(runs: readonly QemuMapRun[], feature: MapFeature, clusterSize: number): boolean {
  return runs.some((run) => {
    switch (feature) {
      case 'compressed':
        return run.depth === 0 && run.data && run.offset === undefined;
      case 'zero':
        return run.depth === 0 && run.present && run.zero && !run.data;
      case 'zero-allocated':
        return run.depth === 0 && run.present && run.zero && !run.data && run.offset !== undefined;
      case 'unallocated':
        return run.depth === 0 && !run.present;
      case 'data-over-host-hole':
        return run.depth === 0 && run.data && run.zero;
      case 'backing-data':
        return run.depth >= 1 && run.data;
      case 'backing-compressed':
        return run.depth >= 1 && run.data && run.offset === undefined;
      case 'depth-2':
        return run.depth === 2 && run.data;
      case 'subclusters':
        return run.depth === 0 && !run.data && (run.start % clusterSize !== 0 || run.length % clusterSize !== 0);
    }
  });
}

export interface Shape {
  /** Unique within its format; also the base name of the image file. */
  name: string;
  description: string;
  /** Internal snapshots the built image has (also in BuiltImage), known before building so tests can be listed. */
  snapshots?: SnapshotCase[];
  /** For a writable format: what the notice of a read-write open says when this shape still opens read-only. */
  readOnly?: RegExp;
  build(dir: string): Promise<BuiltImage>;
}

export interface FormatEntry {
  name: FormatName;
  /** Image file extension ('.qcow2'). */
  extension: string;
  /** Whether this library writes the format (shapes with `readOnly` excepted). */
  writable: boolean;
  /** Whether `qemu-img check` can check the format (not raw: exit 63). */
  checkable: boolean;
  /** Whether the format has internal snapshots. */
  snapshots: boolean;
  /** Images of this format alone (backing files of the same format included). */
  shapes: Shape[];
  /** Backing chains across formats whose top image is of this format. */
  chains: Shape[];
}

// ---------------------------------------------------------------------------
// Content generators (seeded, so a failure reproduces)
// ---------------------------------------------------------------------------

const TEXT = Buffer.from('The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n', 'latin1');

/**
 * Partly compressible content: runs (512 B .. 96 KiB, zeros up to 320 KiB) of
 * random bytes, text, zeros, and text sprinkled with random bytes.
 */
export function mixedContent(size: number, seed: number): Buffer {
  const random = seededRandom(seed);
  const out = Buffer.alloc(size);
  let offset = 0;
  while (offset < size) {
    const kind = random.int(0, 3);
    const length = Math.min(size - offset, random.int(512, kind === 2 ? 320 * KiB : 96 * KiB));
    const part = out.subarray(offset, offset + length);
    if (kind === 0) random.fill(part);
    else if (kind === 1 || kind === 3) {
      for (let i = 0; i < length; i++) part[i] = TEXT[(offset + i) % TEXT.length]!;
      if (kind === 3) for (let i = random.int(0, 63); i < length; i += random.int(1, 128)) part[i] = random.int(0, 255);
    }
    offset += length;
  }
  return out;
}

/** Seeded random bytes. */
export function randomBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  seededRandom(seed).fill(out);
  return out;
}

/** A sparse raw file of `size` bytes: random chunks at unaligned offsets, holes between them (and at both ends). */
async function sparseRandomFile(path: string, size: number, seed: number): Promise<void> {
  const random = seededRandom(seed);
  const handle = await open(path, 'w');
  try {
    await handle.truncate(size);
    let offset = random.int(64 * KiB, 200 * KiB) + 3;
    while (offset < size - 300 * KiB) {
      const length = random.int(1, 180 * KiB);
      const data = Buffer.alloc(length);
      random.fill(data);
      await handle.write(data, 0, length, offset);
      offset += length + random.int(4 * KiB, 400 * KiB) + random.int(0, 511);
    }
  } finally {
    await handle.close();
  }
}

// ---------------------------------------------------------------------------
// qemu-io command lists
// ---------------------------------------------------------------------------

/** Pattern writes at unaligned offsets: across cluster boundaries, over several clusters, the first byte, the middle, the tail. */
function patternWrites(size: number, c: number, salt: number): string[] {
  const p = (k: number) => `0x${((salt + k * 0x11) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} ${c - 100} 300`,
    `write -P ${p(2)} ${3 * c + 17} ${2 * c + 5}`,
    `write -P ${p(3)} 1 1`,
    `write -P ${p(4)} ${Math.floor(size / 2) + 333} 4097`,
    `write -P ${p(5)} ${size - 700} 700`,
    `write -P ${p(6)} ${c - 40} 10`, // rewrite inside an allocated cluster
  ];
}

/** The cluster with index `i`, wrapping inside the image. */
function clusterAt(size: number, c: number, i: number): number {
  return (i % Math.floor(size / c)) * c;
}

/**
 * Zero writes and discards, v3 style: a zero cluster that keeps its allocation
 * (write -z), one that gives it up (write -z -u), a discard, unaligned zero
 * writes inside data, zero clusters over unallocated space and data written
 * into a zero cluster afterwards.
 */
function zeroWritesV3(size: number, c: number): string[] {
  const at = (i: number) => clusterAt(size, c, i);
  return [
    `write -P 0x61 ${at(6)} ${Math.min(3 * c, size - at(6))}`,
    `write -z ${at(6)} ${c}`,
    `write -z -u ${at(7)} ${c}`,
    `discard ${at(8)} ${c}`,
    `write -z ${3 * c + 100} 50`,
    `write -z ${at(10)} ${Math.min(2 * c, size - at(10))}`,
    `write -P 0x62 ${at(10) + 7} 20`,
    `write -z -u ${at(12)} ${c}`,
  ];
}

/** Zero writes and discards on a v2 image (no zero flag: qemu discards or writes zeros). */
function zeroWritesV2(size: number, c: number): string[] {
  const at = (i: number) => clusterAt(size, c, i);
  return [
    `write -P 0x71 ${at(6)} ${Math.min(3 * c, size - at(6))}`,
    `write -z ${at(6)} ${c}`,
    `discard ${at(8)} ${c}`,
    `write -z ${3 * c + 100} 50`,
    `write -z ${at(10)} ${Math.min(2 * c, size - at(10))}`,
    `write -P 0x72 ${at(10) + 7} 20`,
  ];
}

// ---------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------

/** Writes `content` to a raw file next to `path` and `qemu-img convert -n`s it into the existing image. */
async function convertInto(path: string, format: FormatName, content: Buffer, dir: string, name: string): Promise<void> {
  const source = join(dir, `${name}.source.tmp`);
  await writeFile(source, content);
  try {
    await qemuImg(['convert', '-n', '-f', 'raw', '-O', format, source, path], { cwd: dir });
  } finally {
    await rm(source, { force: true });
  }
}

interface Qcow2Plan {
  name: string;
  description: string;
  size: number;
  clusterSize?: number;
  /** -o options besides cluster_size. */
  options?: string[];
  /** Random data copied in first (qemu-img convert -n of a raw of mixed content). */
  seed?: number;
  commands?: (size: number, c: number) => string[];
  /** Steps after the qemu-io commands (snapshots...). */
  after?: (path: string, dir: string) => Promise<void>;
  /** External data file name: relative (qemu then runs in the image's directory), or made absolute. */
  dataFile?: { name: string; absolute: boolean };
  snapshots?: SnapshotCase[];
  /** Backing file (already built, name relative to the directory) and its format. */
  backing?: { name: string; format: FormatName; length: number };
  layers?: FormatName[];
  says?: { map?: MapFeature[]; mapNot?: MapFeature[] };
}

/** The qemu-img info fields a qcow2 plan's options must produce. */
function qcow2Info(plan: Qcow2Plan, c: number, dataFileOption: string | undefined, backing: Qcow2Plan['backing']): Record<string, unknown> {
  const options = Object.fromEntries((plan.options ?? []).map((option) => option.split('=') as [string, string]));
  const data: Record<string, unknown> = { compat: options['compat'] === '0.10' ? '0.10' : '1.1' };
  if (options['extended_l2'] !== undefined) data['extended-l2'] = options['extended_l2'] === 'on';
  if (options['refcount_bits'] !== undefined) data['refcount-bits'] = Number(options['refcount_bits']);
  if (dataFileOption !== undefined) {
    data['data-file'] = dataFileOption;
    data['data-file-raw'] = options['data_file_raw'] === 'on';
  }
  const info: Record<string, unknown> = { 'cluster-size': c, 'format-specific': { type: 'qcow2', data } };
  if (plan.snapshots) info['snapshots'] = plan.snapshots.map(() => expect.anything());
  if (backing) Object.assign(info, { 'backing-filename': backing.name, 'backing-filename-format': backing.format });
  return info;
}

function qcow2Shape(plan: Qcow2Plan, prepare?: (dir: string) => Promise<Qcow2Plan['backing']>): Shape {
  return {
    name: plan.name,
    description: plan.description,
    snapshots: plan.snapshots,
    async build(dir) {
      const backing = prepare ? await prepare(dir) : plan.backing;
      const path = join(dir, `${plan.name}.qcow2`);
      const c = plan.clusterSize ?? 64 * KiB;
      const options = [`cluster_size=${c}`, ...(plan.options ?? [])];
      const dataFile = plan.dataFile ? join(dir, plan.dataFile.name) : undefined;
      const dataFileOption = plan.dataFile ? (plan.dataFile.absolute ? dataFile : plan.dataFile.name) : undefined;
      if (dataFileOption !== undefined) options.push(`data_file=${dataFileOption}`);
      const backingArgs = backing ? ['-b', backing.name, '-F', backing.format] : [];
      await qemuImg(['create', '-f', 'qcow2', '-o', options.join(','), ...backingArgs, path, String(plan.size)], { cwd: dir });
      if (plan.seed !== undefined) await convertInto(path, 'qcow2', mixedContent(plan.size, plan.seed), dir, plan.name);
      if (plan.commands) await qemuIo(path, plan.commands(plan.size, c), 'qcow2', { cwd: dir });
      if (plan.after) await plan.after(path, dir);
      return {
        path,
        format: 'qcow2',
        description: plan.description,
        layers: plan.layers ?? (backing ? ['qcow2', backing.format] : ['qcow2']),
        clusterSize: c,
        dataFile,
        qemuCwd: plan.dataFile && !plan.dataFile.absolute ? dir : undefined,
        backingLength: backing && backing.length < plan.size ? backing.length : undefined,
        snapshots: plan.snapshots,
        qemuSays: { ...plan.says, info: qcow2Info(plan, c, dataFileOption, backing) },
      };
    },
  };
}

/** A compressed qcow2 (`qemu-img convert -c`) of mixed content, then partly rewritten by qemu-io. */
function compressedShape(name: string, compression: 'zlib' | 'zstd', c: number, size: number, seed: number): Shape {
  const description = `qemu-img convert -c -o compression_type=${compression},cluster_size=${c} of text + random + zeros, then qemu-io writes over compressed clusters and write -c`;
  return {
    name,
    description,
    async build(dir) {
      const source = join(dir, `${name}.source.tmp`);
      const path = join(dir, `${name}.qcow2`);
      const at = (i: number) => clusterAt(size, c, i);
      const content = mixedContent(size, seed);
      // qemu writes compressed clusters only where nothing is allocated: leave clusters 4..6 unallocated
      content.fill(0, at(4), at(4) + 3 * c);
      await writeFile(source, content);
      try {
        await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${compression},cluster_size=${c}`, source, path]);
      } finally {
        await rm(source, { force: true });
      }
      await qemuIo(path, [
        `write -P 0x81 ${at(1) + 100} 50`, // partial rewrite of a compressed cluster: copy-on-write through decompression
        `write -P 0x82 ${at(2)} ${c}`, // a whole cluster replaced
        `write -c -P 0x83 ${at(4)} ${c}`, // compressed writes by qemu-io
        `write -c -P 0x84 ${at(5)} ${2 * c}`,
        `write -z ${at(3)} ${c}`,
        `write -P 0x85 ${size - 333} 333`,
      ], 'qcow2');
      const info = { 'cluster-size': c, 'format-specific': { type: 'qcow2', data: { 'compression-type': compression } } };
      return { path, format: 'qcow2', description, layers: ['qcow2'], clusterSize: c, qemuSays: { map: ['compressed'], info } };
    },
  };
}

interface QedPlan {
  name: string;
  description: string;
  size: number;
  clusterSize?: number;
  tableSize?: number;
  /** qemu-img convert -O qed of a raw of mixed content (instead of create). */
  convertSeed?: number;
  commands?: (size: number, c: number) => string[];
  backing?: { name: string; format: FormatName; length: number };
  layers?: FormatName[];
  says?: { map?: MapFeature[]; mapNot?: MapFeature[] };
}

function qedShape(plan: QedPlan, prepare?: (dir: string) => Promise<QedPlan['backing']>): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir) {
      const backing = prepare ? await prepare(dir) : plan.backing;
      const path = join(dir, `${plan.name}.qed`);
      const c = plan.clusterSize ?? 64 * KiB;
      const options = [`cluster_size=${c}`, `table_size=${plan.tableSize ?? 4}`].join(',');
      if (plan.convertSeed !== undefined) {
        const source = join(dir, `${plan.name}.source.tmp`);
        await writeFile(source, mixedContent(plan.size, plan.convertSeed));
        try {
          await qemuImg(['convert', '-f', 'raw', '-O', 'qed', '-o', options, source, path]);
        } finally {
          await rm(source, { force: true });
        }
      } else {
        const backingArgs = backing ? ['-b', backing.name, '-F', backing.format] : [];
        await qemuImg(['create', '-f', 'qed', '-o', options, ...backingArgs, path, String(plan.size)], { cwd: dir });
      }
      if (plan.commands) await qemuIo(path, plan.commands(plan.size, c), 'qed', { cwd: dir });
      return {
        path,
        format: 'qed',
        description: plan.description,
        layers: plan.layers ?? (backing ? ['qed', backing.format] : ['qed']),
        clusterSize: c,
        backingLength: backing && backing.length < plan.size ? backing.length : undefined,
        qemuSays: { ...plan.says, info: { 'cluster-size': c, ...(backing ? { 'backing-filename': backing.name } : {}) } },
      };
    },
  };
}

/** A fully written raw file (no holes: qemu-img map reports a raw file's holes as zeros, see mapForComparison). */
async function rawBase(dir: string, name: string, size: number, seed: number): Promise<{ name: string; format: FormatName; length: number }> {
  await writeFile(join(dir, name), randomBytes(size, seed));
  return { name, format: 'raw', length: size };
}

/** A qcow2 base of mixed content with some qemu-io writes, for chains. */
async function qcow2Base(dir: string, name: string, size: number, seed: number, options = 'cluster_size=65536', backing?: { name: string; format: FormatName }): Promise<{ name: string; format: FormatName; length: number }> {
  const path = join(dir, name);
  await qemuImg(['create', '-f', 'qcow2', '-o', options, ...(backing ? ['-b', backing.name, '-F', backing.format] : []), path, String(size)], { cwd: dir });
  if (!backing) await convertInto(path, 'qcow2', mixedContent(size, seed), dir, name);
  await qemuIo(path, [`write -P 0x91 ${size - 5000} 5000`, 'write -z 131072 65536', 'write -P 0x92 70000 3000'], 'qcow2', { cwd: dir });
  return { name, format: 'qcow2', length: size };
}

/** A QED base with data, a zero cluster and data at its very end, for chains. */
async function qedBase(dir: string, name: string, size: number, backing?: { name: string; format: FormatName }): Promise<{ name: string; format: FormatName; length: number }> {
  const path = join(dir, name);
  await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096,table_size=2', ...(backing ? ['-b', backing.name, '-F', backing.format] : []), path, String(size)], { cwd: dir });
  await qemuIo(path, ['write -P 0xc1 5000 20000', 'write -z 40960 8192', `write -P 0xc2 ${size - 4096 - 100} 4196`, `write -P 0xc3 ${Math.floor(size / 2)} 70000`], 'qed', { cwd: dir });
  return { name, format: 'qed', length: size };
}

/** Writes a top image of a chain gets: partial clusters over backing data (copy-on-write), a zero cluster hiding it, writes straddling the end of a shorter backing file, the image tail. */
function chainTopWrites(format: 'qed' | 'qcow2', backingLength: number) {
  return (size: number, c: number): string[] => [
    `write -P 0xa1 ${c + 7} 33`,
    `write -z ${4 * c} ${c}`,
    `write -P 0xa2 ${Math.min(size - 3000, Math.max(0, backingLength - 1000))} 3000`,
    `write -P 0xa3 ${size - 513} 513`,
    `write -P 0xa4 ${6 * c - 10} ${c + 20}`,
    ...(format === 'qcow2' ? [`write -z ${7 * c + 512} 1024`, `discard ${8 * c} ${c}`] : []),
  ];
}

// ---------------------------------------------------------------------------
// The entries
// ---------------------------------------------------------------------------

const qcow2Shapes: Shape[] = [
  qcow2Shape({
    name: 'v2',
    says: { map: ['unallocated'], mapNot: ['zero'] },
    description: 'compat=0.10 (version 2), 64 KiB clusters, random data, unaligned pattern writes, write -z and discard (no zero flag in v2)',
    size: 6 * MiB + 1536,
    options: ['compat=0.10'],
    seed: 201,
    commands: (size, c) => [...patternWrites(size, c, 0x10), ...zeroWritesV2(size, c)],
  }),
  qcow2Shape({
    name: 'v3',
    says: { map: ['zero', 'zero-allocated'] },
    description: 'compat=1.1 (version 3), 64 KiB clusters, random data, unaligned pattern writes, write -z, write -z -u, discard',
    size: 6 * MiB + 1536,
    options: ['compat=1.1'],
    seed: 202,
    commands: (size, c) => [...patternWrites(size, c, 0x20), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape({
    name: 'cluster-512',
    says: { map: ['zero', 'zero-allocated'] },
    description: 'cluster_size=512 (64-entry L2 tables: many L2 tables, a multi-cluster L1), random data, writes, zeros',
    size: 3 * MiB,
    clusterSize: 512,
    seed: 203,
    commands: (size, c) => [...patternWrites(size, c, 0x30), ...zeroWritesV3(size, c), `write -P 0x33 ${40 * KiB - 3} ${70 * KiB}`],
  }),
  qcow2Shape({
    name: 'cluster-4k',
    says: { map: ['zero', 'zero-allocated'] },
    description: 'cluster_size=4096 (an L2 table covers 2 MiB), random data, writes across L2 tables, zeros',
    size: 6 * MiB + 512,
    clusterSize: 4096,
    seed: 204,
    commands: (size, c) => [...patternWrites(size, c, 0x40), ...zeroWritesV3(size, c), `write -P 0x44 ${2 * MiB - 3000} 9000`, `write -z ${4 * MiB - c} ${2 * c}`],
  }),
  qcow2Shape({
    name: 'cluster-64k',
    says: { map: ['zero', 'zero-allocated', 'unallocated'] },
    description: 'cluster_size=65536 (the default), written only by qemu-io patterns, no random data',
    size: 5 * MiB,
    commands: (size, c) => [...patternWrites(size, c, 0x50), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape({
    name: 'cluster-2m',
    says: { map: ['zero', 'zero-allocated'] },
    description: 'cluster_size=2M, 16 MiB + 512, random data, writes, zeros',
    size: 16 * MiB + 512,
    clusterSize: 2 * MiB,
    seed: 205,
    commands: (size, c) => [...patternWrites(size, c, 0x60), ...zeroWritesV3(size, c)],
  }),
  compressedShape('zlib', 'zlib', 64 * KiB, 4 * MiB, 206),
  compressedShape('zlib-4k', 'zlib', 4096, 3 * MiB, 207),
  compressedShape('zstd', 'zstd', 64 * KiB, 4 * MiB, 208),
  compressedShape('zstd-2m', 'zstd', 2 * MiB, 16 * MiB, 209),
  qcow2Shape({
    name: 'extended-l2',
    says: { map: ['subclusters', 'zero', 'unallocated'] },
    description: 'extended_l2=on, 64 KiB clusters (2 KiB subclusters), partial subcluster writes, write -z / -z -u on subclusters, discard of a subcluster',
    size: 4 * MiB,
    options: ['extended_l2=on'],
    commands: (size, c) => [
      'write -P 0xab 1536 1000', // two partly written subclusters of a new cluster
      'write -z 8192 4096', // zero subclusters in the same cluster
      `write -P 0xac ${c} ${c}`,
      `write -z ${c + 4096} 2048`, // a zero subcluster inside data
      `write -z -u ${c + 8192} 6144`,
      `discard ${c + 16 * KiB} 2048`,
      `write -P 0xad ${c + 20 * KiB + 100} 10`,
      `write -P 0xae ${3 * c + 1000} 5000`, // subclusters 0..2 of another cluster, partly
      `write -z ${5 * c} ${c}`, // a whole zero cluster
      `write -P 0xaf ${size - 1000} 1000`,
    ],
  }),
  qcow2Shape(
    {
      name: 'extended-l2-backing',
      says: { map: ['subclusters', 'backing-data', 'zero'] },
      description: 'extended_l2=on over a qcow2 backing file: unwritten subclusters of allocated clusters read from the backing file, zero subclusters hide it',
      size: 4 * MiB,
      options: ['extended_l2=on'],
      commands: (size, c) => [
        'write -P 0xab 1536 1000',
        `write -z ${c + 4096} 2048`,
        `write -P 0xb1 ${c + 30000} 777`,
        `write -z -u ${2 * c + 2048} 4096`,
        `write -P 0xb2 ${3 * c - 1000} 2000`,
        `write -P 0xb3 ${size - 700} 700`,
      ],
    },
    (dir) => qcow2Base(dir, 'extended-l2-backing-base.qcow2', 4 * MiB, 210),
  ),
  qcow2Shape({
    name: 'refcount-1',
    says: { map: ['zero'] },
    description: 'refcount_bits=1, random data, writes, zeros',
    size: 4 * MiB,
    options: ['refcount_bits=1'],
    seed: 211,
    commands: (size, c) => [...patternWrites(size, c, 0x70), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape({
    name: 'refcount-64',
    says: { map: ['zero'] },
    description: 'refcount_bits=64, random data, writes, zeros',
    size: 4 * MiB,
    options: ['refcount_bits=64'],
    seed: 212,
    commands: (size, c) => [...patternWrites(size, c, 0x80), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape({
    name: 'snapshots',
    says: { map: ['zero'] },
    description: 'internal snapshots snap1 and snap2 (qemu-img snapshot -c) with writes after each; the current state differs from both',
    size: 4 * MiB,
    seed: 213,
    commands: (size, c) => patternWrites(size, c, 0x90),
    async after(path) {
      await qemuImg(['snapshot', '-c', 'snap1', path]);
      await qemuIo(path, ['write -P 0x94 70000 100', `write -P 0x95 ${2 * MiB} ${3 * 64 * KiB}`, 'write -z 0 65536', 'discard 196608 65536'], 'qcow2');
      await qemuImg(['snapshot', '-c', 'snap2', path]);
      await qemuIo(path, ['write -P 0x96 70010 10', `write -P 0x97 ${3 * MiB + 5} 100000`], 'qcow2');
    },
    snapshots: [
      { open: 'snap1', qemu: { name: 'snap1' } },
      { open: '2', qemu: { id: '2' } },
    ],
  }),
  qcow2Shape({
    name: 'data-file',
    says: { map: ['zero', 'zero-allocated'] },
    description: 'an external data file under a relative name (data_file=data-file.data), random data, writes, zeros',
    size: 4 * MiB,
    dataFile: { name: 'data-file.data', absolute: false },
    seed: 214,
    commands: (size, c) => [...patternWrites(size, c, 0xa0), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape({
    name: 'data-file-raw',
    says: { map: ['zero'] },
    description: 'an external data file under an absolute name with data_file_raw=on (host offset = guest offset), random data, writes, zeros',
    size: 4 * MiB,
    dataFile: { name: 'data-file-raw.data', absolute: true },
    options: ['data_file_raw=on'],
    seed: 215,
    commands: (size, c) => [...patternWrites(size, c, 0xb0), ...zeroWritesV3(size, c)],
  }),
  qcow2Shape(
    {
      name: 'backing',
      says: { map: ['backing-data', 'zero'] },
      description: 'over a qcow2 backing file of the same size: copy-on-write partial clusters, zero clusters and discards hiding backing data',
      size: 4 * MiB,
      commands: chainTopWrites('qcow2', 4 * MiB),
    },
    (dir) => qcow2Base(dir, 'backing-base.qcow2', 4 * MiB, 216),
  ),
  qcow2Shape(
    {
      name: 'backing-shorter',
      says: { map: ['backing-data', 'zero'] },
      description: 'over a qcow2 backing file shorter than the image (3 MiB + 4608 under 8 MiB): past its end reads zeros',
      size: 8 * MiB,
      commands: chainTopWrites('qcow2', 3 * MiB + 4608),
    },
    (dir) => qcow2Base(dir, 'backing-shorter-base.qcow2', 3 * MiB + 4608, 217),
  ),
  qcow2Shape(
    {
      name: 'v2-backing',
      says: { map: ['backing-data'], mapNot: ['zero'] },
      description: 'compat=0.10 over a compat=0.10 backing file: write -z must hide backing data without a zero flag',
      size: 4 * MiB,
      options: ['compat=0.10'],
      commands: (size, c) => [...chainTopWrites('qed', 4 * MiB)(size, c), `write -z ${7 * c + 512} 1024`, `write -z ${9 * c} ${2 * c}`],
    },
    (dir) => qcow2Base(dir, 'v2-backing-base.qcow2', 4 * MiB, 218, 'compat=0.10'),
  ),
  qcow2Shape({
    name: 'preallocated',
    says: { map: ['data-over-host-hole', 'zero'] },
    description: 'preallocation=metadata (every cluster allocated, most never written), then writes and zeros',
    size: 3 * MiB,
    options: ['preallocation=metadata'],
    commands: (size, c) => [...patternWrites(size, c, 0xc0), `write -z ${2 * c} ${c}`, `write -z -u ${5 * c} ${c}`],
  }),
];

const qcow2Chains: Shape[] = [
  qcow2Shape(
    {
      name: 'over-qed-over-raw',
      says: { map: ['backing-data', 'depth-2', 'zero'] },
      description: 'qcow2 (4 MiB) over QED (3 MiB, 4 KiB clusters) over raw (2 MiB)',
      size: 4 * MiB,
      commands: chainTopWrites('qcow2', 3 * MiB),
      layers: ['qcow2', 'qed', 'raw'],
    },
    async (dir) => {
      const raw = await rawBase(dir, 'over-qed-over-raw-base.raw', 2 * MiB, 301);
      return qedBase(dir, 'over-qed-over-raw-mid.qed', 3 * MiB, raw);
    },
  ),
  qcow2Shape(
    {
      name: 'over-raw',
      says: { map: ['backing-data', 'zero'] },
      description: 'qcow2 over a raw backing file of the same size',
      size: 4 * MiB,
      commands: chainTopWrites('qcow2', 4 * MiB),
    },
    (dir) => rawBase(dir, 'over-raw-base.raw', 4 * MiB, 302),
  ),
  qcow2Shape(
    {
      name: 'over-shorter-raw',
      says: { map: ['backing-data', 'zero'] },
      description: 'qcow2 (6 MiB, 4 KiB clusters) over a raw backing file of 1 MiB + 4608: past its end reads zeros',
      size: 6 * MiB,
      clusterSize: 4096,
      commands: chainTopWrites('qcow2', MiB + 4608),
    },
    (dir) => rawBase(dir, 'over-shorter-raw-base.raw', MiB + 4608, 303),
  ),
  qcow2Shape(
    {
      name: 'over-shorter-qed',
      says: { map: ['backing-data', 'zero'] },
      description: 'qcow2 (6 MiB) over a QED backing file of 2 MiB + 512',
      size: 6 * MiB,
      commands: chainTopWrites('qcow2', 2 * MiB + 512),
    },
    (dir) => qedBase(dir, 'over-shorter-qed-base.qed', 2 * MiB + 512),
  ),
];

const qedShapes: Shape[] = [
  qedShape({
    name: 'default',
    says: { map: ['unallocated', 'zero'] },
    description: 'default geometry (64 KiB clusters, table_size 4), unaligned pattern writes, a zero cluster, data written into another zero cluster, write -z over data (qemu writes zeros in place)',
    size: 6 * MiB + 512,
    commands: (size, c) => [
      ...patternWrites(size, c, 0x15),
      `write -z ${2 * c} ${c}`,
      `write -z ${9 * c} ${c}`,
      `write -z ${3 * c} ${c}`,
      `write -z ${8 * c + 17} 100`,
      `write -P 0x66 ${2 * c + 10} 10`,
    ],
  }),
  qedShape({
    name: 'cluster-4k',
    says: { map: ['unallocated', 'zero'] },
    description: 'cluster_size=4096, table_size=2 (an L2 table covers 4 MiB): writes across L2 tables, zero clusters across a cluster boundary, zero clusters across an L2 boundary then written into',
    size: 10 * MiB + 512,
    clusterSize: 4096,
    tableSize: 2,
    commands: (size, c) => [
      ...patternWrites(size, c, 0x25),
      `write -P 0x22 ${4 * MiB - 3000} 9000`,
      `write -z ${8 * MiB - c} ${2 * c}`,
      `write -z ${6 * MiB - c} ${2 * c}`,
      `write -P 0x77 ${8 * MiB - 5} 10`,
    ],
  }),
  qedShape({
    name: 'zero-clusters',
    says: { map: ['zero', 'unallocated'] },
    description: 'whole zero clusters (L2 entry 1) written over data and over unallocated space, partial zero writes, data rewritten into a zero cluster',
    size: 3 * MiB,
    clusterSize: 4096,
    tableSize: 2,
    commands: (size, c) => [
      `write -P 0x35 0 ${20 * c}`,
      `write -z ${2 * c} ${3 * c}`,
      `write -z ${30 * c} ${c}`,
      `write -z ${7 * c + 17} 100`,
      `write -P 0x36 ${3 * c + 5} 10`,
      `write -z ${size - c} ${c}`,
    ],
  }),
  qedShape({
    name: 'converted',
    says: { map: ['unallocated'] },
    description: 'qemu-img convert -O qed (4 KiB clusters) of random + text + zeros, then pattern writes',
    size: 5 * MiB,
    clusterSize: 4096,
    convertSeed: 401,
    commands: (size, c) => patternWrites(size, c, 0x45),
  }),
  qedShape(
    {
      name: 'backing',
      says: { map: ['backing-data', 'zero'] },
      description: 'over a shorter QED backing file (3 MiB - 512 under 5 MiB): copy-on-write partial clusters, a zero cluster hiding backing data, writes across the backing end',
      size: 5 * MiB,
      commands: chainTopWrites('qed', 3 * MiB - 512),
    },
    (dir) => qedBase(dir, 'backing-base.qed', 3 * MiB - 512),
  ),
];

const qedChains: Shape[] = [
  qedShape(
    {
      name: 'over-qcow2',
      says: { map: ['backing-compressed', 'zero'] },
      description: 'QED over a compressed-and-rewritten qcow2 of the same size',
      size: 4 * MiB,
      commands: chainTopWrites('qed', 4 * MiB),
    },
    async (dir) => {
      const name = 'over-qcow2-base.qcow2';
      const source = join(dir, `${name}.source.tmp`);
      await writeFile(source, mixedContent(4 * MiB, 501));
      try {
        await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', source, join(dir, name)]);
      } finally {
        await rm(source, { force: true });
      }
      await qemuIo(join(dir, name), ['write -P 0xd1 100000 3000', 'write -z 262144 65536'], 'qcow2');
      return { name, format: 'qcow2' as const, length: 4 * MiB };
    },
  ),
  qedShape(
    {
      name: 'over-shorter-qcow2',
      says: { map: ['backing-data', 'zero'] },
      description: 'QED (6 MiB, 4 KiB clusters) over a qcow2 backing file of 2 MiB + 1536',
      size: 6 * MiB,
      clusterSize: 4096,
      tableSize: 2,
      commands: chainTopWrites('qed', 2 * MiB + 1536),
    },
    (dir) => qcow2Base(dir, 'over-shorter-qcow2-base.qcow2', 2 * MiB + 1536, 502, 'cluster_size=4096'),
  ),
  qedShape(
    {
      name: 'over-qcow2-over-raw',
      says: { map: ['backing-data', 'depth-2', 'zero'] },
      description: 'QED (5 MiB) over qcow2 v3 (4 MiB, 512-byte clusters) over raw (3 MiB)',
      size: 5 * MiB,
      commands: chainTopWrites('qed', 4 * MiB),
      layers: ['qed', 'qcow2', 'raw'],
    },
    async (dir) => {
      const raw = await rawBase(dir, 'over-qcow2-over-raw-base.raw', 3 * MiB, 503);
      return qcow2Base(dir, 'over-qcow2-over-raw-mid.qcow2', 4 * MiB, 504, 'cluster_size=512', raw);
    },
  ),
  qedShape(
    {
      name: 'over-shorter-raw',
      says: { map: ['backing-data', 'zero'] },
      description: 'QED (6 MiB, 4 KiB clusters) over a raw backing file of 1 MiB + 4608',
      size: 6 * MiB,
      clusterSize: 4096,
      tableSize: 2,
      commands: chainTopWrites('qed', MiB + 4608),
    },
    (dir) => rawBase(dir, 'over-shorter-raw-base.raw', MiB + 4608, 505),
  ),
];

const rawShapes: Shape[] = [
  {
    name: 'holes',
    description: 'random data at unaligned offsets with holes between (a sparse file, holes at both ends), 5 MiB',
    async build(dir) {
      const path = join(dir, 'holes.raw');
      await sparseRandomFile(path, 5 * MiB, 601);
      return { path, format: 'raw', description: rawShapes[0]!.description, layers: ['raw'], clusterSize: 4096, qemuSays: { map: ['zero-allocated'] } };
    },
  },
  {
    name: 'filled',
    description: 'random data in every byte, 3 MiB + 512, then qemu-io pattern writes',
    async build(dir) {
      const path = join(dir, 'filled.raw');
      const size = 3 * MiB + 512;
      await writeFile(path, randomBytes(size, 602));
      await qemuIo(path, patternWrites(size, 4096, 0x55), 'raw');
      return { path, format: 'raw', description: rawShapes[1]!.description, layers: ['raw'], clusterSize: 4096, qemuSays: { mapNot: ['zero'] } };
    },
  },
];

export const FORMATS: readonly FormatEntry[] = [
  { name: 'raw', extension: '.raw', writable: true, checkable: false, snapshots: false, shapes: rawShapes, chains: [] },
  { name: 'qed', extension: '.qed', writable: true, checkable: true, snapshots: false, shapes: qedShapes, chains: qedChains },
  { name: 'qcow2', extension: '.qcow2', writable: true, checkable: true, snapshots: true, shapes: qcow2Shapes, chains: qcow2Chains },
  vdiFormat,
  vhdxFormat,
  vmdkEntry,
  vpcEntry,
  qcowEntry,
  parallelsEntry,
  bochsEntry,
  cloopEntry,
  dmgEntry,
];

// ---------------------------------------------------------------------------
// Building once per test file
// ---------------------------------------------------------------------------

let root: Promise<string> | undefined;
const builds = new Map<string, Promise<BuiltImage>>();
const oracles = new Map<string, Promise<string>>();

function rootDir(): Promise<string> {
  root ??= mkdtemp(join(tmpdir(), 'imgmount-conformance-'));
  return root;
}

afterAll(async () => {
  if (root) await rm(await root, { recursive: true, force: true });
  root = undefined;
  builds.clear();
  oracles.clear();
});

/** The directory holding every image of `format`. */
export async function formatDir(format: FormatEntry): Promise<string> {
  const dir = join(await rootDir(), format.name);
  await mkdir(dir, { recursive: true });
  return dir;
}

/** Builds `shape` of `format` (once per test file) and describes the result. */
export function built(format: FormatEntry, shape: Shape): Promise<BuiltImage> {
  const key = `${format.name}/${shape.name}`;
  let promise = builds.get(key);
  if (!promise) {
    promise = formatDir(format).then((dir) => shape.build(dir)).catch((error: unknown) => {
      throw new Error(`building ${key} (${shape.description}) with qemu failed: ${(error as Error).message}`);
    });
    builds.set(key, promise);
  }
  return promise;
}

/** Path of `qemu-img convert -O raw` of a built image (of one of its snapshots), made once per test file. */
export function oracleRaw(image: BuiltImage, snapshot?: SnapshotSelector): Promise<string> {
  const tag = snapshot === undefined ? '' : 'name' in snapshot ? `.snapshot-name-${snapshot.name}` : `.snapshot-id-${snapshot.id}`;
  const out = `${image.path}${tag}.oracle`;
  let promise = oracles.get(out);
  if (!promise) {
    promise = qemuConvertToRawFile(image.path, image.format, out, { snapshot, cwd: image.qemuCwd }).then(() => out);
    oracles.set(out, promise);
  }
  return promise;
}

// ---------------------------------------------------------------------------
// describeEachFormat
// ---------------------------------------------------------------------------

export interface EachFormatOptions {
  /**
   * What a format must be able to do for the body to run on it:
   * 'write' (this library writes it), 'read-only' (it does not),
   * 'backing' (it has chains across formats).
   */
  needs?: 'write' | 'read-only' | 'backing';
  /** Skips the whole suite (printing why is the caller's job); default: when qemu-img/qemu-io are missing. */
  skip?: boolean;
}

function can(format: FormatEntry, needs: EachFormatOptions['needs']): boolean {
  switch (needs) {
    case undefined:
      return true;
    case 'write':
      return format.writable;
    case 'read-only':
      return !format.writable || [...format.shapes, ...format.chains].some((shape) => shape.readOnly);
    case 'backing':
      return format.chains.length > 0;
  }
}

/** The shapes a read-write open writes: every shape of a writable format but those marked read-only. */
export function writableShapes(format: FormatEntry, shapes: readonly Shape[]): Shape[] {
  return format.writable ? shapes.filter((shape) => !shape.readOnly) : [];
}

/** The shapes a read-write open leaves read-only: all of a read-only format, the marked ones of a writable one. */
export function readOnlyShapes(format: FormatEntry, shapes: readonly Shape[]): Shape[] {
  return format.writable ? shapes.filter((shape) => shape.readOnly) : [...shapes];
}

/** Runs `body` in a describe per format entry that can do what it needs. */
export function describeEachFormat(title: string, body: (format: FormatEntry) => void, options: EachFormatOptions = {}): void {
  const skip = options.skip ?? skipWithoutQemu(title);
  describe.skipIf(skip)(title, () => {
    for (const format of FORMATS) {
      if (can(format, options.needs)) describe(format.name, () => body(format));
    }
  });
}

// ---------------------------------------------------------------------------
// Map comparison
// ---------------------------------------------------------------------------

/**
 * Turns both sides' map runs into comparable shapes (normalizeMap), with
 * these documented adjustments:
 *
 * - qemu-img asks the host file system about holes (SEEK_HOLE) under the data
 *   a format maps: an allocated qcow2 cluster never written (preallocation, the
 *   unwritten tail of a cluster at the end of the file) is "data": true,
 *   "zero": true. This library asks only for raw images (whose holes both sides
 *   map as "data": false, "zero": true with an offset), so under qcow2 and QED
 *   such clusters are data, not zero, here.
 * - qemu-img map of a format in QEMU_MAP_SEES_ALL_DATA (vhdx, dmg: qemu 7.2's driver
 *   has no block-status) calls the whole image data, no offsets: ours is
 *   compared in that form (the format's own tests check its real map).
 * - Host offsets are compared only for the top image's own data (depth 0):
 *   qemu's JSON does not say which file an offset is in; below the top the
 *   offset is in a backing file. For an external data file both sides give
 *   offsets into the data file.
 */
/** Formats whose qemu-img map says only "data" everywhere (no block-status in qemu 7.2's driver). */
const QEMU_MAP_SEES_ALL_DATA: readonly FormatName[] = ['vhdx', 'dmg'];

export function mapForComparison(runs: ReadonlyArray<QemuMapRun | MapRun>, layers: readonly FormatName[]): MapShape[] {
  const adjusted = runs.map((run) => {
    const copy = { ...run };
    const isQemu = 'start' in copy;
    // qemu 7.2's driver of these formats has no block-status: its map calls every byte data, without an offset.
    if (!isQemu && QEMU_MAP_SEES_ALL_DATA.includes(layers[0]!)) return { ...copy, data: true, zero: false, present: true, depth: 0, hostOffset: undefined };
    if (isQemu && copy.data && copy.zero) copy.zero = false;
    if (copy.depth !== 0) {
      if (isQemu) delete (copy as QemuMapRun).offset;
      else delete (copy as MapRun).hostOffset;
    }
    return copy;
  });
  return normalizeMap(adjusted, true);
}
