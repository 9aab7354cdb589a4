/**
 * The qcow2 header (docs/interop/qcow2.txt in qemu): its on-disk layout, and
 * parsing with every field validated. Each failure names the field, its value
 * and the allowed range; 64-bit fields are read as bigint and refused above
 * 2^53 before they become offsets. All fields are big-endian.
 *
 *   0 magic "QFI\xfb"          4 version (2, 3)          8 backing_file_offset
 *  16 backing_file_size       20 cluster_bits           24 size (virtual)
 *  32 crypt_method            36 l1_size                40 l1_table_offset
 *  48 refcount_table_offset   56 refcount_table_clusters
 *  60 nb_snapshots            64 snapshots_offset
 *  version 3 only:
 *  72 incompatible_features   80 compatible_features    88 autoclear_features
 *  96 refcount_order         100 header_length         104 compression_type (when header_length > 104)
 *
 * Header extensions follow the header inside the first cluster (parsed in
 * extensions.ts).
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const QCOW_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);
export const V2_HEADER_BYTES = 72;
export const V3_MIN_HEADER_BYTES = 104;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** qemu's limits: 32 MiB of L1 table, 8 MiB of refcount table, 65536 snapshots. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME_BYTES = 1023;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
export const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;
/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** Names of the known feature bits, for messages when an image has no feature name table. */
export const BUILTIN_FEATURE_NAMES: Record<'incompatible' | 'compatible' | 'autoclear', Record<number, string>> = {
  incompatible: { 0: 'dirty bit', 1: 'corrupt bit', 2: 'external data file', 3: 'compression type', 4: 'extended L2 entries' },
  compatible: { 0: 'lazy refcounts' },
  autoclear: { 0: 'bitmaps', 1: 'raw external data' },
};

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: CompressionType;
}

/** Reads a big-endian u64 as a number, refusing values above 2^53 with a message naming the field. */
function u64(bytes: Buffer, at: number, field: string, path: string): number {
  const value = bytes.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`${path}: qcow2 ${field} ${value} is above 2^53, the largest value handled`);
  }
  return Number(value);
}

