/**
 * The VMDK entry of the conformance matrix (formats.ts): shapes qemu-img and
 * qemu-io make; the monolithicSparse and descriptor-file ones are written by the random write tests (the
 * stream-optimized one opens read-only, with a notice). monolithicSparse with and without zeroed
 * grains (sizes that are not a multiple of the 64 KiB grain), streamOptimized
 * (compressed grains with markers), monolithicFlat (a descriptor file and one
 * flat extent), twoGbMaxExtentSparse / Flat under 2 GiB (one extent each), and a
 * differencing image over a sparse parent. Several extents (2 GiB each) are in
 * test/vmdk.test.ts and test/vmdk-subformats-write.test.ts: the matrix knows one data
 * file per image. VMDK3 ("COWD", vmfsSparse) and seSparse extents, which
 * qemu-img cannot create, are made by vmdk-old-writer.ts from a byte model;
 * the suite's oracle is still qemu (convert, map, info of those files), and
 * building one fails unless qemu-img convert and map of it show the model.
 *
 * This module is imported by formats.ts and imports functions from it: it
 * uses them only inside build(), never while the modules load.
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { seededRandom } from './random.js';
import { mixedContent, type BuiltImage, type FormatEntry, type Shape } from './formats.js';
import { qemuImg, qemuInfo, qemuIo, qemuConvertToRaw, qemuMap } from './qemu.js';
import { buildCowd, buildSeSparse, descriptorFile, makeModel, mapDisagreements, type GrainKind, type OldVmdkModel } from './vmdk-old-writer.js';

const K = 1024;
const M = 1024 * K;
/** qemu-img makes 128-sector grains. */
const GRAIN = 64 * K;

/** Unaligned pattern writes across grains, the first sector, the middle, the tail. */
function writes(size: number, salt: number): string[] {
  const p = (k: number) => `0x${((salt + k * 0x13) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} ${GRAIN - 100} 300`,
    `write -P ${p(2)} ${3 * GRAIN + 17} ${2 * GRAIN + 5}`,
    `write -P ${p(3)} 1 1`,
    `write -P ${p(4)} ${Math.floor(size / 2) + 333} 4097`,
    `write -P ${p(5)} ${size - 700} 700`,
    `write -P ${p(6)} ${GRAIN - 40} 10`,
  ];
}

function info(createType: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { 'format-specific': { type: 'vmdk', data: { 'create-type': createType } }, ...extra };
}

/** Copies mixed content into the existing image with qemu-img convert -n. */
async function fill(path: string, size: number, seed: number, dir: string, name: string): Promise<void> {
  const source = join(dir, `${name}.source.tmp`);
  await writeFile(source, mixedContent(size, seed));
  try {
    await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'vmdk', source, path]);
  } finally {
    await rm(source, { force: true });
  }
}

function built(path: string, description: string, says: BuiltImage['qemuSays'], more: Partial<BuiltImage> = {}): BuiltImage {
  return { path, format: 'vmdk', description, layers: ['vmdk'], clusterSize: GRAIN, qemuSays: says, ...more };
}

