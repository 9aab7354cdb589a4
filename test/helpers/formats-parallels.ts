/**
 * The conformance entry of Parallels, read-only here: images made by
 * qemu-img create -f parallels and written by qemu-io (v2 headers,
 * "WithouFreSpacExt"), and from those: a v1 header ("WithoutFreeSpace", BAT
 * entries in sectors), a format extension with a dirty bitmap (which qemu
 * 7.2 reads and checks on read-only opens but cannot write), and an image
 * left "in use". qemu reads each of them; it is the oracle.
 */
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { BuiltImage, FormatEntry, MapFeature, Shape } from './formats.js';
import { qemuImg, qemuIo } from './qemu.js';
import { KB, MB, patternWrites } from './formats-small.js';

export const PARALLELS_EXTENSION_MAGIC = 0xab234cef23dcea87n;
export const PARALLELS_DIRTY_BITMAP_MAGIC = 0x20385fae252cb34an;

/** Rewrites a v2 image as v1: the v1 magic, BAT entries in sectors instead of clusters. */
export async function toV1(path: string): Promise<void> {
  const file = await readFile(path);
  file.write('WithoutFreeSpace', 0, 'latin1');
  const tracks = file.readUInt32LE(28);
  const entries = file.readUInt32LE(32);
  for (let i = 0; i < entries; i++) file.writeUInt32LE(file.readUInt32LE(64 + 4 * i) * tracks, 64 + 4 * i);
  await writeFile(path, file);
}

/**
 * Appends a format extension cluster holding one dirty bitmap (every L1 entry 1:
 * all bits set, so no bitmap data clusters) and points ext_off at it.
 */
export async function addDirtyBitmapExtension(path: string, granularitySectors = 128): Promise<void> {
  const file = await readFile(path);
  const tracks = file.readUInt32LE(28);
  const clusterSize = tracks * 512;
  const totalSectors = Number(file.readBigUInt64LE(36));
  const bits = Math.ceil((totalSectors * 512) / (granularitySectors * 512));
  const l1Size = Math.ceil((8 * Math.ceil(bits / 64)) / clusterSize);
  const ext = Buffer.alloc(clusterSize);
  ext.writeBigUInt64LE(PARALLELS_EXTENSION_MAGIC, 0);
  let at = 24;
  ext.writeBigUInt64LE(PARALLELS_DIRTY_BITMAP_MAGIC, at);
  ext.writeUInt32LE(32 + 8 * l1Size, at + 16);
  at += 24;
  ext.writeBigUInt64LE(BigInt(totalSectors), at);
  Buffer.from('0123456789abcdef0123456789abcdef', 'hex').copy(ext, at + 8);
  ext.writeUInt32LE(granularitySectors, at + 24);
  ext.writeUInt32LE(l1Size, at + 28);
  for (let i = 0; i < l1Size; i++) ext.writeBigUInt64LE(1n, at + 32 + 8 * i);
  // the end-of-features record (all zeros) follows, 8-aligned
  createHash('md5').update(ext.subarray(24)).digest().copy(ext, 8);
  const extOff = Math.ceil(file.length / clusterSize) * clusterSize;
  const out = Buffer.alloc(extOff + clusterSize);
  file.copy(out);
  ext.copy(out, extOff);
  out.writeBigUInt64LE(BigInt(extOff / 512), 56);
  await writeFile(path, out);
}

interface ParallelsPlan {
  name: string;
  description: string;
  size: number;
  clusterSize?: number;
  map: MapFeature[];
  commands: (size: number, c: number) => string[];
  /** Changes the file after qemu-io wrote it. */
  after?: (path: string) => Promise<void>;
}

function parallelsShape(plan: ParallelsPlan): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir): Promise<BuiltImage> {
      const path = join(dir, `${plan.name}.hdd`);
      const c = plan.clusterSize ?? MB;
      await qemuImg(['create', '-q', '-f', 'parallels', '-o', `cluster_size=${c}`, path, String(plan.size)]);
      await qemuIo(path, plan.commands(plan.size, c), 'parallels');
      if (plan.after) await plan.after(path);
      return { path, format: 'parallels', description: plan.description, layers: ['parallels'], clusterSize: c, qemuSays: { map: plan.map } };
    },
  };
}

const shapes: Shape[] = [
  parallelsShape({
    name: 'default',
    map: ['unallocated'],
    description: 'qemu-img create -f parallels (1 MiB clusters, v2 header), 8 MiB, unaligned pattern writes',
    size: 8 * MB,
    commands: (size, c) => patternWrites(size, c, 0x19),
  }),
  parallelsShape({
    name: 'cluster-64k',
    map: ['unallocated'],
    description: 'cluster_size=64k, 6 MiB + 512, pattern writes across clusters and over 3 MiB',
    size: 6 * MB + 512,
    clusterSize: 64 * KB,
    commands: (size, c) => [...patternWrites(size, c, 0x29), `write -P 0x2a ${MB + 3} ${3 * MB}`],
  }),
  parallelsShape({
    name: 'v1',
    map: ['unallocated'],
    description: 'a v1 header ("WithoutFreeSpace", BAT entries in sectors) rewritten from a qemu-made 64 KiB-cluster image',
    size: 4 * MB,
    clusterSize: 64 * KB,
    commands: (size, c) => patternWrites(size, c, 0x39),
    after: toV1,
  }),
  parallelsShape({
    name: 'dirty-bitmap',
    map: ['unallocated'],
    description: 'a format extension (ext_off) with one dirty bitmap, as qemu 7.2 reads (and checks) on read-only opens',
    size: 4 * MB,
    clusterSize: 64 * KB,
    commands: (size, c) => patternWrites(size, c, 0x49),
    after: (path) => addDirtyBitmapExtension(path),
  }),
  parallelsShape({
    name: 'in-use',
    map: ['unallocated'],
    description: 'inuse set (not closed cleanly): qemu reads it read-only',
    size: 3 * MB,
    clusterSize: 64 * KB,
    commands: (size, c) => patternWrites(size, c, 0x59),
    after: async (path) => {
      const file = await readFile(path);
      file.writeUInt32LE(0x746f6e59, 44);
      await writeFile(path, file);
    },
  }),
];

export const parallelsEntry: FormatEntry = { name: 'parallels', extension: '.hdd', writable: false, checkable: true, snapshots: false, shapes, chains: [] };
