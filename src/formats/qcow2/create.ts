/**
 * Creating qcow2 images (`imgmount create -f qcow2`, `createImage(path, 'qcow2', ...)`):
 * the `-o` options validated with qemu-img 7.2's names, ranges and cross-option rules
 * (each refusal one line naming the option and what is allowed), then a layout computed
 * in closed form and written once, with nothing written for a bad request.
 *
 * Layout, in clusters, allocated in the order qemu-img allocates them (so while the
 * refcount table fits in one cluster the file is byte for byte qemu-img's):
 *
 *   0          header, header extensions (backing format, data file name, feature
 *              name table), backing file name
 *   1 .. R     refcount table
 *   R+1        first refcount block
 *   then       L1 table
 *   then       with preallocation (or data_file_raw): each L2 table followed by the
 *              data clusters it maps (the data clusters live in the external data
 *              file when there is one, mapped at their guest offset)
 *   anywhere   a further refcount block right after the first run of clusters that
 *              the blocks before it do not cover
 *
 * Every cluster of the layout is in use, so each refcount is 1. Preallocated clusters
 * are sparse (metadata), fallocated (falloc) or written with zeros (full). With
 * extended L2 entries a preallocated cluster has an empty subcluster bitmap, as qemu
 * writes it, so it reads from the backing file (or as zeros).
 *
 * Concurrency: the caller (createImage) holds the image's write lock when it
 * overwrites; nothing here is shared.
 */
import { open, rm, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import createDebug from 'debug';
import { resolveBackingName } from '../../block/backing-name.js';
import { hostIoError, InvalidArgumentError, UnsupportedFeatureError } from '../../block/errors.js';
import { pathExists } from '../../block/file.js';
import { parseSize } from '../../block/size.js';
import type { CreateOptions } from '../../block/types.js';
import { fallocate } from '../../native/index.js';
import { rejectUnknownOptions } from '../options.js';
import { EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_NAMES } from './extensions.js';
import {
  AUTOCLEAR_DATA_FILE_RAW, BUILTIN_FEATURE_NAMES, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
  INCOMPAT_EXTENDED_L2, MAX_BACKING_NAME_BYTES, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS,
  QCOW_MAGIC, V2_HEADER_BYTES, type CompressionType,
} from './header.js';
import { refcountsPerBlock, setRefcount } from './refcount-entries.js';

const log = createDebug('imgmount:qcow2:create');

export const CREATE_OPTIONS = [
  'compat', 'cluster_size', 'lazy_refcounts', 'refcount_bits', 'extended_l2', 'compression_type',
  'data_file', 'data_file_raw', 'preallocation',
] as const;

/** The header length qemu 7.2 writes for version 3 (with the compression type field). */
export const V3_CREATE_HEADER_BYTES = 112;
/** qemu writes the feature name table only into header clusters of at least this size. */
const FEATURE_TABLE_MIN_CLUSTER = 8192;
const DEFAULT_CLUSTER_SIZE = 65536;
/** Bit 63 of L1 and L2 entries: the refcount is exactly 1. */
const OFLAG_COPIED = 1n << 63n;

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** Create options as the driver receives them; `force` lets an existing external data file be overwritten. */
export interface Qcow2CreateOptions extends CreateOptions {
  force?: boolean;
}

/** Everything the options decide, validated. */
export interface Qcow2CreatePlan {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size, rounded up to 512 bytes as qemu does. */
  size: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: CompressionType;
  dataFile?: string;
  dataFileRaw: boolean;
  preallocation: Preallocation;
  backingFile?: string;
  backingFormat?: string;
}

/** qemu's boolean option values (qapi_bool_parse). */
function parseBool(name: string, text: string | undefined): boolean | undefined {
  if (text === undefined) return undefined;
  if (['on', 'yes', 'true', 'y'].includes(text)) return true;
  if (['off', 'no', 'false', 'n'].includes(text)) return false;
  throw new InvalidArgumentError(`${name} '${text}' is not a boolean: use on or off`);
}

/** An unsigned integer as qemu's strtou64 with base 0 reads it (decimal, 0x hex, 0 octal). */
function parseUnsigned(name: string, text: string): number {
  const value = /^0x[0-9a-f]+$/i.test(text) ? parseInt(text.slice(2), 16)
    : /^0[0-7]+$/.test(text) ? parseInt(text.slice(1), 8)
    : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value)) throw new InvalidArgumentError(`${name} '${text}' is not a number`);
  return value;
}

