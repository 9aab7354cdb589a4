/**
 * A test writer for the two VMDK extent forms qemu reads but cannot create:
 * VMDK3 ("COWD", ESX 2 vmfsSparse extents) and seSparse (ESXi 6.5+). Each
 * image is a descriptor file naming one extent file, built from a byte model:
 * a list of grains, each unallocated (reads from the parent, or zeros), zero
 * (seSparse only: a zero grain, or a SCSI-unmapped one, both read as zeros and
 * hide the parent) or data (seeded random bytes). The oracle is qemu: tests
 * compare `qemu-img convert -O raw` and `qemu-img map` of these files with the
 * model, so the writer is checked by qemu, not by our reader.
 *
 * Layouts (little-endian):
 *
 *   COWD    sector 0..3  header: "COWD", version 1, flags 3, numSectors,
 *                        granularity (sectors per grain), gdOffset (sectors),
 *                        numGDEntries, freeSector, then zeros (2048 bytes)
 *           gdOffset     numGDEntries u32 sector numbers of grain tables
 *           then         grain tables of 4096 u32 grain sector numbers (0 = none)
 *           then         grains
 *   seSparse sector 0    const header (magic 0xcafebabe, version 0x200000001,
 *                        capacity, grain size 8, grain table size 64, the
 *                        offsets and sizes of each region, in sectors)
 *           sector 1     volatile header (magic 0xcafecafe, replay_journal 0)
 *           gd           u64 entries: 0, or 0x1000000000000000 | table index
 *           tables       64 sectors each (4096 u64 entries): 0 unallocated,
 *                        0x1... unmapped, 0x2... zero, 0x3... allocated with
 *                        the grain index split as qemu decodes it: bits 48..59
 *                        hold index & 0xfff, bits 0..47 hold index >> 12
 *           grains       4 KiB each, grain i at grains_offset + 8 i sectors
 *
 * Pure functions; the caller writes the files.
 */
import type { QemuMapRun } from './qemu.js';
import { seededRandom } from './random.js';

export const SECTOR = 512;
export const COWD_GT_ENTRIES = 4096;
export const SESPARSE_GRAIN = 4096;
export const SESPARSE_GT_ENTRIES = 4096;

export type GrainKind = 'unallocated' | 'data' | 'zero' | 'unmapped';

export interface OldVmdkModel {
  /** Guest bytes (a whole number of sectors). */
  size: number;
  /** Bytes per grain. */
  grain: number;
  /** One kind per grain (the last may be partial). */
  kinds: GrainKind[];
  /** The guest content this layer shows where it is allocated (zeros elsewhere). */
  content: Buffer;
}

/** A model of `size` bytes: grain kinds picked by `kindAt` (or seeded at random), data grains of seeded random bytes. */
export function makeModel(size: number, grain: number, seed: number, kindAt?: (index: number) => GrainKind, kinds: GrainKind[] = ['unallocated', 'data']): OldVmdkModel {
  const random = seededRandom(seed);
  const count = Math.ceil(size / grain);
  const list: GrainKind[] = [];
  const content = Buffer.alloc(size);
  for (let i = 0; i < count; i++) {
    const kind = kindAt ? kindAt(i) : kinds[random.int(0, kinds.length - 1)]!;
    list.push(kind);
    if (kind === 'data') random.fill(content.subarray(i * grain, Math.min(size, (i + 1) * grain)));
  }
  return { size, grain, kinds: list, content };
}

export interface DescriptorOptions {
  createType: 'vmfsSparse' | 'seSparse';
  extentType: 'VMFSSPARSE' | 'SESPARSE';
  extentFile: string;
  sectors: number;
  cid?: number;
  parentCid?: number;
  parentFileNameHint?: string;
}

/**
 * Where `qemu-img map` of the image disagrees with the model (depth-0 runs only): data runs must
 * be data grains at the offsets the writer chose, zero runs zero or unmapped grains, runs not
 * present unallocated grains. An empty list when they agree.
 */
export function mapDisagreements(model: OldVmdkModel, hostOffsets: readonly number[], runs: readonly QemuMapRun[]): string[] {
  const problems: string[] = [];
  for (const run of runs) {
    for (let at = run.start; at < run.start + run.length; at = (Math.floor(at / model.grain) + 1) * model.grain) {
      const index = Math.floor(at / model.grain);
      const kind = model.kinds[index];
      const says = run.depth === 0 && run.data ? 'data' : run.depth === 0 && run.present && run.zero ? 'zero' : 'unallocated';
      const meant = kind === 'unmapped' ? 'zero' : kind;
      if (says !== meant) problems.push(`grain ${index}: qemu-img map says ${says}, the model ${kind}`);
      else if (says === 'data' && run.offset! + (at - run.start) !== hostOffsets[index]! + (at - index * model.grain)) {
        problems.push(`grain ${index}: qemu-img map gives offset ${run.offset! + (at - run.start)}, the writer put it at ${hostOffsets[index]}`);
      }
      if (problems.length > 10) return problems;
    }
  }
  return problems;
}

