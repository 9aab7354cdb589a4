/**
 * The VMDK4 sparse extent header ("KDMV", the first sector of a
 * monolithicSparse / streamOptimized file or of a twoGbMaxExtentSparse
 * extent) and the footer a stream-optimized file may keep at its end
 * (gd_offset = GD_AT_END). Parsing and validation only: every field that
 * becomes an offset or a table size is read as a bigint, bounded, and refused
 * by name with its value and the allowed range before it is used, as qemu's
 * block/vmdk.c bounds them (granularity, num_gtes_per_gt, the grain directory
 * size) and more (every table must lie inside the file).
 *
 * Pure functions; no I/O but through the `Protocol` passed in.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';

export const SECTOR = 512;
export const VMDK4_MAGIC = Buffer.from('KDMV', 'latin1');
export const VMDK3_MAGIC = Buffer.from('COWD', 'latin1');

export const FLAG_NL_DETECT = 1 << 0;
/** A redundant grain directory (rgd_offset) is kept beside the primary one. */
export const FLAG_RGD = 1 << 1;
/** Grain table entry 1 means "this grain reads as zeros". */
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
/** Grains (and tables, in streams) are preceded by markers. */
export const FLAG_MARKER = 1 << 17;

export const COMPRESSION_NONE = 0;
export const COMPRESSION_DEFLATE = 1;

/** gd_offset meaning "the grain directory is named in the footer". */
export const GD_AT_END = 0xffffffffffffffffn;

/** qemu's bound: grains of more than 1 GiB (0x200000 sectors) are refused. */
export const MAX_GRAIN_SECTORS = 0x200000;
/** qemu's bound on a grain table's entries. */
export const MAX_GTES_PER_GT = 512;
/** qemu's bound on grain directory entries (32 Mi). */
export const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** Header fields are at these offsets of the first sector (packed, little-endian). */
const HEADER_BYTES = 79;

export const MARKER_EOS = 0;
export const MARKER_FOOTER = 3;

export interface SparseHeader {
  version: number;
  flags: number;
  /** Sectors of guest data this extent holds. */
  capacity: number;
  /** Sectors per grain. */
  granularity: number;
  /** The embedded descriptor: where (sectors) and how long (sectors). */
  descOffset: number;
  descSize: number;
  numGtesPerGt: number;
  /** Redundant grain directory (sectors), 0 without FLAG_RGD. */
  rgdOffset: number;
  /** Primary grain directory (sectors); the footer's when the header says GD_AT_END. */
  gdOffset: number;
  /** First sector of grain data. */
  grainOffset: number;
  compressAlgorithm: number;
  /** True when the values came from the footer (gd_offset was GD_AT_END in the header). */
  fromFooter: boolean;
  /** Grain directory entries needed for `capacity`. */
  gdEntries: number;
}

/** The raw fields of a header sector (magic at 0); no validation yet. */
interface RawHeader {
  version: number;
  flags: number;
  capacity: bigint;
  granularity: bigint;
  descOffset: bigint;
  descSize: bigint;
  numGtesPerGt: number;
  rgdOffset: bigint;
  gdOffset: bigint;
  grainOffset: bigint;
  compressAlgorithm: number;
}

function readRaw(sector: Buffer): RawHeader {
  return {
    version: sector.readUInt32LE(4),
    flags: sector.readUInt32LE(8),
    capacity: sector.readBigUInt64LE(12),
    granularity: sector.readBigUInt64LE(20),
    descOffset: sector.readBigUInt64LE(28),
    descSize: sector.readBigUInt64LE(36),
    numGtesPerGt: sector.readUInt32LE(44),
    rgdOffset: sector.readBigUInt64LE(48),
    gdOffset: sector.readBigUInt64LE(56),
    grainOffset: sector.readBigUInt64LE(64),
    compressAlgorithm: sector.readUInt16LE(77),
  };
}

/** A sector count as a number of sectors whose byte offset is a safe integer, or a refusal naming the field. */
function sectors(value: bigint, field: string, path: string): number {
  if (value > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) {
    throw new CorruptImageError(`${path}: VMDK ${field} ${value} is too large (at most ${Math.floor(Number.MAX_SAFE_INTEGER / SECTOR)} sectors)`);
  }
  return Number(value);
}

/** True when the first bytes are a VMDK4 sparse header's magic. */
export function isSparseHeader(head: Buffer): boolean {
  return head.length >= 4 && head.subarray(0, 4).equals(VMDK4_MAGIC);
}

/** The capacity and descriptor fields alone: a header with capacity 0 and a descriptor is a descriptor in disguise (qemu opens it so). */
export function embeddedDescriptorOnly(sector: Buffer): { descOffset: bigint } | undefined {
  const raw = readRaw(sector);
  return raw.capacity === 0n && raw.descOffset !== 0n ? { descOffset: raw.descOffset } : undefined;
}

/**
 * Reads and validates the header of a sparse extent in `file` (whose first
 * sector is `sector`), taking the footer's copy when the header says
 * GD_AT_END, as qemu does.
 */