/** Validates the create options the way qemu-img 7.2 does and returns what to build. */
export function planCreate(options: CreateOptions): Qcow2CreatePlan {
  const given = options.options ?? {};
  const encryption = Object.keys(given).filter((key) => key === 'encryption' || key.startsWith('encrypt.'));
  if (encryption.length > 0) {
    throw new UnsupportedFeatureError(`encrypted qcow2 images cannot be created (${encryption.join(', ')})`);
  }
  rejectUnknownOptions('qcow2', given, CREATE_OPTIONS);

  const compat = given.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new InvalidArgumentError(`compat '${compat}' is not one of 0.10, v2, 1.1, v3`);
  const needsV3 = (what: string): void => {
    if (version !== 3) throw new InvalidArgumentError(`${what} needs compat=1.1 (or v3); compat=${compat} does not have it`);
  };

  const clusterSize = given.cluster_size !== undefined ? parseSize(given.cluster_size, 'cluster_size') : DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new InvalidArgumentError(`cluster_size ${given.cluster_size} is not a power of two from 512 to 2M`);
  }

  let refcountOrder = 4;
  if (given.refcount_bits !== undefined) {
    const bits = parseUnsigned('refcount_bits', given.refcount_bits);
    if (![1, 2, 4, 8, 16, 32, 64].includes(bits)) {
      throw new InvalidArgumentError(`refcount_bits ${given.refcount_bits} is not one of 1, 2, 4, 8, 16, 32, 64`);
    }
    if (bits !== 16 && version === 2) {
      throw new InvalidArgumentError(`refcount_bits=${bits} needs compat=1.1 (or v3); compat=${compat} allows only 16`);
    }
    refcountOrder = Math.log2(bits);
  }

  const lazyRefcounts = parseBool('lazy_refcounts', given.lazy_refcounts) ?? false;
  if (lazyRefcounts) needsV3('lazy_refcounts=on');

  const extendedL2 = parseBool('extended_l2', given.extended_l2) ?? false;
  if (extendedL2) {
    needsV3('extended_l2=on');
    if (clusterSize < 16384) throw new InvalidArgumentError(`extended_l2=on needs cluster_size of at least 16k (cluster_size is ${clusterSize})`);
  }

  const compressionType = given.compression_type ?? 'zlib';
  if (compressionType !== 'zlib' && compressionType !== 'zstd') {
    throw new InvalidArgumentError(`compression_type '${compressionType}' is not one of zlib, zstd`);
  }
  if (compressionType === 'zstd') needsV3('compression_type=zstd');

  const dataFile = given.data_file;
  if (dataFile !== undefined) {
    if (dataFile === '') throw new InvalidArgumentError('data_file is empty: name the external data file to create');
    needsV3('data_file');
  }
  const dataFileRaw = parseBool('data_file_raw', given.data_file_raw) ?? false;
  if (dataFileRaw && dataFile === undefined) throw new InvalidArgumentError('data_file_raw=on needs data_file');

  const preallocation = (given.preallocation ?? 'off') as Preallocation;
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) {
    throw new InvalidArgumentError(`preallocation '${preallocation}' is not one of off, metadata, falloc, full`);
  }

  if (options.backingFile !== undefined) {
    if (dataFileRaw) throw new InvalidArgumentError('a backing file cannot be used with data_file_raw=on');
    if (preallocation !== 'off' && !extendedL2) {
      throw new InvalidArgumentError(`preallocation=${preallocation} with a backing file needs extended_l2=on`);
    }
    const nameBytes = Buffer.byteLength(options.backingFile, 'utf8');
    if (nameBytes < 1 || nameBytes > MAX_BACKING_NAME_BYTES) {
      throw new InvalidArgumentError(`backing file name is ${nameBytes} bytes; it must be 1 to ${MAX_BACKING_NAME_BYTES}`);
    }
  } else if (options.backingFormat !== undefined) {
    throw new InvalidArgumentError('a backing format (-F) was given without a backing file (-b)');
  }

  if (!Number.isSafeInteger(options.size) || options.size < 0) {
    throw new InvalidArgumentError(`size ${options.size} is not a whole non-negative number of bytes`);
  }
  const size = Math.ceil(options.size / 512) * 512;
  const l2Span = (clusterSize / (extendedL2 ? 16 : 8)) * clusterSize;
  const maxSize = (MAX_L1_BYTES / 8) * l2Span;
  if (size > maxSize) {
    throw new InvalidArgumentError(`size ${options.size} is larger than ${maxSize}, the most cluster_size ${clusterSize}${extendedL2 ? ' with extended_l2' : ''} can address (use a larger cluster_size)`);
  }
  return {
    version, clusterBits, clusterSize, size, refcountOrder, lazyRefcounts, extendedL2, compressionType,
    dataFile, dataFileRaw, preallocation, backingFile: options.backingFile, backingFormat: options.backingFormat,
  };
}

