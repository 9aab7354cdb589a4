/**
 * The Parallels format extension (a cluster at ext_off, read on read-only
 * opens as qemu 7.2 does): magic, an MD5 of the rest of the cluster, then
 * feature records, of which qemu knows only the end marker and the dirty
 * bitmap. Everything is checked as qemu checks it, and a failure refuses the
 * open naming the problem, as in qemu. The dirty bitmaps themselves are then
 * ignored: they say which clusters changed since an incremental backup, not
 * what the guest reads, and qemu-img shows nothing of them either; their data
 * clusters are not read. Pure parsing of a buffer read by the caller.
 *
 * Layout (little-endian): extension header { magic u64, md5[16] }, then
 * features { magic u64, flags u64, data_size u32, unused u32, data } each
 * starting 8-aligned from the start of the cluster. A dirty bitmap's data:
 * { size u64 (sectors), id[16] (UUID), granularity u32 (sectors), l1_size u32,
 * l1 table of l1_size u64 entries }.
 */
import { createHash } from 'node:crypto';
import { CorruptImageError } from '../../block/errors.js';

export const EXTENSION_MAGIC = 0xab234cef23dcea87n;
export const END_OF_FEATURES_MAGIC = 0n;
export const DIRTY_BITMAP_MAGIC = 0x20385fae252cb34an;
const EXTENSION_HEADER_BYTES = 24;
const FEATURE_HEADER_BYTES = 24;
const BITMAP_HEADER_BYTES = 32;

export interface DirtyBitmapSummary {
  id: string;
  granularity: number;
  l1Size: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: parallels format extension: ${message}`);
}

function uuid(bytes: Buffer): string {
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Checks the extension cluster `cluster` (cluster_size bytes) of an image of
 * `totalSectors` sectors with clusters of `clusterSize` bytes; returns the
 * dirty bitmaps it holds.
 */
export function parseExtension(cluster: Buffer, totalSectors: number, clusterSize: number, path: string): DirtyBitmapSummary[] {
  if (cluster.length < EXTENSION_HEADER_BYTES) fail(path, `the ${cluster.length}-byte cluster is smaller than its ${EXTENSION_HEADER_BYTES}-byte header`);
  const magic = cluster.readBigUInt64LE(0);
  if (magic !== EXTENSION_MAGIC) fail(path, `magic 0x${magic.toString(16)} is not 0x${EXTENSION_MAGIC.toString(16)}`);
  const digest = createHash('md5').update(cluster.subarray(EXTENSION_HEADER_BYTES)).digest();
  if (!digest.equals(cluster.subarray(8, 24))) {
    fail(path, `checksum ${cluster.subarray(8, 24).toString('hex')} is not the MD5 of the cluster (${digest.toString('hex')}): the extension is corrupted`);
  }
  const bitmaps: DirtyBitmapSummary[] = [];
  let pos = EXTENSION_HEADER_BYTES;
  for (;;) {
    const remaining = cluster.length - pos;
    if (remaining < FEATURE_HEADER_BYTES) fail(path, `${remaining} bytes left at offset ${pos}, fewer than a ${FEATURE_HEADER_BYTES}-byte feature header (no end-of-features record)`);
    const featureMagic = cluster.readBigUInt64LE(pos);
    const flags = cluster.readBigUInt64LE(pos + 8);
    const dataSize = cluster.readUInt32LE(pos + 16);
    pos += FEATURE_HEADER_BYTES;
    if (flags !== 0n) fail(path, `feature 0x${featureMagic.toString(16)} has flags 0x${flags.toString(16)}; no flags are supported`);
    if (dataSize > cluster.length - pos) fail(path, `feature 0x${featureMagic.toString(16)} data_size ${dataSize} is not in [0, ${cluster.length - pos}] (the rest of the cluster)`);
    if (featureMagic === END_OF_FEATURES_MAGIC) return bitmaps;
    if (featureMagic !== DIRTY_BITMAP_MAGIC) fail(path, `unknown feature 0x${featureMagic.toString(16)}`);
    bitmaps.push(parseBitmap(cluster.subarray(pos, pos + dataSize), totalSectors, clusterSize, path));
    pos = Math.ceil((pos + dataSize) / 8) * 8;
  }
}

function parseBitmap(data: Buffer, totalSectors: number, clusterSize: number, path: string): DirtyBitmapSummary {
  if (data.length < BITMAP_HEADER_BYTES) fail(path, `dirty bitmap data_size ${data.length} is smaller than its ${BITMAP_HEADER_BYTES}-byte header`);
  const size = data.readBigUInt64LE(0);
  const id = uuid(data.subarray(8, 24));
  const granularitySectors = data.readUInt32LE(24);
  const l1Size = data.readUInt32LE(28);
  if (size !== BigInt(totalSectors)) fail(path, `dirty bitmap ${id} size ${size} (sectors) is not the disk size ${totalSectors}`);
  if (l1Size * 8 > data.length - BITMAP_HEADER_BYTES) fail(path, `dirty bitmap ${id} l1_size ${l1Size} is not in [0, ${Math.floor((data.length - BITMAP_HEADER_BYTES) / 8)}] (its data_size)`);
  const granularity = granularitySectors * 512;
  if (granularitySectors === 0 || (granularitySectors & (granularitySectors - 1)) !== 0 || granularity > 2 ** 31) {
    fail(path, `dirty bitmap ${id} granularity ${granularitySectors} (sectors) is not a power of two in [1, 2^22]`);
  }
  // qemu's serialization: one bit per granule, in 64-bit words, spread over clusters.
  const bytes = totalSectors === 0 ? 0 : 8 * Math.ceil((totalSectors * 512) / granularity / 64);
  const expected = Math.ceil(bytes / clusterSize);
  if (l1Size !== expected) fail(path, `dirty bitmap ${id} l1_size ${l1Size} does not match its size and granularity (expected ${expected})`);
  return { id, granularity, l1Size };
}
