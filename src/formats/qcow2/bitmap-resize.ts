/**
 * Resizing a qcow2 image's persistent dirty bitmaps with the image (resize.ts
 * calls it), as qemu-img resize does: qemu resizes its in-memory bitmaps
 * (the grown area clean, the bits past a new end dropped) and stores them
 * again. Here each bitmap's table is resized on disk: it gets the entries
 * the new size needs (ceil(ceil(size / granularity) / (cluster size * 8)));
 * the bits past the smaller of the two sizes are cleared in the data cluster
 * that holds that end, so a later growth finds that area clean.
 *
 * Order on disk (qemu-img check wants a table at least as large as the image
 * needs): growing, before the header's size: new entries zeroed in the
 * table's clusters when they fit, else a larger table written elsewhere and
 * flushed, then the directory entry (table offset and size, one 12-byte
 * write) flushed, then the old table's clusters freed; shrinking, after the
 * header's size: the directory entry's table size first (flushed), then the
 * data clusters of the dropped entries and the table's clusters past its new
 * length are freed. A crash leaves at most leaked clusters.
 *
 * Refused by name before anything is written (as qemu-img, which cannot use
 * them either): a bitmap marked in use (inconsistent), one of an unknown
 * type, a table or data cluster outside the file or unaligned, and an
 * "all ones" entry where a cluster's bits must change.
 *
 * Concurrency: none; resize.ts runs alone on the image (its write lock).
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { MAX_DIRECTORY_BYTES } from './bitmaps.js';
import type { BitmapsExtension } from './extensions.js';
import { offsetBits, wordAt } from './geometry.js';
import type { Refcounts } from './refcounts.js';

/** qemu's bound on a bitmap table (BME_MAX_TABLE_SIZE entries). */
const MAX_TABLE_ENTRIES = 0x8000000;
const FLAG_IN_USE = 1;
const TYPE_DIRTY_TRACKING = 1;
/** A bitmap table entry's "all ones" bit (with no data cluster). */
const ENTRY_ALL_ONES = 1;

interface Bitmap {
  name: string;
  /** Byte offset of its directory entry in the file. */
  entryAt: number;
  tableOffset: number;
  tableSize: number;
  granularityBits: number;
  table: Buffer;
}

/** Reads and validates every bitmap (refusing what cannot be resized) before anything is written. */
export async function loadBitmaps(file: Protocol, clusterSize: number, extension: BitmapsExtension, fileSize: number): Promise<Bitmap[]> {
  const corrupt = (message: string): never => {
    throw new CorruptImageError(`${file.path}: qcow2 bitmap directory: ${message}; repair it first (imgmount check -r all)`);
  };
  const { directoryOffset, directorySize, count } = extension;
  if (directorySize < 0 || directorySize > MAX_DIRECTORY_BYTES) corrupt(`size ${directorySize} is outside [0, ${MAX_DIRECTORY_BYTES}]`);
  if (directoryOffset <= 0 || directoryOffset % clusterSize !== 0 || directoryOffset + directorySize > fileSize) corrupt(`offset ${directoryOffset} (+${directorySize} bytes) is not inside the file`);
  const directory = Buffer.alloc(directorySize);
  await file.read(directoryOffset, directory);
  const bitmaps: Bitmap[] = [];
  let at = 0;
  for (let index = 0; index < count; index++) {
    if (at + 24 > directory.length) corrupt(`entry ${index} runs past the directory`);
    const tableOffset = offsetBits(...wordAt(directory, at));
    const tableSize = directory.readUInt32BE(at + 8);
    const flags = directory.readUInt32BE(at + 12);
    const type = directory[at + 16]!;
    const granularityBits = directory[at + 17]!;
    const nameSize = directory.readUInt16BE(at + 18);
    const extraSize = directory.readUInt32BE(at + 20);
    const nameStart = at + 24 + extraSize;
    if (nameStart + nameSize > directory.length) corrupt(`entry ${index} runs past the directory`);
    const name = directory.subarray(nameStart, nameStart + nameSize).toString('utf8');
    if (flags & FLAG_IN_USE) {
      throw new UnsupportedFeatureError(`${file.path}: resizing it is not supported while its bitmap '${name}' is marked in use (inconsistent); qemu-img refuses it too`);
    }
    if (type !== TYPE_DIRTY_TRACKING) throw new UnsupportedFeatureError(`${file.path}: bitmap '${name}' has type ${type}; only dirty tracking bitmaps (1) can be resized`);
    if (granularityBits < 9 || granularityBits > 31) corrupt(`bitmap '${name}' has granularity_bits ${granularityBits}, outside [9, 31]`);
    if (tableSize > MAX_TABLE_ENTRIES) corrupt(`bitmap '${name}' has a table of ${tableSize} entries, more than ${MAX_TABLE_ENTRIES}`);
    if (tableOffset <= 0 || tableOffset % clusterSize !== 0 || tableOffset + tableSize * 8 > fileSize) corrupt(`bitmap '${name}' has its table at ${tableOffset}, not a cluster of the file`);
    const table = Buffer.alloc(tableSize * 8);
    await file.read(tableOffset, table);
    for (let entry = 0; entry < tableSize; entry++) {
      const data = dataCluster(table, entry);
      if (data !== 0 && (data < 0 || data % clusterSize !== 0 || data + clusterSize > fileSize)) corrupt(`bitmap '${name}' entry ${entry} points to ${data}, not a cluster of the file`);
    }
    bitmaps.push({ name, entryAt: directoryOffset + at, tableOffset, tableSize, granularityBits, table });
    at = Math.ceil((nameStart + nameSize) / 8) * 8;
  }
  return bitmaps;
}