/** Where everything goes, in clusters unless named in bytes. */
export interface Qcow2Layout {
  refcountTableClusters: number;
  /** Cluster indexes of the refcount blocks, in table order. */
  refcountBlockClusters: number[];
  l1Size: number;
  l1Cluster: number;
  /** Cluster of each L2 table (empty without preallocation). */
  l2Clusters: number[];
  /** First data cluster each L2 table maps, in the image file (empty with an external data file). */
  dataClusters: number[];
  /** Clusters in use: [0, totalClusters), each with refcount 1. */
  totalClusters: number;
  /** Length of the image file in bytes. */
  fileEnd: number;
  /** Guest clusters that get a host cluster (preallocation or data_file_raw). */
  preallocatedClusters: number;
}

/**
 * Computes the layout of a plan in closed form, allocating as qemu does: clusters in
 * order, and a refcount block, when a run of clusters is not covered yet, right after
 * that run (so it describes itself). The refcount table sits at cluster 1 and is made
 * as large as the blocks need (qemu would move a full one to the end instead).
 */
export function layoutFor(plan: Qcow2CreatePlan): Qcow2Layout {
  const { clusterSize, size } = plan;
  const l2Span = (clusterSize / (plan.extendedL2 ? 16 : 8)) * clusterSize;
  const l1Size = Math.ceil(size / l2Span);
  const l1Clusters = Math.ceil((l1Size * 8) / clusterSize);
  const preallocate = plan.preallocation !== 'off' || plan.dataFileRaw;
  const guestClusters = Math.ceil(size / clusterSize);
  const perBlock = refcountsPerBlock(clusterSize, plan.refcountOrder);
  for (let tableClusters = 1; ; ) {
    if (tableClusters * clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
      throw new InvalidArgumentError(`the image would need a refcount table of ${tableClusters * clusterSize} bytes, more than qemu's ${MAX_REFCOUNT_TABLE_BYTES} (use a larger cluster_size or refcount_bits)`);
    }
    let next = 1 + tableClusters;
    const blocks: number[] = [next++];
    let last: 'refcounts' | 'l1' | 'l2' | 'data' = 'refcounts';
    const cover = (): void => {
      while (blocks.length * perBlock < next) {
        blocks.push(next++);
        last = 'refcounts';
      }
    };
    cover();
    const l1Cluster = next;
    next += l1Clusters;
    if (l1Clusters > 0) last = 'l1';
    cover();
    const l2Clusters: number[] = [];
    const dataClusters: number[] = [];
    for (let table = 0; preallocate && table < l1Size; table++) {
      l2Clusters.push(next++);
      last = 'l2';
      cover();
      if (plan.dataFile === undefined) {
        dataClusters.push(next);
        next += Math.ceil(Math.min(l2Span, size - table * l2Span) / clusterSize);
        last = 'data';
        cover();
      }
    }
    const neededTable = Math.ceil((blocks.length * 8) / clusterSize);
    if (neededTable > tableClusters) {
      tableClusters = neededTable;
      continue;
    }
    let fileEnd = next * clusterSize;
    if (last === 'data') {
      // The last data cluster is cut at the last subcluster the virtual size reaches, as qemu does.
      const subcluster = plan.extendedL2 ? clusterSize / 32 : clusterSize;
      const tail = size - (guestClusters - 1) * clusterSize;
      fileEnd = (next - 1) * clusterSize + Math.ceil(tail / subcluster) * subcluster;
    } else if (last === 'l1') fileEnd = l1Cluster * clusterSize + l1Size * 8;
    return {
      refcountTableClusters: tableClusters, refcountBlockClusters: blocks, l1Size, l1Cluster, l2Clusters, dataClusters,
      totalClusters: next, fileEnd, preallocatedClusters: preallocate ? guestClusters : 0,
    };
  }
}

