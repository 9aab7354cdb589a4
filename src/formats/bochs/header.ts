/**
 * The Bochs "growing" redolog header (what bximage makes and qemu reads): its
 * layout and parsing with every field validated as qemu's block/bochs.c does,
 * each failure naming the field, its value and the allowed range; plus the
 * bound from CVE-2014-0143 (a catalog of at most 2^20 entries, so no huge
 * allocation) and the catalog inside the file. Pure functions, no I/O.
 *
 * Layout (little-endian, 512 bytes): magic[32] "Bochs Virtual HD Image",
 * type[16] "Redolog", subtype[16] "Growing" (each NUL-terminated), 64 version
 * (0x00020000, or 0x00010000 for v1), 68 header (bytes before the catalog),
 * 72 catalog (entries), 76 bitmap (bytes per extent bitmap), 80 extent (bytes
 * per extent); v2: 84 reserved, 88 disk (u64 bytes); v1: 84 disk (u64).
 * After the catalog (u32 per extent, 0xffffffff: not allocated), extent k
 * is a bitmap (one bit per sector, whole sectors) then the extent's sectors.
 */
import { CorruptImageError } from '../../block/errors.js';

export const HEADER_BYTES = 512;
export const VERSION_2 = 0x00020000;
export const VERSION_1 = 0x00010000;
/** qemu's catalog bound (enough for the largest image bximage makes, about 8 TB). */
export const MAX_CATALOG_ENTRIES = 0x100000;
export const MIN_EXTENT = 512;
export const MAX_EXTENT = 0x800000;
export const UNALLOCATED = 0xffffffff;

const FIELDS: ReadonlyArray<[name: string, offset: number, length: number, text: string]> = [
  ['magic', 0, 32, 'Bochs Virtual HD Image'],
  ['type', 32, 16, 'Redolog'],
  ['subtype', 48, 16, 'Growing'],
];

export interface BochsHeader {
  version: number;
  /** Byte offset of the catalog. */
  catalogOffset: number;
  catalogEntries: number;
  bitmapBytes: number;
  extentBytes: number;
  /** The guest size: the disk field rounded down to a sector, as qemu. */
  diskBytes: number;
  /** Sectors of bitmap and of data per extent, as qemu rounds them. */
  bitmapSectors: number;
  extentSectors: number;
  /** Byte offset of extent 0 (the catalog's end). */
  dataOffset: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: bochs ${message}`);
}

/** The NUL-terminated string in a fixed-size field (the whole field if it has no NUL). */
function cString(bytes: Buffer): string {
  const end = bytes.indexOf(0);
  return bytes.subarray(0, end < 0 ? bytes.length : end).toString('latin1');
}

export function isPowerOfTwo(value: number): boolean {
  return value > 0 && (value & (value - 1)) === 0;
}

/** The header as the probe and open see it: the three strings and the version. */
export function looksLikeBochs(head: Buffer): boolean {
  if (head.length < HEADER_BYTES) return false;
  if (FIELDS.some(([, offset, length, text]) => cString(head.subarray(offset, offset + length)) !== text)) return false;
  const version = head.readUInt32LE(64);
  return version === VERSION_2 || version === VERSION_1;
}

/** Parses and validates the 512-byte header of a file `fileSize` bytes long. */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): BochsHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  for (const [name, offset, length, text] of FIELDS) {
    const field = bytes.subarray(offset, offset + length);
    if (cString(field) !== text) fail(path, `${name} ${JSON.stringify(cString(field))} is not "${text}" (only growing redolog images are read)`);
  }
  const version = bytes.readUInt32LE(64);
  if (version !== VERSION_2 && version !== VERSION_1) fail(path, `version 0x${version.toString(16)} is not 0x20000 or 0x10000`);
  const disk = bytes.readBigUInt64LE(version === VERSION_1 ? 84 : 88);
  if (disk > BigInt(Number.MAX_SAFE_INTEGER)) fail(path, `disk size ${disk} is above the largest supported size 2^53-1`);
  const header = {
    version,
    catalogOffset: bytes.readUInt32LE(68),
    catalogEntries: bytes.readUInt32LE(72),
    bitmapBytes: bytes.readUInt32LE(76),
    extentBytes: bytes.readUInt32LE(80),
    diskBytes: Math.floor(Number(disk) / 512) * 512,
  };
  if (header.catalogEntries > MAX_CATALOG_ENTRIES) fail(path, `catalog ${header.catalogEntries} (entries) is not in [0, ${MAX_CATALOG_ENTRIES}]`);
  const catalogEnd = header.catalogOffset + 4 * header.catalogEntries;
  if (catalogEnd > fileSize) fail(path, `header ${header.catalogOffset} with catalog ${header.catalogEntries} puts the catalog past the end of the ${fileSize}-byte file (truncated image?)`);
  const { extentBytes, bitmapBytes } = header;
  if (extentBytes < MIN_EXTENT || extentBytes > MAX_EXTENT || !isPowerOfTwo(extentBytes)) {
    fail(path, `extent ${extentBytes} (bytes) is not a power of two in [${MIN_EXTENT}, ${MAX_EXTENT}]`);
  }
  const extentSectors = extentBytes / 512;
  // One bit per sector of the extent: qemu does not check this, and a smaller bitmap would have it read the extent's data as bitmap.
  const minBitmap = Math.ceil(extentSectors / 8);
  if (bitmapBytes < minBitmap || bitmapBytes > MAX_EXTENT) fail(path, `bitmap ${bitmapBytes} (bytes) is not in [${minBitmap}, ${MAX_EXTENT}] (one bit per sector of a ${extentBytes}-byte extent)`);
  const needed = Math.ceil(header.diskBytes / extentBytes);
  if (header.catalogEntries < needed) fail(path, `catalog ${header.catalogEntries} (entries) is too small for the disk size ${header.diskBytes}: it needs ${needed}`);
  return {
    ...header,
    bitmapSectors: Math.ceil(bitmapBytes / 512),
    extentSectors,
    dataOffset: catalogEnd,
  };
}