/** The text descriptor file naming the one extent. */
export function descriptorFile(options: DescriptorOptions): Buffer {
  const hex = (value: number) => value.toString(16).padStart(8, '0');
  const lines = [
    '# Disk DescriptorFile',
    'version=1',
    `CID=${hex(options.cid ?? 0x1234abcd)}`,
    `parentCID=${hex(options.parentCid ?? 0xffffffff)}`,
    `createType="${options.createType}"`,
    ...(options.parentFileNameHint === undefined ? [] : [`parentFileNameHint="${options.parentFileNameHint}"`]),
    '',
    '# Extent description',
    `RW ${options.sectors} ${options.extentType} "${options.extentFile}"`,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    'ddb.virtualHWVersion = "4"',
    'ddb.adapterType = "lsilogic"',
    '',
  ];
  return Buffer.from(lines.join('\n'), 'latin1');
}

export interface CowdLayout {
  file: Buffer;
  /** Header fields, for damage tests. */
  gdOffset: number;
  gdEntries: number;
  /** Byte offset of the first grain table. */
  firstTable: number;
  /** Where each grain's bytes are in the file (-1: not stored). */
  hostOffsets: number[];
}

/** A COWD extent file holding `model` (zero kinds are not expressible: they are written as unallocated). */
export function buildCowd(model: OldVmdkModel): CowdLayout {
  const granularity = model.grain / SECTOR;
  if (!Number.isInteger(granularity) || model.size % SECTOR !== 0) throw new Error('COWD model: grain and size must be whole sectors');
  const numSectors = model.size / SECTOR;
  const gtCoverage = COWD_GT_ENTRIES * granularity;
  const gdEntries = Math.ceil(numSectors / gtCoverage);
  const gdOffset = 4;
  const gdSectors = Math.ceil((gdEntries * 4) / SECTOR);
  const gtSectors = (COWD_GT_ENTRIES * 4) / SECTOR;
  // a table only where some grain of it holds data
  const tableOf: number[] = [];
  let next = gdOffset + gdSectors;
  for (let t = 0; t < gdEntries; t++) {
    const grains = model.kinds.slice(t * COWD_GT_ENTRIES, (t + 1) * COWD_GT_ENTRIES);
    if (grains.some((kind) => kind === 'data')) {
      tableOf[t] = next;
      next += gtSectors;
    } else {
      tableOf[t] = 0;
    }
  }
  const dataGrains = model.kinds.filter((kind) => kind === 'data').length;
  const file = Buffer.alloc((next + dataGrains * granularity) * SECTOR);
  file.write('COWD', 0, 'latin1');
  file.writeUInt32LE(1, 4); // version
  file.writeUInt32LE(3, 8); // flags
  file.writeUInt32LE(numSectors, 12);
  file.writeUInt32LE(granularity, 16);
  file.writeUInt32LE(gdOffset, 20);
  file.writeUInt32LE(gdEntries, 24);
  file.writeUInt32LE(next + dataGrains * granularity, 28); // freeSector
  for (let t = 0; t < gdEntries; t++) file.writeUInt32LE(tableOf[t]!, gdOffset * SECTOR + t * 4);
  // grains are stored in reverse guest order, so host offsets do not follow guest ones
  let grainSector = next + (dataGrains - 1) * granularity;
  const hostOffsets = model.kinds.map(() => -1);
  model.kinds.forEach((kind, i) => {
    if (kind !== 'data') return;
    hostOffsets[i] = grainSector * SECTOR;
    const table = tableOf[Math.floor(i / COWD_GT_ENTRIES)]!;
    file.writeUInt32LE(grainSector, table * SECTOR + (i % COWD_GT_ENTRIES) * 4);
    model.content.copy(file, grainSector * SECTOR, i * model.grain, Math.min(model.size, (i + 1) * model.grain));
    grainSector -= granularity;
  });
  return { file, gdOffset, gdEntries, firstTable: (gdOffset + gdSectors) * SECTOR, hostOffsets };
}

export interface SeSparseLayout {
  file: Buffer;
  gdOffset: number;
  gdSectors: number;
  tablesOffset: number;
  grainsOffset: number;
  /** Where each grain's bytes are in the file (-1: not stored). */
  hostOffsets: number[];
}

const SE_CONST_MAGIC = 0xcafebaben;
const SE_VOLATILE_MAGIC = 0xcafecafen;
const SE_VERSION = 0x200000001n;
const GT_ALLOCATED = 0x1000000000000000n;
const GRAIN_TYPE: Record<Exclude<GrainKind, 'unallocated' | 'data'>, bigint> = { unmapped: 0x1000000000000000n, zero: 0x2000000000000000n };

