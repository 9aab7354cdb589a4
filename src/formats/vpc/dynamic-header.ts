/**
 * The VHD dynamic disk header (1024 bytes, big-endian) of dynamic and
 * differencing disks, parsed with every field checked against the file
 * (CVE-2014-0144 in qemu was this table's size: max_table_entries is bounded
 * before anything is allocated), and the parent locators of differencing
 * disks turned into the parent's file name. Pure functions, no I/O.
 *
 *    0 cookie "cxsparse"   8 data_offset (u64, unused)   16 table_offset (u64)
 *   24 header_version     28 max_table_entries   32 block_size   36 checksum
 *   40 parent_unique_id (16)   56 parent_timestamp   60 reserved
 *   64 parent_unicode_name (512 bytes, UTF-16 big-endian)
 *  576 8 parent locator entries of 24 bytes: platform_code, platform_data_space,
 *      platform_data_length, reserved, platform_data_offset (u64)
 *
 * Concurrency: none needed; everything here is a pure function.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import { isPowerOfTwo, safeU64, SECTOR, vhdChecksum } from './footer.js';

export const DYNAMIC_HEADER_BYTES = 1024;
export const DYNAMIC_COOKIE = Buffer.from('cxsparse', 'latin1');
/** A BAT entry of all ones: the block is not allocated. */
export const UNALLOCATED = 0xffffffff;
/** Largest BAT read: 64 Mi entries (256 MiB). A 2040 GiB disk of 2 MiB blocks needs about 1 Mi. */
export const MAX_BAT_ENTRIES = 64 * 1024 * 1024;
/** Largest block size qemu's u32 field allows as a power of two. */
export const MAX_BLOCK_SIZE = 2 ** 31;
export const PARENT_NAME_BYTES = 512;
/** Longest parent locator read (a path); Windows' long paths are 32767 UTF-16 units. */
export const MAX_LOCATOR_BYTES = 65536;

export const PLATFORM_W2RU = 0x57327275; // 'W2ru': relative Windows path, UTF-16LE
export const PLATFORM_W2KU = 0x57326b75; // 'W2ku': absolute Windows path, UTF-16LE
export const PLATFORM_MACX = 0x4d616358; // 'MacX': file URL, UTF-8

export interface ParentLocator {
  platform: number;
  /** Space reserved, as stored (sectors per the specification; some writers store bytes). */
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
}

