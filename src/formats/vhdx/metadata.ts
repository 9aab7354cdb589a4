/**
 * The metadata region (MS-VHDX 2.6): its table (at most 2047 entries in the
 * first 64 KiB) and the items this program reads: file parameters (block
 * size, fixed or differencing), virtual disk size, logical and physical
 * sector size, page 83 data and, for a differencing image, the parent
 * locator (UTF-16 key/value pairs naming the parent). Every item is bounded
 * by the region before it is read, and every field is range-checked. Reads go
 * through the given Protocol (the log replayed in memory when there is one).
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { guid, guidText, KiB, MiB, type RegionEntry } from './header.js';

const TABLE_SIGNATURE = Buffer.from('metadata', 'latin1');
const TABLE_BYTES = 64 * KiB;
const MAX_ENTRIES = 2047;
/** Bound of the parent locator item read into memory. */
const MAX_PARENT_LOCATOR_BYTES = 64 * KiB;
/** The largest virtual disk the specification allows: 64 TiB. */
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB;
export const MIN_BLOCK_SIZE = MiB;
export const MAX_BLOCK_SIZE = 256 * MiB;

export const FILE_PARAMETERS = guid('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const VIRTUAL_DISK_SIZE = guid('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const PAGE_83_DATA = guid('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const LOGICAL_SECTOR_SIZE = guid('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const PHYSICAL_SECTOR_SIZE = guid('CDA348C7-445D-4471-9CC9-E9885251C556');
export const PARENT_LOCATOR = guid('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
/** The locator type of a VHDX parent. */
export const VHDX_PARENT_TYPE = guid('B04AEFB7-D19E-4A81-B789-25B8E9445913');

const KNOWN: ReadonlyArray<[Buffer, string, number]> = [
  [FILE_PARAMETERS, 'file parameters', 8],
  [VIRTUAL_DISK_SIZE, 'virtual disk size', 8],
  [PAGE_83_DATA, 'page 83 data', 16],
  [LOGICAL_SECTOR_SIZE, 'logical sector size', 4],
  [PHYSICAL_SECTOR_SIZE, 'physical sector size', 4],
  [PARENT_LOCATOR, 'parent locator', 0],
];

export interface VhdxMetadata {
  blockSize: number;
  leaveBlocksAllocated: boolean;
  hasParent: boolean;
  virtualSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  page83: string;
  /** Key/value pairs of the parent locator (differencing images). */
  parent?: Map<string, string>;
}

interface Item {
  offset: number;
  length: number;
}

async function readItem(file: Protocol, region: RegionEntry, item: Item): Promise<Buffer> {
  const bytes = Buffer.alloc(item.length);
  await file.read(region.fileOffset + item.offset, bytes);
  return bytes;
}

/** Reads and checks the metadata table and the items this program needs. */
export async function readMetadata(file: Protocol, region: RegionEntry, path: string): Promise<VhdxMetadata> {
  const table = Buffer.alloc(TABLE_BYTES);
  await file.read(region.fileOffset, table);
  if (!table.subarray(0, 8).equals(TABLE_SIGNATURE)) {
    throw new CorruptImageError(`${path}: metadata table signature is "${table.subarray(0, 8).toString('latin1')}", not "metadata"`);
  }
  const count = table.readUInt16LE(10);
  if (count > MAX_ENTRIES) throw new CorruptImageError(`${path}: metadata table entry count is ${count}, at most ${MAX_ENTRIES} fit`);
  const items = new Map<string, Item>();
  for (let i = 0; i < count; i++) {
    const at = 32 + 32 * i;
    const id = table.subarray(at, at + 16);
    const offset = table.readUInt32LE(at + 16);
    const length = table.readUInt32LE(at + 20);
    const flags = table.readUInt32LE(at + 24);
    const known = KNOWN.find(([g]) => g.equals(id));
    const name = known ? known[1] : `metadata item ${guidText(id)}`;
    if (length > 0 && (offset < TABLE_BYTES || offset + length > region.length)) {
      throw new CorruptImageError(`${path}: ${name} (${length} bytes at ${offset}) is outside the metadata region (64 KiB .. ${region.length})`);
    }
    if (!known) {
      if (flags & 4) throw new UnsupportedFeatureError(`${path}: required ${name} is not known, so the image cannot be read`);
      continue;
    }
    if (items.has(name)) throw new CorruptImageError(`${path}: the metadata table lists ${name} twice`);
    if (known[2] !== 0 && length < known[2]) throw new CorruptImageError(`${path}: ${name} is ${length} bytes long, it needs ${known[2]}`);
    items.set(name, { offset, length });
  }
  const need = (name: string): Item => {
    const item = items.get(name);
    if (!item) throw new CorruptImageError(`${path}: the metadata table has no ${name}`);
    return item;
  };
  const params = await readItem(file, region, { ...need('file parameters'), length: 8 });
  const blockSize = params.readUInt32LE(0);
  const bits = params.readUInt32LE(4);
  const sizeBytes = await readItem(file, region, { ...need('virtual disk size'), length: 8 });
  const logical = (await readItem(file, region, { ...need('logical sector size'), length: 4 })).readUInt32LE(0);
  const physical = (await readItem(file, region, { ...need('physical sector size'), length: 4 })).readUInt32LE(0);
  const page83 = await readItem(file, region, { ...need('page 83 data'), length: 16 });
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new CorruptImageError(`${path}: block size is ${blockSize}, it must be a power of 2 from 1 MiB to 256 MiB`);
  }
  if (logical !== 512 && logical !== 4096) throw new CorruptImageError(`${path}: logical sector size is ${logical}, it must be 512 or 4096`);
  if (physical !== 512 && physical !== 4096) throw new CorruptImageError(`${path}: physical sector size is ${physical}, it must be 512 or 4096`);
  const size = sizeBytes.readBigUInt64LE(0);
  if (size === 0n || size > BigInt(MAX_VIRTUAL_SIZE)) {
    throw new CorruptImageError(`${path}: virtual disk size is ${size}, it must be from 1 byte to 64 TiB`);
  }
  const virtualSize = Number(size);
  if (virtualSize % logical !== 0) {
    throw new CorruptImageError(`${path}: virtual disk size ${virtualSize} is not a multiple of the logical sector size ${logical}`);
  }
  const metadata: VhdxMetadata = {
    blockSize,
    leaveBlocksAllocated: (bits & 1) !== 0,
    hasParent: (bits & 2) !== 0,
    virtualSize,
    logicalSectorSize: logical,
    physicalSectorSize: physical,
    page83: guidText(page83),
  };
  if (metadata.hasParent) {
    const item = items.get('parent locator');
    if (!item) throw new CorruptImageError(`${path}: a differencing image (HasParent set) without a parent locator`);
    if (item.length > MAX_PARENT_LOCATOR_BYTES) {
      throw new UnsupportedFeatureError(`${path}: the parent locator is ${item.length} bytes, more than the ${MAX_PARENT_LOCATOR_BYTES} read here`);
    }
    metadata.parent = parseParentLocator(await readItem(file, region, item), path);
  }
  return metadata;
}

/** The key/value pairs of a VHDX parent locator (MS-VHDX 2.6.2.6). */
export function parseParentLocator(bytes: Buffer, path: string): Map<string, string> {
  if (bytes.length < 20) throw new CorruptImageError(`${path}: the parent locator is ${bytes.length} bytes, shorter than its 20-byte header`);
  if (!bytes.subarray(0, 16).equals(VHDX_PARENT_TYPE)) {
    throw new UnsupportedFeatureError(`${path}: parent locator type ${guidText(bytes)} is not the VHDX one; only VHDX parents are known`);
  }
  const count = bytes.readUInt16LE(18);
  if (20 + 12 * count > bytes.length) {
    throw new CorruptImageError(`${path}: the parent locator's ${count} entries do not fit in its ${bytes.length} bytes`);
  }
  const pairs = new Map<string, string>();
  const text = (offset: number, length: number, what: string): string => {
    if (offset + length > bytes.length || length % 2 !== 0) {
      throw new CorruptImageError(`${path}: parent locator ${what} (${length} bytes at ${offset}) is outside the locator (${bytes.length} bytes) or not UTF-16`);
    }
    return bytes.subarray(offset, offset + length).toString('utf16le');
  };
  for (let i = 0; i < count; i++) {
    const at = 20 + 12 * i;
    const key = text(bytes.readUInt32LE(at), bytes.readUInt16LE(at + 8), `key ${i}`);
    const value = text(bytes.readUInt32LE(at + 4), bytes.readUInt16LE(at + 10), `value of ${key}`);
    if (pairs.has(key)) throw new CorruptImageError(`${path}: parent locator key ${key} appears twice`);
    pairs.set(key, value);
  }
  if (!pairs.has('parent_linkage')) throw new CorruptImageError(`${path}: the parent locator has no parent_linkage`);
  return pairs;
}