/** One header extension record: type, length, data padded to 8 bytes. */
function extension(type: number, data: Buffer): Buffer {
  const record = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  record.writeUInt32BE(type, 0);
  record.writeUInt32BE(data.length, 4);
  data.copy(record, 8);
  return record;
}

/** The feature name table qemu writes: every feature bit it knows, 48 bytes each. */
function featureNameTable(): Buffer {
  const kinds = ['incompatible', 'compatible', 'autoclear'] as const;
  const entries: Buffer[] = [];
  kinds.forEach((kind, type) => {
    for (const [bit, name] of Object.entries(BUILTIN_FEATURE_NAMES[kind])) {
      const entry = Buffer.alloc(48);
      entry[0] = type;
      entry[1] = Number(bit);
      entry.write(name, 2, 46, 'utf8');
      entries.push(entry);
    }
  });
  return Buffer.concat(entries);
}

/** The header cluster: header, extensions, end marker, backing file name. */
export function headerCluster(plan: Qcow2CreatePlan, layout: Qcow2Layout): Buffer {
  const { clusterSize } = plan;
  const headerLength = plan.version === 3 ? V3_CREATE_HEADER_BYTES : V2_HEADER_BYTES;
  const extensions: Buffer[] = [];
  if (plan.backingFormat !== undefined) extensions.push(extension(EXT_BACKING_FORMAT, Buffer.from(plan.backingFormat, 'utf8')));
  if (plan.dataFile !== undefined) extensions.push(extension(EXT_DATA_FILE, Buffer.from(plan.dataFile, 'utf8')));
  if (plan.version === 3 && clusterSize >= FEATURE_TABLE_MIN_CLUSTER) extensions.push(extension(EXT_FEATURE_NAMES, featureNameTable()));
  extensions.push(Buffer.alloc(8)); // end of extensions
  const backingName = Buffer.from(plan.backingFile ?? '', 'utf8');
  const extensionBytes = extensions.reduce((sum, record) => sum + record.length, 0);
  const backingOffset = headerLength + extensionBytes;
  if (backingOffset + backingName.length > clusterSize) {
    throw new InvalidArgumentError(`the header, its extensions and the backing file name (${backingOffset + backingName.length} bytes) do not fit in one cluster of ${clusterSize} bytes (use a larger cluster_size or shorter names)`);
  }
  const cluster = Buffer.alloc(clusterSize);
  QCOW_MAGIC.copy(cluster, 0);
  cluster.writeUInt32BE(plan.version, 4);
  if (backingName.length > 0) {
    cluster.writeBigUInt64BE(BigInt(backingOffset), 8);
    cluster.writeUInt32BE(backingName.length, 16);
    backingName.copy(cluster, backingOffset);
  }
  cluster.writeUInt32BE(plan.clusterBits, 20);
  cluster.writeBigUInt64BE(BigInt(plan.size), 24);
  cluster.writeUInt32BE(layout.l1Size, 36);
  cluster.writeBigUInt64BE(layout.l1Size > 0 ? BigInt(layout.l1Cluster * clusterSize) : 0n, 40);
  cluster.writeBigUInt64BE(BigInt(clusterSize), 48);
  cluster.writeUInt32BE(layout.refcountTableClusters, 56);
  if (plan.version === 3) {
    let incompatible = 0n;
    if (plan.dataFile !== undefined) incompatible |= INCOMPAT_DATA_FILE;
    if (plan.compressionType === 'zstd') incompatible |= INCOMPAT_COMPRESSION;
    if (plan.extendedL2) incompatible |= INCOMPAT_EXTENDED_L2;
    cluster.writeBigUInt64BE(incompatible, 72);
    cluster.writeBigUInt64BE(plan.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n, 80);
    cluster.writeBigUInt64BE(plan.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n, 88);
    cluster.writeUInt32BE(plan.refcountOrder, 96);
    cluster.writeUInt32BE(headerLength, 100);
    cluster[104] = plan.compressionType === 'zstd' ? 1 : 0;
  }
  let at = headerLength;
  for (const record of extensions) {
    record.copy(cluster, at);
    at += record.length;
  }
  return cluster;
}