const shapes: Shape[] = [
  {
    name: 'sparse',
    description: 'monolithicSparse (qemu-img create -f vmdk), 6 MiB + 1536 (not a whole number of grains), mixed content, pattern writes, write -z (no zeroed grains: zeros written)',
    async build(dir) {
      const path = join(dir, 'sparse.vmdk');
      const size = 6 * M + 1536;
      await qemuImg(['create', '-q', '-f', 'vmdk', path, String(size)]);
      await fill(path, size, 701, dir, 'sparse');
      await qemuIo(path, [...writes(size, 0x21), `write -z ${8 * GRAIN} ${GRAIN}`, `write -z ${2 * GRAIN + 10} 100`], 'vmdk');
      return built(path, this.description, { mapNot: ['zero'], info: info('monolithicSparse', { 'cluster-size': GRAIN }) });
    },
  },
  {
    name: 'sparse-holes',
    description: 'monolithicSparse written only by qemu-io patterns (unallocated grains and whole unallocated grain tables between), 40 MiB + 512',
    async build(dir) {
      const path = join(dir, 'sparse-holes.vmdk');
      const size = 40 * M + 512;
      await qemuImg(['create', '-q', '-f', 'vmdk', path, String(size)]);
      // one grain table covers 512 grains (32 MiB): writes on both sides of that boundary
      await qemuIo(path, [...writes(size, 0x31), `write -P 0x3e ${32 * M - 3000} 9000`], 'vmdk');
      return built(path, this.description, { map: ['unallocated'], mapNot: ['zero'], info: info('monolithicSparse') });
    },
  },
  {
    name: 'zeroed-grain',
    description: 'monolithicSparse with -o zeroed_grain=on, 5 MiB + 3584: write -z of whole grains makes zeroed grains (entry 1) over data and over unallocated space, data written into one afterwards',
    async build(dir) {
      const path = join(dir, 'zeroed-grain.vmdk');
      const size = 5 * M + 3584;
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', path, String(size)]);
      await qemuIo(path, [
        ...writes(size, 0x41),
        `write -P 0x4a 0 ${12 * GRAIN}`,
        `write -z ${2 * GRAIN} ${3 * GRAIN}`,
        `write -z ${30 * GRAIN} ${GRAIN}`,
        `write -z ${7 * GRAIN + 17} 100`,
        `write -P 0x4b ${3 * GRAIN + 5} 10`,
      ], 'vmdk');
      return built(path, this.description, { map: ['zero', 'unallocated'], info: info('monolithicSparse') });
    },
  },
  {
    name: 'stream',
    readOnly: /stream-optimized/,
    description: 'streamOptimized (qemu-img convert -O vmdk -o subformat=streamOptimized) of text + random + zeros, 4 MiB + 2560: compressed grains with markers, a short last grain',
    async build(dir) {
      const path = join(dir, 'stream.vmdk');
      const size = 4 * M + 2560;
      const source = join(dir, 'stream.source.tmp');
      const content = mixedContent(size, 702);
      content.fill(0, 5 * GRAIN, 8 * GRAIN); // whole zero grains are not stored
      await writeFile(source, content);
      try {
        await qemuImg(['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', source, path]);
      } finally {
        await rm(source, { force: true });
      }
      return built(path, this.description, { map: ['compressed', 'unallocated'], info: info('streamOptimized', { 'cluster-size': GRAIN }) });
    },
  },
  {
    name: 'flat',
    description: 'monolithicFlat: a descriptor file and one flat extent (flat-flat.vmdk) under a relative name, 3 MiB, pattern writes and write -z',
    async build(dir) {
      const path = join(dir, 'flat.vmdk');
      const size = 3 * M;
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', path, String(size)]);
      await qemuIo(path, [...writes(size, 0x51), `write -z ${GRAIN} 5000`], 'vmdk');
      return built(path, this.description, { map: ['data-over-host-hole'], info: info('monolithicFlat') }, { dataFile: join(dir, 'flat-flat.vmdk') });
    },
  },
  {
    name: 'split-sparse',
    description: 'twoGbMaxExtentSparse under 2 GiB (a descriptor file and one sparse extent, split-sparse-s001.vmdk), 5 MiB + 512, mixed content, pattern writes, write -z',
    async build(dir) {
      const path = join(dir, 'split-sparse.vmdk');
      const size = 5 * M + 512;
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path, String(size)]);
      await fill(path, size, 703, dir, 'split-sparse');
      await qemuIo(path, [...writes(size, 0x61), `write -z ${4 * GRAIN} ${GRAIN}`], 'vmdk');
      return built(path, this.description, { mapNot: ['zero'], info: info('twoGbMaxExtentSparse', { 'cluster-size': GRAIN }) }, { dataFile: join(dir, 'split-sparse-s001.vmdk') });
    },
  },
  {
    name: 'split-flat',
    description: 'twoGbMaxExtentFlat under 2 GiB (a descriptor file and one flat extent, split-flat-f001.vmdk), 2 MiB + 1024, pattern writes',
    async build(dir) {
      const path = join(dir, 'split-flat.vmdk');
      const size = 2 * M + 1024;
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat', path, String(size)]);
      await qemuIo(path, writes(size, 0x71), 'vmdk');
      return built(path, this.description, { map: ['data-over-host-hole'], info: info('twoGbMaxExtentFlat') }, { dataFile: join(dir, 'split-flat-f001.vmdk') });
    },
  },
  {
    name: 'backing',
    description: 'a differencing monolithicSparse (qemu-img create -b base -F vmdk: parentFileNameHint) over a sparse parent: partial grains over parent data, writes across the tail',
    async build(dir) {
      const base = join(dir, 'backing-base.vmdk');
      const path = join(dir, 'backing.vmdk');
      const size = 4 * M + 512;
      await qemuImg(['create', '-q', '-f', 'vmdk', base, String(size)]);
      await fill(base, size, 703, dir, 'backing-base');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'backing-base.vmdk', '-F', 'vmdk', path], { cwd: dir });
      await qemuIo(path, [`write -P 0xa1 ${GRAIN + 7} 33`, `write -P 0xa2 ${size - 513} 513`, `write -P 0xa4 ${6 * GRAIN - 10} ${GRAIN + 20}`], 'vmdk');
      return built(
        path,
        this.description,
        { map: ['backing-data'], info: info('monolithicSparse', { 'backing-filename': 'backing-base.vmdk', 'backing-filename-format': 'vmdk' }) },
        { layers: ['vmdk', 'vmdk'] },
      );
    },
  },
];

