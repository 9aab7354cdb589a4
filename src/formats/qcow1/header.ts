/**
 * The qcow (version 1) header: its on-disk layout and parsing with every
 * field validated against what qemu's block/qcow.c accepts (each failure
 * names the field, its value and the allowed range), plus the bounds the
 * CVEs of that driver taught (CVE-2014-0222: an L1 size that overflows;
 * CVE-2014-0223: cluster/L2 bits that shift out of range). Pure functions,
 * no I/O, no state.
 *
 * Layout (big-endian, 48 bytes):
 *
 *   0 magic "QFI\xfb"   4 version (1)        8 backing_file_offset (u64)
 *  16 backing_file_size (u32)  20 mtime (u32)  24 size (u64, bytes)
 *  32 cluster_bits (u8) 33 l2_bits (u8)  34 padding (u16)
 *  36 crypt_method (u32: 0 none, 1 AES)      40 l1_table_offset (u64)
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const QCOW_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);
export const QCOW_VERSION = 1;
export const HEADER_BYTES = 48;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 16;
/** l2_bits counts 8-byte entries: L2 tables of 512 B .. 64 KiB, as qemu allows. */
export const MIN_L2_BITS = 6;
export const MAX_L2_BITS = 13;
/** qemu's limit on a backing file name (its buffer is 1024 bytes with the NUL). */
export const MAX_BACKING_NAME_BYTES = 1023;
/** qemu's bound on the L1 table: INT_MAX / 8 entries. */
export const MAX_L1_ENTRIES = Math.floor(0x7fffffff / 8);

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;

export interface QcowHeader {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  /** The size field as stored; the guest sees it rounded down to 512 bytes, as in qemu. */
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  /** Entries of the L1 table: ceil(size / 2^(cluster_bits + l2_bits)). */
  l1Size: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: qcow ${message}`);
}

function safe(value: bigint, field: string, path: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) fail(path, `${field} ${value} is above the largest supported value 2^53-1`);
  return Number(value);
}

/** Parses and validates the first 48 bytes of a file `fileSize` bytes long. */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): QcowHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) {
    fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  }
  if (!bytes.subarray(0, 4).equals(QCOW_MAGIC)) fail(path, `magic ${bytes.subarray(0, 4).toString('hex')} is not 514649fb ("QFI\\xfb")`);
  const version = bytes.readUInt32BE(4);
  if (version !== QCOW_VERSION) {
    throw new UnsupportedFeatureError(`${path}: qcow version ${version} is not 1 (versions 2 and 3 are qcow2)`);
  }
  const sizeField = bytes.readBigUInt64BE(24);
  const header: QcowHeader = {
    backingFileOffset: safe(bytes.readBigUInt64BE(8), 'backing_file_offset', path),
    backingFileSize: bytes.readUInt32BE(16),
    mtime: bytes.readUInt32BE(20),
    size: safe(sizeField, 'size', path),
    clusterBits: bytes[32]!,
    l2Bits: bytes[33]!,
    cryptMethod: bytes.readUInt32BE(36),
    l1TableOffset: safe(bytes.readBigUInt64BE(40), 'l1_table_offset', path),
    l1Size: 0,
  };
  if (header.size <= 1) fail(path, `size ${header.size} is too small (at least 2 bytes)`);
  if (header.clusterBits < MIN_CLUSTER_BITS || header.clusterBits > MAX_CLUSTER_BITS) {
    fail(path, `cluster_bits ${header.clusterBits} is not in [${MIN_CLUSTER_BITS}, ${MAX_CLUSTER_BITS}] (clusters of 512 B .. 64 KiB)`);
  }
  if (header.l2Bits < MIN_L2_BITS || header.l2Bits > MAX_L2_BITS) {
    fail(path, `l2_bits ${header.l2Bits} is not in [${MIN_L2_BITS}, ${MAX_L2_BITS}] (L2 tables of 512 B .. 64 KiB)`);
  }
  if (header.cryptMethod === CRYPT_AES) {
    throw new UnsupportedFeatureError(`${path}: qcow image is encrypted (crypt_method 1, AES-CBC); encrypted qcow images are not supported`);
  }
  if (header.cryptMethod !== CRYPT_NONE) fail(path, `crypt_method ${header.cryptMethod} is not 0 (none) or 1 (AES)`);
  const span = 2 ** (header.clusterBits + header.l2Bits);
  const l1Size = Math.ceil(header.size / span);
  if (l1Size > MAX_L1_ENTRIES) fail(path, `size ${header.size} needs ${l1Size} L1 entries, more than the ${MAX_L1_ENTRIES} allowed`);
  header.l1Size = l1Size;
  const l1Bytes = l1Size * 8;
  if (header.l1TableOffset < HEADER_BYTES || header.l1TableOffset + l1Bytes > fileSize) {
    fail(
      path,
      `l1_table_offset ${header.l1TableOffset} with ${l1Bytes} bytes of L1 table is not inside the file [${HEADER_BYTES}, ${fileSize}] (truncated image?)`,
    );
  }
  if (header.backingFileOffset !== 0) {
    if (header.backingFileSize > MAX_BACKING_NAME_BYTES) {
      fail(path, `backing_file_size ${header.backingFileSize} is not in [0, ${MAX_BACKING_NAME_BYTES}]`);
    }
    if (header.backingFileOffset < HEADER_BYTES || header.backingFileOffset + header.backingFileSize > fileSize) {
      fail(path, `backing_file_offset ${header.backingFileOffset} with size ${header.backingFileSize} is not inside the file [${HEADER_BYTES}, ${fileSize}]`);
    }
  }
  return header;
}

/** The size the guest sees: the size field rounded down to a whole sector, as qemu does. */
export function virtualSize(header: QcowHeader): number {
  return Math.floor(header.size / 512) * 512;
}
