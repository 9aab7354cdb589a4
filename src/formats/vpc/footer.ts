/**
 * The VHD hard disk footer (Microsoft's "Virtual Hard Disk Image Format
 * Specification", qemu's block/vpc.c): its layout, parsing with every field
 * checked (each failure names the field, its value and what is allowed), the
 * checksum, serialization, the CHS geometry and the virtual-size rule. Pure
 * functions, no I/O. All fields are big-endian; the footer is 512 bytes:
 *
 *   0 cookie "conectix"   8 features   12 file_format_version   16 data_offset (u64)
 *  24 timestamp          28 creator_application   32 creator_version   36 creator_host_os
 *  40 original_size (u64)  48 current_size (u64)  56 cylinders (u16) 58 heads (u8) 59 sectors (u8)
 *  60 disk_type          64 checksum   68 unique_id (16)   84 saved_state   85.. reserved
 *
 * A fixed disk keeps its footer after the data; dynamic and differencing disks
 * keep a copy at offset 0 and the footer at the end of the file.
 *
 * Concurrency: none needed; everything here is a pure function.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const FOOTER_BYTES = 512;
export const FOOTER_COOKIE = Buffer.from('conectix', 'latin1');

export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;

/** Largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track (about 127 GiB). */
export const MAX_CHS_SECTORS = 65535 * 16 * 255;
/** qemu's limit on the virtual size: 2040 GiB (0xff000000 sectors). */
export const MAX_SECTORS = 0xff000000;
export const SECTOR = 512;
/** Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_EPOCH = 946684800;
/** A data_offset of all ones: no dynamic header (fixed disks). */
export const NO_DATA_OFFSET = 0xffffffffffffffffn;

/** Creator applications whose images give their size in current_size (qemu's table); all others use the geometry. */
export const CURRENT_SIZE_CREATORS: readonly string[] = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

export interface VhdFooter {
  features: number;
  version: number;
  /** Offset of the dynamic header; undefined for all ones (fixed disks). */
  dataOffset: number | undefined;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uuid: Buffer;
  savedState: number;
}

/** How the virtual size was decided: from the CHS geometry or from current_size. */
export type SizeSource = 'chs' | 'current_size';

/** The VHD checksum: the one's complement of the sum of every byte but the checksum's four. */
export function vhdChecksum(bytes: Buffer, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i >= checksumOffset && i < checksumOffset + 4) continue;
    sum = (sum + bytes[i]!) >>> 0;
  }
  return ~sum >>> 0;
}

export function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && 2 ** Math.round(Math.log2(value)) === value;
}

/** A u64 field as a safe number, refused above 2^53 - 1. */
export function safeU64(bytes: Buffer, offset: number, field: string, path: string): number {
  const value = bytes.readBigUInt64BE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`${path}: VHD ${field} ${value} is above the largest supported value 2^53-1`);
  }
  return Number(value);
}

function describeType(type: number): string {
  return type === DISK_FIXED ? 'fixed' : type === DISK_DYNAMIC ? 'dynamic' : type === DISK_DIFFERENCING ? 'differencing' : `unknown (${type})`;
}

export { describeType as diskTypeName };

/** Parses and checks the 512 footer bytes in `bytes`, read at `where` ('offset 0', 'the end of the file'). */
export function parseFooter(bytes: Buffer, path: string, where: string): VhdFooter {
  if (bytes.length < FOOTER_BYTES || !bytes.subarray(0, 8).equals(FOOTER_COOKIE)) {
    throw new CorruptImageError(`${path}: no VHD footer (cookie "conectix") at ${where}`);
  }
  const checksum = bytes.readUInt32BE(64);
  const computed = vhdChecksum(bytes.subarray(0, FOOTER_BYTES), 64);
  if (checksum !== computed) {
    throw new CorruptImageError(`${path}: VHD footer checksum 0x${hex(checksum)} at ${where} is wrong (the footer's bytes sum to 0x${hex(computed)})`);
  }
  const rawDataOffset = bytes.readBigUInt64BE(16);
  const footer: VhdFooter = {
    features: bytes.readUInt32BE(8),
    version: bytes.readUInt32BE(12),
    dataOffset: rawDataOffset === NO_DATA_OFFSET ? undefined : safeU64(bytes, 16, 'footer data_offset', path),
    timestamp: bytes.readUInt32BE(24),
    creatorApp: bytes.subarray(28, 32).toString('latin1'),
    creatorVersion: bytes.readUInt32BE(32),
    creatorOs: bytes.subarray(36, 40).toString('latin1'),
    originalSize: safeU64(bytes, 40, 'footer original_size', path),
    currentSize: safeU64(bytes, 48, 'footer current_size', path),
    geometry: { cylinders: bytes.readUInt16BE(56), heads: bytes.readUInt8(58), sectorsPerTrack: bytes.readUInt8(59) },
    diskType: bytes.readUInt32BE(60),
    checksum,
    uuid: Buffer.from(bytes.subarray(68, 84)),
    savedState: bytes.readUInt8(84),
  };
  if (footer.version >>> 16 !== 1) {
    throw new UnsupportedFeatureError(`${path}: VHD file_format_version 0x${hex(footer.version)} is not 1.x (0x0001xxxx)`);
  }
  if (![DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING].includes(footer.diskType)) {
    throw new UnsupportedFeatureError(`${path}: VHD disk_type ${footer.diskType} is not 2 (fixed), 3 (dynamic) or 4 (differencing)`);
  }
  if (footer.diskType !== DISK_FIXED && footer.dataOffset === undefined) {
    throw new CorruptImageError(`${path}: VHD footer data_offset is 0xffffffffffffffff (none) on a ${describeType(footer.diskType)} disk, which needs a dynamic header`);
  }
  return footer;
}