/** The allocated-grain entry for grain index `index` of the grains region, split as qemu decodes it. */
export function seSparseGrainEntry(index: number): bigint {
  const value = BigInt(index);
  return 0x3000000000000000n | ((value & 0xfffn) << 48n) | (value >> 12n);
}

/** A seSparse extent file holding `model` (4 KiB grains). */
export function buildSeSparse(model: OldVmdkModel): SeSparseLayout {
  if (model.grain !== SESPARSE_GRAIN || model.size % SECTOR !== 0) throw new Error('seSparse model: 4 KiB grains, whole sectors');
  const capacity = model.size / SECTOR;
  const gtCoverage = SESPARSE_GT_ENTRIES * (SESPARSE_GRAIN / SECTOR);
  const gdEntries = Math.ceil(capacity / gtCoverage);
  const gtSectors = (SESPARSE_GT_ENTRIES * 8) / SECTOR;
  // const header, volatile header, journal header (2 sectors), journal (8 sectors), then the tables
  const volatileOffset = 1;
  const journalHeaderOffset = 2;
  const journalOffset = 4;
  const journalSize = 8;
  const gdOffset = journalOffset + journalSize;
  const gdSectors = Math.max(1, Math.ceil((gdEntries * 8) / SECTOR));
  const tablesOffset = gdOffset + gdSectors;
  const tableIndex: (number | undefined)[] = [];
  let tables = 0;
  for (let t = 0; t < gdEntries; t++) {
    const grains = model.kinds.slice(t * SESPARSE_GT_ENTRIES, (t + 1) * SESPARSE_GT_ENTRIES);
    tableIndex[t] = grains.some((kind) => kind !== 'unallocated') ? tables++ : undefined;
  }
  const tablesSize = Math.max(1, tables) * gtSectors;
  const freeBitmapOffset = tablesOffset + tablesSize;
  const freeBitmapSize = 1;
  const backmapOffset = freeBitmapOffset + freeBitmapSize;
  const backmapSize = 1;
  const grainsOffset = backmapOffset + backmapSize;
  const dataGrains = model.kinds.filter((kind) => kind === 'data').length;
  const grainsSize = dataGrains * (SESPARSE_GRAIN / SECTOR);
  const file = Buffer.alloc((grainsOffset + grainsSize) * SECTOR);
  const fields: bigint[] = [
    SE_CONST_MAGIC, SE_VERSION, BigInt(capacity), 8n, 64n, 0n, 0n, 0n, 0n, 0n,
    BigInt(volatileOffset), 1n, BigInt(journalHeaderOffset), 2n, BigInt(journalOffset), BigInt(journalSize),
    BigInt(gdOffset), BigInt(gdSectors), BigInt(tablesOffset), BigInt(tablesSize),
    BigInt(freeBitmapOffset), BigInt(freeBitmapSize), BigInt(backmapOffset), BigInt(backmapSize),
    BigInt(grainsOffset), BigInt(grainsSize),
  ];
  fields.forEach((value, i) => file.writeBigUInt64LE(value, i * 8));
  file.writeBigUInt64LE(SE_VOLATILE_MAGIC, volatileOffset * SECTOR);
  file.writeBigUInt64LE(BigInt(tables), volatileOffset * SECTOR + 8); // free_gt_number
  file.writeBigUInt64LE(1n, volatileOffset * SECTOR + 16); // next_txn_seq_number
  for (let t = 0; t < gdEntries; t++) {
    const index = tableIndex[t];
    if (index !== undefined) file.writeBigUInt64LE(GT_ALLOCATED | BigInt(index), gdOffset * SECTOR + t * 8);
  }
  // grains in reverse guest order (host offsets do not follow guest ones); 5000+ grains exercise the split index
  let slot = dataGrains - 1;
  const hostOffsets = model.kinds.map(() => -1);
  model.kinds.forEach((kind, i) => {
    if (kind === 'unallocated') return;
    const table = tableIndex[Math.floor(i / SESPARSE_GT_ENTRIES)]!;
    const at = (tablesOffset + table * gtSectors) * SECTOR + (i % SESPARSE_GT_ENTRIES) * 8;
    if (kind !== 'data') {
      file.writeBigUInt64LE(GRAIN_TYPE[kind], at);
      return;
    }
    file.writeBigUInt64LE(seSparseGrainEntry(slot), at);
    hostOffsets[i] = (grainsOffset + slot * 8) * SECTOR;
    model.content.copy(file, (grainsOffset + slot * 8) * SECTOR, i * model.grain, Math.min(model.size, (i + 1) * model.grain));
    slot -= 1;
  });
  return { file, gdOffset, gdSectors, tablesOffset, grainsOffset, hostOffsets };
}