function dataCluster(table: Buffer, entry: number): number {
  const [high, low] = wordAt(table, entry * 8);
  return offsetBits(high, low & ~0x1ff);
}

function entriesFor(size: number, granularityBits: number, clusterSize: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / (clusterSize * 8));
}

/** Growing: every bitmap's table covers `newSize` (call before the header's size changes). */
export async function growBitmaps(file: Protocol, refcounts: Refcounts, clusterSize: number, bitmaps: Bitmap[], oldSize: number, newSize: number): Promise<void> {
  for (const bitmap of bitmaps) {
    await clearPastEnd(file, clusterSize, bitmap, oldSize);
    const entries = entriesFor(newSize, bitmap.granularityBits, clusterSize);
    if (entries <= bitmap.tableSize) continue;
    const oldClusters = Math.ceil((bitmap.tableSize * 8) / clusterSize);
    if (entries * 8 <= oldClusters * clusterSize) {
      await file.write(bitmap.tableOffset + bitmap.tableSize * 8, Buffer.alloc((entries - bitmap.tableSize) * 8));
      await file.flush();
      await writeTablePointer(file, bitmap.entryAt, bitmap.tableOffset, entries);
    } else {
      const clusters = Math.ceil((entries * 8) / clusterSize);
      const table = Buffer.alloc(clusters * clusterSize);
      bitmap.table.copy(table);
      const offset = await refcounts.allocate(clusters);
      await file.write(offset, table);
      await refcounts.barrier();
      await file.flush();
      await writeTablePointer(file, bitmap.entryAt, offset, entries);
      await refcounts.decrement(bitmap.tableOffset, oldClusters * clusterSize);
    }
  }
}

/** Shrinking: every bitmap's table loses the entries past `newSize` (call after the header's size changed). */
export async function shrinkBitmaps(file: Protocol, refcounts: Refcounts, clusterSize: number, bitmaps: Bitmap[], newSize: number): Promise<void> {
  for (const bitmap of bitmaps) {
    await clearPastEnd(file, clusterSize, bitmap, newSize);
    const entries = entriesFor(newSize, bitmap.granularityBits, clusterSize);
    if (entries >= bitmap.tableSize) continue;
    await writeTablePointer(file, bitmap.entryAt, bitmap.tableOffset, entries);
    for (let entry = entries; entry < bitmap.tableSize; entry++) {
      const data = dataCluster(bitmap.table, entry);
      if (data !== 0) await refcounts.decrement(data, clusterSize);
    }
    const kept = Math.ceil((entries * 8) / clusterSize);
    const old = Math.ceil((bitmap.tableSize * 8) / clusterSize);
    if (old > kept) await refcounts.decrement(bitmap.tableOffset + kept * clusterSize, (old - kept) * clusterSize);
  }
}

/** Clears the bits for guest bytes from `size` on in the data cluster holding that bit (the rest of the table is handled by its size). */
async function clearPastEnd(file: Protocol, clusterSize: number, bitmap: Bitmap, size: number): Promise<void> {
  const firstBit = Math.ceil(size / 2 ** bitmap.granularityBits);
  const bitsPerCluster = clusterSize * 8;
  const entry = Math.floor(firstBit / bitsPerCluster);
  const inCluster = firstBit % bitsPerCluster;
  if (inCluster === 0 || entry >= bitmap.tableSize) return;
  const data = dataCluster(bitmap.table, entry);
  if (data === 0) {
    if (bitmap.table.readUInt32BE(entry * 8 + 4) & ENTRY_ALL_ONES) {
      throw new UnsupportedFeatureError(`${file.path}: bitmap '${bitmap.name}' has an all-ones entry (${entry}) where its bits past the end would change; resizing it is not supported`);
    }
    return;
  }
  const cluster = Buffer.alloc(clusterSize);
  await file.read(data, cluster);
  // Bit i is bit (i % 8) of byte i / 8.
  const byte = Math.floor(inCluster / 8);
  const keep = (1 << (inCluster % 8)) - 1;
  const changed = (cluster[byte]! & ~keep) !== 0 || cluster.subarray(byte + 1).some((value) => value !== 0);
  if (!changed) return;
  cluster[byte] = cluster[byte]! & keep;
  cluster.fill(0, byte + 1);
  await file.write(data, cluster);
  await file.flush();
}

/** Points a directory entry at its table (bitmap_table_offset u64, bitmap_table_size u32: one write) and flushes. */
async function writeTablePointer(file: Protocol, entryAt: number, tableOffset: number, entries: number): Promise<void> {
  const fields = Buffer.alloc(12);
  fields.writeBigUInt64BE(BigInt(tableOffset), 0);
  fields.writeUInt32BE(entries, 8);
  await file.write(entryAt, fields);
  await file.flush();
}