/**
 * The virtual size in bytes, as qemu decides it: from the CHS geometry,
 * unless the creator application is one that uses current_size (Hyper-V,
 * disk2vhd, qemu with force_size, XenServer) or the geometry is the largest
 * possible one (a bigger disk cannot be described by it). `force` chooses by
 * hand like qemu's force_size_calc (the largest geometry still means current_size).
 */
export function virtualSizeOf(footer: VhdFooter, path: string, force?: SizeSource): { size: number; source: SizeSource } {
  const { cylinders, heads, sectorsPerTrack } = footer.geometry;
  const chsSectors = cylinders * heads * sectorsPerTrack;
  const useChs = force === undefined ? !CURRENT_SIZE_CREATORS.includes(footer.creatorApp) : force === 'chs';
  const source: SizeSource = useChs && chsSectors !== MAX_CHS_SECTORS ? 'chs' : 'current_size';
  const sectors = source === 'chs' ? chsSectors : Math.floor(footer.currentSize / SECTOR);
  if (sectors > MAX_SECTORS) {
    const field = source === 'chs' ? `geometry ${cylinders}/${heads}/${sectorsPerTrack}` : `current_size ${footer.currentSize}`;
    throw new UnsupportedFeatureError(`${path}: VHD ${field} gives ${sectors * SECTOR} bytes, above the 2040 GiB (${MAX_SECTORS * SECTOR} bytes) qemu allows`);
  }
  return { size: sectors * SECTOR, source };
}

/** The CHS geometry the specification (and qemu) gives a disk of `totalSectors` sectors. */
export function calculateGeometry(totalSectors: number): Geometry {
  const total = Math.min(totalSectors, MAX_CHS_SECTORS);
  let sectorsPerTrack: number;
  let heads: number;
  let cylTimesHeads: number;
  if (total >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylTimesHeads = Math.floor(total / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylTimesHeads = Math.floor(total / sectorsPerTrack);
    heads = Math.max(4, Math.ceil(cylTimesHeads / 1024));
    if (cylTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylTimesHeads = Math.floor(total / sectorsPerTrack);
    }
    if (cylTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylTimesHeads = Math.floor(total / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylTimesHeads / heads), heads, sectorsPerTrack };
}

/** Serializes a footer into its 512 bytes, with the checksum computed. */
export function serializeFooter(footer: VhdFooter): Buffer {
  const bytes = Buffer.alloc(FOOTER_BYTES);
  FOOTER_COOKIE.copy(bytes, 0);
  bytes.writeUInt32BE(footer.features, 8);
  bytes.writeUInt32BE(footer.version, 12);
  bytes.writeBigUInt64BE(footer.dataOffset === undefined ? NO_DATA_OFFSET : BigInt(footer.dataOffset), 16);
  bytes.writeUInt32BE(footer.timestamp, 24);
  bytes.write(footer.creatorApp, 28, 4, 'latin1');
  bytes.writeUInt32BE(footer.creatorVersion, 32);
  bytes.write(footer.creatorOs, 36, 4, 'latin1');
  bytes.writeBigUInt64BE(BigInt(footer.originalSize), 40);
  bytes.writeBigUInt64BE(BigInt(footer.currentSize), 48);
  bytes.writeUInt16BE(footer.geometry.cylinders, 56);
  bytes.writeUInt8(footer.geometry.heads, 58);
  bytes.writeUInt8(footer.geometry.sectorsPerTrack, 59);
  bytes.writeUInt32BE(footer.diskType, 60);
  footer.uuid.copy(bytes, 68, 0, 16);
  bytes.writeUInt8(footer.savedState, 84);
  bytes.writeUInt32BE(vhdChecksum(bytes, 64), 64);
  return bytes;
}

/** A UUID's 16 bytes in the usual 8-4-4-4-12 text form. */
export function uuidText(bytes: Buffer): string {
  const h = bytes.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

function hex(value: number): string {
  return value.toString(16).padStart(8, '0');
}