/** Parses and validates the fixed part of a qcow2 header (`bytes` holds at least the first 112 bytes). */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): Qcow2Header {
  const fail = (message: string): never => {
    throw new CorruptImageError(`${path}: qcow2 ${message}`);
  };
  if (!bytes.subarray(0, 4).equals(QCOW_MAGIC)) fail('magic is missing');
  const version = bytes.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedFeatureError(`${path}: qcow2 version ${version} is not supported (versions 2 and 3 are)`);
  }
  const clusterBits = bytes.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail(`cluster_bits ${clusterBits} is outside [${MIN_CLUSTER_BITS}, ${MAX_CLUSTER_BITS}] (cluster sizes 512 B to 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;
  const headerLength = version === 2 ? V2_HEADER_BYTES : bytes.readUInt32BE(100);
  if (version === 3) {
    if (headerLength < V3_MIN_HEADER_BYTES || headerLength > clusterSize || headerLength % 8 !== 0) {
      fail(`header_length ${headerLength} is not a multiple of 8 in [${V3_MIN_HEADER_BYTES}, ${clusterSize}] (the cluster size)`);
    }
  }
  const header: Qcow2Header = {
    version,
    backingFileOffset: u64(bytes, 8, 'backing_file_offset', path),
    backingFileSize: bytes.readUInt32BE(16),
    clusterBits,
    clusterSize,
    size: u64(bytes, 24, 'size', path),
    cryptMethod: bytes.readUInt32BE(32),
    l1Size: bytes.readUInt32BE(36),
    l1TableOffset: u64(bytes, 40, 'l1_table_offset', path),
    refcountTableOffset: u64(bytes, 48, 'refcount_table_offset', path),
    refcountTableClusters: bytes.readUInt32BE(56),
    nbSnapshots: bytes.readUInt32BE(60),
    snapshotsOffset: u64(bytes, 64, 'snapshots_offset', path),
    incompatibleFeatures: version === 3 ? bytes.readBigUInt64BE(72) : 0n,
    compatibleFeatures: version === 3 ? bytes.readBigUInt64BE(80) : 0n,
    autoclearFeatures: version === 3 ? bytes.readBigUInt64BE(88) : 0n,
    refcountOrder: version === 3 ? bytes.readUInt32BE(96) : 4,
    headerLength,
    compressionType: 'zlib',
  };
  if (version === 3 && header.refcountOrder > 6) fail(`refcount_order ${header.refcountOrder} is outside [0, 6] (refcounts of 1 to 64 bits)`);
  if (version === 3 && headerLength > V3_MIN_HEADER_BYTES) {
    const type = bytes[104]!;
    const declared = (header.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
    if (type > 1) {
      throw new UnsupportedFeatureError(`${path}: qcow2 compression_type ${type} is unknown (0 zlib, 1 zstd)`);
    }
    if (type !== 0 && !declared) fail(`compression_type ${type} is set without the compression type incompatible feature bit`);
    if (type === 0 && declared) fail('the compression type feature bit is set with compression_type 0 (zlib)');
    header.compressionType = type === 1 ? 'zstd' : 'zlib';
  } else if (header.incompatibleFeatures & INCOMPAT_COMPRESSION) {
    fail('the compression type feature bit is set but the header has no compression_type field');
  }
  validateLayout(header, fileSize, fail);
  return header;
}

/** Checks that every table the header points to is aligned, inside the file and off the header cluster. */
function validateLayout(header: Qcow2Header, fileSize: number, fail: (message: string) => never): void {
  const { clusterSize } = header;
  const table = (field: string, offset: number, bytes: number, present: boolean): void => {
    if (!present) return;
    if (offset % clusterSize !== 0) fail(`${field} ${offset} is not aligned to the cluster size ${clusterSize}`);
    if (offset < clusterSize) fail(`${field} ${offset} points into the header cluster`);
    if (offset + bytes > fileSize) fail(`${field} ${offset} (+${bytes} bytes) lies outside the file (${fileSize} bytes)`);
  };
  const l1Bytes = header.l1Size * 8;
  if (l1Bytes > MAX_L1_BYTES) fail(`l1_size ${header.l1Size} is above ${MAX_L1_BYTES / 8} entries (a 32 MiB L1 table)`);
  table('l1_table_offset', header.l1TableOffset, l1Bytes, header.l1Size > 0);
  const refcountBytes = header.refcountTableClusters * clusterSize;
  if (refcountBytes > MAX_REFCOUNT_TABLE_BYTES) {
    fail(`refcount_table_clusters ${header.refcountTableClusters} is above ${MAX_REFCOUNT_TABLE_BYTES / clusterSize} (an 8 MiB refcount table)`);
  }
  if (header.refcountTableClusters === 0) fail('refcount_table_clusters is 0: the image has no refcount table');
  table('refcount_table_offset', header.refcountTableOffset, refcountBytes, true);
  if (header.nbSnapshots > MAX_SNAPSHOTS) fail(`nb_snapshots ${header.nbSnapshots} is above ${MAX_SNAPSHOTS}`);
  if (header.nbSnapshots > 0) {
    if (header.snapshotsOffset % clusterSize !== 0) {
      fail(`snapshots_offset ${header.snapshotsOffset} is not aligned to the cluster size ${clusterSize}`);
    }
    if (header.snapshotsOffset < clusterSize) fail(`snapshots_offset ${header.snapshotsOffset} points into the header cluster`);
    if (header.snapshotsOffset >= fileSize) fail(`snapshots_offset ${header.snapshotsOffset} lies outside the file (${fileSize} bytes)`);
  }
  if (header.backingFileOffset !== 0) {
    if (header.backingFileSize === 0 || header.backingFileSize > MAX_BACKING_NAME_BYTES) {
      fail(`backing_file_size ${header.backingFileSize} is outside [1, ${MAX_BACKING_NAME_BYTES}]`);
    }
    if (header.backingFileOffset + header.backingFileSize > clusterSize) {
      fail(`the backing file name (offset ${header.backingFileOffset}, ${header.backingFileSize} bytes) does not lie in the header cluster`);
    }
  }
}

/** Bit numbers set in `bits`. */
export function bitsOf(bits: bigint): number[] {
  const out: number[] = [];
  for (let bit = 0; bit < 64; bit++) if (bits & (1n << BigInt(bit))) out.push(bit);
  return out;
}