/** Writes the whole of `buffer` at `position`. */
async function writeAt(handle: FileHandle, buffer: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const { bytesWritten } = await handle.write(buffer, done, buffer.length - done, position + done);
    done += bytesWritten;
  }
}

/** Allocates [offset, offset + length) (posix_fallocate: zeros written where the file system cannot allocate). */
async function allocate(handle: FileHandle, offset: number, length: number): Promise<void> {
  if (length <= 0) return;
  try {
    fallocate(handle.fd, 0, offset, length);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw error;
    await writeZeros(handle, offset, length);
  }
}

async function writeZeros(handle: FileHandle, offset: number, length: number): Promise<void> {
  const zeros = Buffer.alloc(Math.min(length, 1 << 20));
  for (let done = 0; done < length; done += zeros.length) {
    await writeAt(handle, zeros.subarray(0, Math.min(zeros.length, length - done)), offset + done);
  }
}

/** Byte ranges [offset, length] of the preallocated data clusters in the image file. */
function dataRuns(plan: Qcow2CreatePlan, layout: Qcow2Layout): Array<[number, number]> {
  const l2Span = (plan.clusterSize / (plan.extendedL2 ? 16 : 8)) * plan.clusterSize;
  return layout.dataClusters.map((first, table) => {
    const start = first * plan.clusterSize;
    const clusters = Math.ceil(Math.min(l2Span, plan.size - table * l2Span) / plan.clusterSize);
    return [start, Math.min(clusters * plan.clusterSize, layout.fileEnd - start)];
  });
}

/** Writes the metadata of `layout` into the opened, empty image file. */
async function writeMetadata(handle: FileHandle, plan: Qcow2CreatePlan, layout: Qcow2Layout): Promise<void> {
  const { clusterSize } = plan;
  await writeAt(handle, headerCluster(plan, layout), 0);
  const table = Buffer.alloc(layout.refcountTableClusters * clusterSize);
  layout.refcountBlockClusters.forEach((cluster, index) => table.writeBigUInt64BE(BigInt(cluster * clusterSize), index * 8));
  await writeAt(handle, table, clusterSize);
  const perBlock = refcountsPerBlock(clusterSize, plan.refcountOrder);
  for (let index = 0; index < layout.refcountBlockClusters.length; index++) {
    const block = Buffer.alloc(clusterSize);
    const used = Math.min(perBlock, layout.totalClusters - index * perBlock);
    for (let entry = 0; entry < used; entry++) setRefcount(block, entry, plan.refcountOrder, 1);
    await writeAt(handle, block, layout.refcountBlockClusters[index]! * clusterSize);
  }
  if (layout.l1Size === 0) return;
  const l1 = Buffer.alloc(layout.l1Size * 8);
  layout.l2Clusters.forEach((cluster, index) => l1.writeBigUInt64BE(BigInt(cluster * clusterSize) | OFLAG_COPIED, index * 8));
  await writeAt(handle, l1, layout.l1Cluster * clusterSize);
  const entryBytes = plan.extendedL2 ? 16 : 8;
  const entriesPerTable = clusterSize / entryBytes;
  let guestCluster = 0;
  for (const [table, l2] of layout.l2Clusters.entries()) {
    const l2Table = Buffer.alloc(clusterSize);
    // Data clusters follow their L2 table in the image file; in a data file they sit at their guest offset.
    const firstHost = plan.dataFile === undefined ? layout.dataClusters[table]! : guestCluster;
    for (let entry = 0; entry < entriesPerTable && guestCluster < layout.preallocatedClusters; entry++, guestCluster++) {
      l2Table.writeBigUInt64BE(BigInt((firstHost + entry) * clusterSize) | OFLAG_COPIED, entry * entryBytes);
    }
    await writeAt(handle, l2Table, l2 * clusterSize);
  }
}