export interface DynamicHeader {
  tableOffset: number;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  /** Bytes of each block's sector bitmap: one bit per sector, padded to a sector. */
  bitmapBytes: number;
  parentUuid: Buffer;
  parentTimestamp: number;
  parentName: string;
  locators: ParentLocator[];
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: VHD dynamic header ${message}`);
}

/** Parses the header at `headerOffset` of a file `fileSize` bytes long whose disk is `virtualSize` bytes. */
export function parseDynamicHeader(bytes: Buffer, headerOffset: number, fileSize: number, virtualSize: number, differencing: boolean, path: string): DynamicHeader {
  if (headerOffset % SECTOR !== 0 || headerOffset + DYNAMIC_HEADER_BYTES > fileSize) {
    throw new CorruptImageError(`${path}: VHD footer data_offset ${headerOffset} does not put the ${DYNAMIC_HEADER_BYTES}-byte dynamic header on a sector inside the ${fileSize}-byte file`);
  }
  if (!bytes.subarray(0, 8).equals(DYNAMIC_COOKIE)) fail(path, `cookie ${bytes.subarray(0, 8).toString('hex')} at ${headerOffset} is not "cxsparse"`);
  const checksum = bytes.readUInt32BE(36);
  const computed = vhdChecksum(bytes.subarray(0, DYNAMIC_HEADER_BYTES), 36);
  if (checksum !== computed) fail(path, `checksum 0x${checksum.toString(16)} is wrong (the header's bytes sum to 0x${computed.toString(16)})`);
  const header: DynamicHeader = {
    tableOffset: safeU64(bytes, 16, 'dynamic header table_offset', path),
    version: bytes.readUInt32BE(24),
    maxTableEntries: bytes.readUInt32BE(28),
    blockSize: bytes.readUInt32BE(32),
    bitmapBytes: 0,
    parentUuid: Buffer.from(bytes.subarray(40, 56)),
    parentTimestamp: bytes.readUInt32BE(56),
    parentName: decodeUtf16(bytes.subarray(64, 64 + PARENT_NAME_BYTES), 'be'),
    locators: [],
  };
  if (header.version >>> 16 !== 1) {
    throw new UnsupportedFeatureError(`${path}: VHD dynamic header header_version 0x${header.version.toString(16)} is not 1.x (0x0001xxxx)`);
  }
  const { blockSize } = header;
  if (!isPowerOfTwo(blockSize) || blockSize < SECTOR || blockSize > MAX_BLOCK_SIZE) {
    fail(path, `block_size ${blockSize} is not a power of two in [${SECTOR}, ${MAX_BLOCK_SIZE}]`);
  }
  header.bitmapBytes = Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR;
  const needed = Math.ceil(virtualSize / blockSize);
  if (header.maxTableEntries < needed) {
    fail(path, `max_table_entries ${header.maxTableEntries} is too small: the ${virtualSize}-byte disk needs ${needed} blocks of ${blockSize} bytes`);
  }
  if (header.maxTableEntries > MAX_BAT_ENTRIES) {
    throw new UnsupportedFeatureError(`${path}: VHD dynamic header max_table_entries ${header.maxTableEntries} is above the ${MAX_BAT_ENTRIES} this program reads`);
  }
  const tableBytes = header.maxTableEntries * 4;
  if (header.tableOffset % SECTOR !== 0 || header.tableOffset + tableBytes > fileSize) {
    fail(path, `table_offset ${header.tableOffset} with ${header.maxTableEntries} entries does not put the ${tableBytes}-byte BAT on a sector inside the ${fileSize}-byte file (truncated image?)`);
  }
  if (overlaps(header.tableOffset, tableBytes, headerOffset, DYNAMIC_HEADER_BYTES)) {
    fail(path, `table_offset ${header.tableOffset}: the BAT overlaps the dynamic header at ${headerOffset}`);
  }
  for (let i = 0; i < 8; i++) {
    const at = 576 + i * 24;
    const platform = bytes.readUInt32BE(at);
    if (platform === 0) continue;
    const locator: ParentLocator = {
      platform,
      dataSpace: bytes.readUInt32BE(at + 4),
      dataLength: bytes.readUInt32BE(at + 8),
      dataOffset: safeU64(bytes, at + 16, `parent locator ${i} platform_data_offset`, path),
    };
    if (differencing && isPathLocator(platform)) {
      if (locator.dataLength > MAX_LOCATOR_BYTES || locator.dataOffset + locator.dataLength > fileSize) {
        fail(path, `parent locator ${i} (${platformName(platform)}): ${locator.dataLength} bytes at ${locator.dataOffset} are not inside the ${fileSize}-byte file (at most ${MAX_LOCATOR_BYTES})`);
      }
    }
    header.locators.push(locator);
  }
  return header;
}

export function overlaps(a: number, aLength: number, b: number, bLength: number): boolean {
  return a < b + bLength && b < a + aLength;
}

export function isPathLocator(platform: number): boolean {
  return platform === PLATFORM_W2RU || platform === PLATFORM_W2KU || platform === PLATFORM_MACX;
}

export function platformName(platform: number): string {
  const text = Buffer.alloc(4);
  text.writeUInt32BE(platform);
  return /^[\x20-\x7e]{4}$/.test(text.toString('latin1')) ? text.toString('latin1') : `0x${platform.toString(16)}`;
}

/** UTF-16 text up to its first NUL. */
export function decodeUtf16(bytes: Buffer, endian: 'le' | 'be'): string {
  const even = bytes.subarray(0, bytes.length - (bytes.length % 2));
  const le = endian === 'le' ? Buffer.from(even) : Buffer.from(even).swap16();
  const text = le.toString('utf16le');
  const nul = text.indexOf('\0');
  return nul === -1 ? text : text.slice(0, nul);
}

/**
 * The parent's file name from one locator's bytes, as a path for this system:
 * Windows paths with '/' for '\' (a relative ".\parent.vhd" becomes
 * "./parent.vhd"), a MacX "file://" URL as its path. Undefined when the
 * locator holds nothing usable.
 */
export function locatorPath(platform: number, data: Buffer): string | undefined {
  if (platform === PLATFORM_MACX) {
    const text = data.toString('utf8').replace(/\0.*$/s, '');
    const match = /^file:\/\/(?:localhost)?(\/.*)$/.exec(text);
    if (!match) return text.length > 0 && !text.includes('://') ? text : undefined;
    try {
      return decodeURIComponent(match[1]!);
    } catch {
      return match[1]!;
    }
  }
  const text = decodeUtf16(data, 'le');
  if (text.length === 0) return undefined;
  return text.replace(/\\/g, '/');
}