/** Writes the descriptor and extent of `model`, and checks that qemu reads it as the model says (over `parent` where one is given). */
async function writeOld(dir: string, name: string, kind: 'cowd' | 'sesparse', model: OldVmdkModel, parent?: { file: string; bytes: Buffer }): Promise<string> {
  const path = join(dir, `${name}.vmdk`);
  const extentFile = `${name}-${kind === 'cowd' ? 'delta' : 'sesparse'}.vmdk`;
  const layout = kind === 'cowd' ? buildCowd(model) : buildSeSparse(model);
  await writeFile(join(dir, extentFile), layout.file);
  const parentCid = parent ? ((await qemuInfo(join(dir, parent.file), 'vmdk'))['format-specific'] as { data: { cid: number } }).data.cid : undefined;
  await writeFile(path, descriptorFile({
    createType: kind === 'cowd' ? 'vmfsSparse' : 'seSparse',
    extentType: kind === 'cowd' ? 'VMFSSPARSE' : 'SESPARSE',
    extentFile,
    sectors: model.size / 512,
    parentCid,
    parentFileNameHint: parent?.file,
  }));
  // the model, as qemu must read it: this layer's grains, the parent's (or zeros) where unallocated, zeros for zero grains
  const expected = Buffer.alloc(model.size);
  model.kinds.forEach((grainKind, i) => {
    const start = i * model.grain;
    const end = Math.min(model.size, start + model.grain);
    if (grainKind === 'data') model.content.copy(expected, start, start, end);
    else if (grainKind === 'unallocated' && parent) parent.bytes.copy(expected, start, start, end);
  });
  if (!(await qemuConvertToRaw(path, dir, 'vmdk')).equals(expected)) throw new Error(`${path}: qemu-img convert does not read what vmdk-old-writer meant`);
  const problems = mapDisagreements(model, layout.hostOffsets, await qemuMap(path, 'vmdk'));
  if (problems.length > 0) throw new Error(`${path}: qemu-img map does not show what vmdk-old-writer meant: ${problems.join('; ')}`);
  return path;
}

/** Grain kinds: seeded at random from `kinds`, but the guest range [holeStart, holeEnd) unallocated (a whole grain table left out). */
function kindsWithHole(grain: number, holeStart: number, holeEnd: number, seed: number, kinds: GrainKind[]): (index: number) => GrainKind {
  const random = seededRandom(seed);
  return (index) => (index * grain >= holeStart && index * grain < holeEnd ? 'unallocated' : kinds[random.int(0, kinds.length - 1)]!);
}

/** A monolithicSparse parent made by qemu-img, filled with mixed content; its bytes. */
async function sparseParent(dir: string, name: string, size: number, seed: number): Promise<Buffer> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'vmdk', path, String(size)]);
  await fill(path, size, seed, dir, name);
  return mixedContent(size, seed);
}

