/**
 * The QED header: its on-disk layout, parsing with every field validated
 * (each failure names the field, its value and the allowed range), and
 * serialization. Layout (all little-endian, 64 bytes):
 *
 *   0 magic "QED\0"        4 cluster_size       8 table_size       12 header_size
 *  16 features            24 compat_features   32 autoclear_features
 *  40 l1_table_offset     48 image_size
 *  56 backing_filename_offset (u32)             60 backing_filename_size (u32)
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const QED_MAGIC = Buffer.from('QED\0', 'latin1');
export const HEADER_BYTES = 64;

export const QED_F_BACKING_FILE = 0x01n;
export const QED_F_NEED_CHECK = 0x02n;
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;
export const KNOWN_FEATURES = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE;
export const KNOWN_AUTOCLEAR_FEATURES = 0n;

export const MIN_CLUSTER_SIZE = 4096;
export const MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const MIN_TABLE_SIZE = 1;
export const MAX_TABLE_SIZE = 16;
export const DEFAULT_CLUSTER_SIZE = 65536;
export const DEFAULT_TABLE_SIZE = 4;
/** Longest backing file name accepted, as on Linux (PATH_MAX - 1). */
export const MAX_BACKING_NAME_BYTES = 4095;

export interface QedHeader {
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  features: bigint;
  compatFeatures: bigint;
  autoclearFeatures: bigint;
  l1TableOffset: number;
  imageSize: number;
  backingFilenameOffset: number;
  backingFilenameSize: number;
}

export function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

/** Offsets per table: table_size * cluster_size / 8. */
export function tableEntries(header: Pick<QedHeader, 'clusterSize' | 'tableSize'>): number {
  return (header.tableSize * header.clusterSize) / 8;
}

/** Largest image_size the L1/L2 geometry can address, capped at 2^53 - 1. */
export function maxImageSize(header: Pick<QedHeader, 'clusterSize' | 'tableSize'>): number {
  const entries = BigInt(tableEntries(header));
  const max = entries * entries * BigInt(header.clusterSize);
  return max > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(max);
}

function safeOffset(value: bigint, field: string, path: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`${path}: QED ${field} ${value} is above the largest supported offset 2^53-1`);
  }
  return Number(value);
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: QED ${message}`);
}

/**
 * Parses and validates the header in `bytes` (at least 64 bytes from offset 0)
 * of a file `fileSize` bytes long.
 */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): QedHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) {
    fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  }
  if (!bytes.subarray(0, 4).equals(QED_MAGIC)) fail(path, `magic ${bytes.subarray(0, 4).toString('hex')} is not 51454400 ("QED\\0")`);
  const header: QedHeader = {
    clusterSize: bytes.readUInt32LE(4),
    tableSize: bytes.readUInt32LE(8),
    headerSize: bytes.readUInt32LE(12),
    features: bytes.readBigUInt64LE(16),
    compatFeatures: bytes.readBigUInt64LE(24),
    autoclearFeatures: bytes.readBigUInt64LE(32),
    l1TableOffset: safeOffset(bytes.readBigUInt64LE(40), 'l1_table_offset', path),
    imageSize: safeOffset(bytes.readBigUInt64LE(48), 'image_size', path),
    backingFilenameOffset: bytes.readUInt32LE(56),
    backingFilenameSize: bytes.readUInt32LE(60),
  };
  const { clusterSize, tableSize, headerSize } = header;
  if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
    fail(path, `cluster_size ${clusterSize} is not a power of two in [${MIN_CLUSTER_SIZE}, ${MAX_CLUSTER_SIZE}]`);
  }
  if (!isPowerOfTwo(tableSize) || tableSize < MIN_TABLE_SIZE || tableSize > MAX_TABLE_SIZE) {
    fail(path, `table_size ${tableSize} is not a power of two in [${MIN_TABLE_SIZE}, ${MAX_TABLE_SIZE}]`);
  }
  const unknownFeatures = header.features & ~KNOWN_FEATURES;
  if (unknownFeatures !== 0n) {
    throw new UnsupportedFeatureError(
      `${path}: QED features has unknown bits 0x${unknownFeatures.toString(16)} (known: 0x${KNOWN_FEATURES.toString(16)}); this image needs a newer program`,
    );
  }
  const headerBytes = headerSize * clusterSize;
  if (headerSize < 1 || headerBytes > header.l1TableOffset) {
    fail(path, `header_size ${headerSize} is not in [1, l1_table_offset / cluster_size = ${Math.floor(header.l1TableOffset / clusterSize)}]`);
  }
  const tableBytes = tableSize * clusterSize;
  if (header.l1TableOffset % clusterSize !== 0) {
    fail(path, `l1_table_offset ${header.l1TableOffset} is not a multiple of cluster_size ${clusterSize}`);
  }
  if (header.l1TableOffset + tableBytes > fileSize) {
    fail(path, `l1_table_offset ${header.l1TableOffset} puts the ${tableBytes}-byte L1 table past the end of the ${fileSize}-byte file (truncated image?)`);
  }
  const maxSize = maxImageSize(header);
  if (header.imageSize % 512 !== 0 || header.imageSize > maxSize) {
    fail(path, `image_size ${header.imageSize} is not a multiple of 512 in [0, ${maxSize}]`);
  }
  if (header.features & QED_F_BACKING_FILE) {
    const end = header.backingFilenameOffset + header.backingFilenameSize;
    if (header.backingFilenameSize < 1 || header.backingFilenameSize > MAX_BACKING_NAME_BYTES) {
      fail(path, `backing_filename_size ${header.backingFilenameSize} is not in [1, ${MAX_BACKING_NAME_BYTES}]`);
    }
    if (header.backingFilenameOffset < HEADER_BYTES || end > headerBytes) {
      fail(path, `backing_filename_offset ${header.backingFilenameOffset} with size ${header.backingFilenameSize} is not inside the header area [${HEADER_BYTES}, ${headerBytes}]`);
    }
  }
  return header;
}

/** Serializes a header into its 64 on-disk bytes. */
export function serializeHeader(header: QedHeader): Buffer {
  const bytes = Buffer.alloc(HEADER_BYTES);
  QED_MAGIC.copy(bytes, 0);
  bytes.writeUInt32LE(header.clusterSize, 4);
  bytes.writeUInt32LE(header.tableSize, 8);
  bytes.writeUInt32LE(header.headerSize, 12);
  bytes.writeBigUInt64LE(header.features, 16);
  bytes.writeBigUInt64LE(header.compatFeatures, 24);
  bytes.writeBigUInt64LE(header.autoclearFeatures, 32);
  bytes.writeBigUInt64LE(BigInt(header.l1TableOffset), 40);
  bytes.writeBigUInt64LE(BigInt(header.imageSize), 48);
  bytes.writeUInt32LE(header.backingFilenameOffset, 56);
  bytes.writeUInt32LE(header.backingFilenameSize, 60);
  return bytes;
}

/** Describes features bits for `info` ("backing_file, need_check"). */
export function describeFeatures(features: bigint): string {
  const names: string[] = [];
  if (features & QED_F_BACKING_FILE) names.push('backing_file');
  if (features & QED_F_NEED_CHECK) names.push('need_check');
  if (features & QED_F_BACKING_FORMAT_NO_PROBE) names.push('backing_format_no_probe');
  return names.join(', ') || 'none';
}