export async function readSparseHeader(file: Protocol, sector: Buffer, fileSize: number): Promise<SparseHeader> {
  const path = file.path;
  let raw = readRaw(sector);
  let fromFooter = false;
  if (raw.gdOffset === GD_AT_END) {
    raw = await readFooter(file, fileSize);
    fromFooter = true;
  }
  if (raw.version > 3) throw new UnsupportedFeatureError(`${path}: VMDK version ${raw.version} is not supported (versions 1 to 3 are)`);
  if (raw.compressAlgorithm !== COMPRESSION_NONE && raw.compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new UnsupportedFeatureError(`${path}: VMDK compressAlgorithm ${raw.compressAlgorithm} is unknown (0 none, 1 deflate)`);
  }
  if (raw.numGtesPerGt === 0 || raw.numGtesPerGt > MAX_GTES_PER_GT) {
    throw new CorruptImageError(`${path}: VMDK num_gtes_per_gt ${raw.numGtesPerGt} is out of range (1 to ${MAX_GTES_PER_GT})`);
  }
  if (raw.granularity === 0n || raw.granularity > BigInt(MAX_GRAIN_SECTORS)) {
    throw new CorruptImageError(`${path}: VMDK granularity ${raw.granularity} sectors is out of range (1 to ${MAX_GRAIN_SECTORS})`);
  }
  const granularity = Number(raw.granularity);
  const capacity = sectors(raw.capacity, 'capacity', path);
  const gtSectors = raw.numGtesPerGt * granularity;
  const gdEntries = Math.ceil(capacity / gtSectors);
  if (gdEntries > MAX_GD_ENTRIES) {
    throw new CorruptImageError(`${path}: VMDK capacity ${capacity} sectors needs ${gdEntries} grain directory entries, more than ${MAX_GD_ENTRIES}`);
  }
  const gdOffset = sectors(raw.gdOffset, 'gd_offset', path);
  const rgdOffset = raw.flags & FLAG_RGD ? sectors(raw.rgdOffset, 'rgd_offset', path) : 0;
  const grainOffset = sectors(raw.grainOffset, 'grain_offset', path);
  if (grainOffset * SECTOR > fileSize) {
    throw new CorruptImageError(`${path}: VMDK grain_offset ${grainOffset} sectors lies past the end of the file (${fileSize} bytes): the file is truncated`);
  }
  for (const [field, offset] of [['gd_offset', gdOffset], ['rgd_offset', rgdOffset]] as const) {
    if (field === 'rgd_offset' && !(raw.flags & FLAG_RGD)) continue;
    if (gdEntries > 0 && (offset === 0 || offset * SECTOR + gdEntries * 4 > fileSize)) {
      throw new CorruptImageError(
        `${path}: VMDK ${field} ${offset} sectors: its ${gdEntries}-entry grain directory does not lie inside the file (${fileSize} bytes)`,
      );
    }
  }
  return {
    version: raw.version,
    flags: raw.flags,
    capacity,
    granularity,
    descOffset: sectors(raw.descOffset, 'desc_offset', path),
    descSize: sectors(raw.descSize, 'desc_size', path),
    numGtesPerGt: raw.numGtesPerGt,
    rgdOffset,
    gdOffset,
    grainOffset,
    compressAlgorithm: raw.compressAlgorithm,
    fromFooter,
    gdEntries,
  };
}

/**
 * The footer of a stream-optimized file, its last three sectors as qemu reads
 * them: a footer marker (size - 1536), a copy of the header (- 1024) and the
 * end-of-stream marker (- 512).
 */
async function readFooter(file: Protocol, fileSize: number): Promise<RawHeader> {
  const path = file.path;
  if (fileSize < 1536 + SECTOR) throw new CorruptImageError(`${path}: VMDK gd_offset says the grain directory is in a footer, but the file (${fileSize} bytes) is too short for one`);
  const footer = Buffer.alloc(1536);
  await file.read(fileSize - 1536, footer);
  const markerSize = footer.readUInt32LE(8);
  const markerType = footer.readUInt32LE(12);
  const header = footer.subarray(512, 1024);
  const eosValue = footer.readBigUInt64LE(1024);
  const eosSize = footer.readUInt32LE(1032);
  const eosType = footer.readUInt32LE(1036);
  if (!header.subarray(0, 4).equals(VMDK4_MAGIC) || markerSize !== 0 || markerType !== MARKER_FOOTER || eosValue !== 0n || eosSize !== 0 || eosType !== MARKER_EOS) {
    throw new CorruptImageError(
      `${path}: VMDK gd_offset says the grain directory is in a footer, but the last 1536 bytes are not a footer marker, a "KDMV" header and an end-of-stream marker`,
    );
  }
  const raw = readRaw(header.subarray(0, HEADER_BYTES));
  if (raw.gdOffset === GD_AT_END) throw new CorruptImageError(`${path}: the VMDK footer's gd_offset is GD_AT_END too; it must name the grain directory`);
  return raw;
}