const oldShapes: Shape[] = [
  {
    name: 'cowd',
    readOnly: /writing VMDK3 \("COWD", vmfsSparse\) extents is not supported/,
    description: 'vmfsSparse: a descriptor file and a VMDK3 ("COWD") extent (vmdk-old-writer), 1 KiB grains (a grain table covers 4 MiB), 9 MiB + 1536, data grains in reverse host order, one grain table unallocated',
    async build(dir) {
      const size = 9 * M + 1536;
      const model = makeModel(size, 1024, 0xc0d, kindsWithHole(1024, 4 * M, 8 * M, 0xc0e, ['data', 'unallocated', 'data']));
      const path = await writeOld(dir, 'cowd', 'cowd', model);
      return built(path, this.description, { map: ['unallocated'], mapNot: ['zero'], info: info('vmfsSparse', { 'cluster-size': 1024 }) }, { clusterSize: 1024, dataFile: join(dir, 'cowd-delta.vmdk') });
    },
  },
  {
    name: 'cowd-backing',
    readOnly: /writing VMDK3 \("COWD", vmfsSparse\) extents is not supported/,
    description: 'a vmfsSparse redo log (COWD extent, 64 KiB grains, parentFileNameHint and parentCID) over a monolithicSparse parent qemu-img made, 3 MiB + 2560',
    async build(dir) {
      const size = 3 * M + 2560;
      const parent = await sparseParent(dir, 'cowd-base.vmdk', size, 0xc0f);
      const model = makeModel(size, GRAIN, 0xc10);
      const path = await writeOld(dir, 'cowd-backing', 'cowd', model, { file: 'cowd-base.vmdk', bytes: parent });
      return built(
        path,
        this.description,
        { map: ['backing-data'], mapNot: ['zero'], info: info('vmfsSparse', { 'backing-filename': 'cowd-base.vmdk', 'backing-filename-format': 'vmdk' }) },
        { layers: ['vmdk', 'vmdk'], dataFile: join(dir, 'cowd-backing-delta.vmdk') },
      );
    },
  },
  {
    name: 'sesparse',
    readOnly: /writing VMDK seSparse extents is not supported/,
    description: 'seSparse: a descriptor file and an seSparse extent (vmdk-old-writer), 40 MiB + 512: three grain tables (the middle one unallocated), allocated grains past index 4096 (the split index), zero and unmapped grains',
    async build(dir) {
      const size = 40 * M + 512;
      const model = makeModel(size, 4096, 0x5e5, kindsWithHole(4096, 16 * M, 32 * M, 0x5e6, ['data', 'data', 'data', 'unallocated', 'zero', 'unmapped']));
      const path = await writeOld(dir, 'sesparse', 'sesparse', model);
      return built(path, this.description, { map: ['unallocated', 'zero'], info: info('seSparse', { 'cluster-size': 4096 }) }, { clusterSize: 4096, dataFile: join(dir, 'sesparse-sesparse.vmdk') });
    },
  },
  {
    name: 'sesparse-backing',
    readOnly: /writing VMDK seSparse extents is not supported/,
    description: 'an ESXi snapshot: an seSparse delta (parentFileNameHint, parentCID) over a monolithicSparse parent qemu-img made, 5 MiB + 1024: zero and unmapped grains hide the parent',
    async build(dir) {
      const size = 5 * M + 1024;
      const parent = await sparseParent(dir, 'sesparse-base.vmdk', size, 0x5e7);
      const model = makeModel(size, 4096, 0x5e8, undefined, ['data', 'unallocated', 'unallocated', 'zero', 'unmapped']);
      const path = await writeOld(dir, 'sesparse-backing', 'sesparse', model, { file: 'sesparse-base.vmdk', bytes: parent });
      return built(
        path,
        this.description,
        { map: ['backing-data', 'zero'], info: info('seSparse', { 'backing-filename': 'sesparse-base.vmdk', 'backing-filename-format': 'vmdk' }) },
        { layers: ['vmdk', 'vmdk'], clusterSize: 4096, dataFile: join(dir, 'sesparse-backing-sesparse.vmdk') },
      );
    },
  },
];
shapes.push(...oldShapes);

export const vmdkEntry: FormatEntry = { name: 'vmdk', extension: '.vmdk', writable: true, checkable: true, snapshots: false, shapes, chains: [] };