/**
 * Creates (or, forced, truncates) the external data file: as long as the virtual size,
 * or as every cluster when its clusters are mapped (preallocation, data_file_raw), as
 * qemu sizes it; preallocated as asked.
 */
async function createDataFile(path: string, plan: Qcow2CreatePlan, layout: Qcow2Layout, force: boolean): Promise<void> {
  const length = layout.preallocatedClusters > 0 ? layout.preallocatedClusters * plan.clusterSize : plan.size;
  let handle: FileHandle;
  try {
    handle = await open(path, force ? 'w' : 'wx');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new InvalidArgumentError(`data_file ${path} already exists; pass --force to overwrite it`);
    }
    throw hostIoError('cannot create external data file', path, error);
  }
  try {
    await handle.truncate(length);
    if (plan.preallocation === 'falloc') await allocate(handle, 0, length);
    if (plan.preallocation === 'full') await writeZeros(handle, 0, length);
    await handle.datasync();
  } catch (error) {
    throw hostIoError('cannot write external data file', path, error);
  } finally {
    await handle.close();
  }
}

/** Creates a qcow2 image at `path` (the caller has refused to overwrite unless forced). */
export async function createQcow2(path: string, options: Qcow2CreateOptions): Promise<void> {
  const plan = planCreate(options);
  const layout = layoutFor(plan);
  headerCluster(plan, layout); // refuses names that do not fit before any file is touched
  let dataPath: string | undefined;
  if (plan.dataFile !== undefined) {
    dataPath = resolveBackingName(path, plan.dataFile, 'external data file');
    if (resolve(dataPath) === resolve(path)) throw new InvalidArgumentError(`data_file ${plan.dataFile} is the image file itself`);
    if (!options.force && (await pathExists(dataPath))) {
      throw new InvalidArgumentError(`data_file ${dataPath} already exists; pass --force to overwrite it`);
    }
  }
  log('%s: qcow2 v%d, %d-byte clusters, %d L1 entries, %d clusters, file %d bytes', path, plan.version, plan.clusterSize, layout.l1Size, layout.totalClusters, layout.fileEnd);
  if (dataPath !== undefined) await createDataFile(dataPath, plan, layout, options.force ?? false);
  try {
    const handle = await open(path, 'w');
    try {
      await writeMetadata(handle, plan, layout);
      await handle.truncate(layout.fileEnd);
      if (plan.dataFile === undefined && plan.preallocation !== 'off' && plan.preallocation !== 'metadata') {
        // falloc allocates the whole file, as qemu does; full writes zeros over the data clusters.
        if (plan.preallocation === 'falloc') await allocate(handle, 0, layout.fileEnd);
        else for (const [offset, length] of dataRuns(plan, layout)) await writeZeros(handle, offset, length);
      }
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    if (dataPath !== undefined && !options.force) await rm(dataPath, { force: true }).catch(() => undefined);
    throw hostIoError('cannot create', path, error);
  }
}
