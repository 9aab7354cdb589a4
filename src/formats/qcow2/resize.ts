/**
 * Resizing a qcow2 image (qemu-img resize), on a file the caller has opened
 * read-write under the image's write lock: nothing else reads or writes the
 * image meanwhile, so there is no lock here and the steps run one after the
 * other.
 *
 * Growing: when the L1 table has too few entries for the new size, a larger
 * one is written (in the clusters the table already has when they have room,
 * else at newly allocated clusters), flushed, the header pointed at it
 * (l1_size and l1_table_offset in one write), flushed, and only then the old
 * table's clusters are freed. Then the header's size.
 *
 * Shrinking (the caller checked --shrink): every reference past the new end
 * is found first (nothing is written if one is damaged), then unlinked on
 * disk and flushed before any refcount drops: the entries of the L2 table
 * that holds the new end (a table shared with a snapshot is copied first),
 * then the L1 entries of whole tables past it. Refcounts follow the qcow2
 * rule that every path from an L1 table counts: dropping an L2 table from the
 * active L1 table drops one reference of the table and one of each cluster it
 * names, shared with a snapshot or not. Then the header (size, l1_size), the
 * L1 table's clusters past its new length are freed, the freed clusters are
 * punched and the file is cut after its last cluster in use, as qemu does.
 * The cluster holding the new end keeps its bytes past the end; growing
 * zeroes them (the generic layer, src/block/open.ts).
 *
 * Refused by name: v2 images with internal snapshots (as qemu 7.2), v3
 * snapshots without a recorded disk size, images marked corrupt, encryption,
 * an external data file together with internal snapshots, bitmaps that
 * bitmap-resize.ts cannot resize (in use, unknown type). Persistent dirty
 * bitmaps are resized with the image (bitmap-resize.ts): before the header's
 * size when growing, after it when shrinking.
 *
 * External data file (qemu's qcow2_co_truncate): opened through the gate
 * (ResizeOptions.files); it takes the new size too, growing before the header
 * does and shrinking after the entries past the end are gone; its data
 * clusters carry no refcount in the image file, so dropping them frees
 * nothing there. With data_file_raw the grown area's clusters are mapped at
 * their guest offset, as qemu does, new L2 tables flushed before the L1
 * entries name them. With extended L2 entries
 * (16 bytes each) the entries past the new end lose their subcluster bitmaps
 * too, as qemu's full discard clears them. An
 * image left dirty (lazy refcounts) is repaired first (rebuildRefcounts, as a
 * read-write open does), with a notice.
 */
import { resolve } from 'node:path';
import createDebug from 'debug';
import { resolveBackingName } from '../../block/backing-name.js';
import { CorruptImageError, InvalidArgumentError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol, ResizeOptions } from '../../block/types.js';
import { rebuildRefcounts } from './check.js';
import { growBitmaps, loadBitmaps, shrinkBitmaps } from './bitmap-resize.js';
import { parseExtensions, type BitmapsExtension } from './extensions.js';
import { Geometry, L2E_COMPRESSED_HIGH, L2E_COPIED_HIGH, offsetBits, wordAt } from './geometry.js';
import {
  AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, KNOWN_INCOMPAT, MAX_L1_BYTES, parseHeader,
  type Qcow2Header,
} from './header.js';
import { MetadataClusters, readWords } from './metadata.js';
import { Refcounts } from './refcounts.js';
import { readSnapshots } from './snapshots.js';

const log = createDebug('imgmount:qcow2:resize');

/** Header fields written here (big-endian): size (u64), l1_size (u32) followed by l1_table_offset (u64). */
const SIZE_AT = 24;
const L1_SIZE_AT = 36;

/** A host range one L2 entry holds a reference to. */
interface Reference {
  offset: number;
  bytes: number;
}

export async function resizeQcow2(file: Protocol, newSize: number, options: ResizeOptions): Promise<void> {
  let header = await readHeader(file);
  const { dataFileName, bitmapsExtension } = await refuseUnsupported(file, header);
  if ((header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
    const { result } = await rebuildRefcounts(file);
    options.notice(
      `${file.path}: was not closed cleanly (dirty bit set, lazy refcounts); refcounts checked and repaired before resizing ` +
        `(${result.leaksFixed} leaked cluster(s), ${result.corruptionsFixed} corruption(s) fixed)`,
    );
    header = await readHeader(file);
    if (header.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) {
      throw new CorruptImageError(`${file.path}: its repair left problems; see imgmount check`);
    }
  }
  if (newSize % 512 !== 0) {
    throw new InvalidArgumentError(`${file.path}: the new size ${newSize} is not a multiple of 512, which qcow2 needs`);
  }
  const geometry = new Geometry(header);
  const newL1Size = geometry.l1EntriesFor(newSize);
  if (newL1Size * 8 > MAX_L1_BYTES) {
    const largest = (MAX_L1_BYTES / 8) * geometry.l2Span;
    throw new InvalidArgumentError(
      `${file.path}: the new size ${newSize} is larger than ${largest}, the most a qcow2 image with ${geometry.clusterSize}-byte clusters can address (a 32 MiB L1 table)`,
    );
  }
  // The metadata map only records where refcounts.ts moves the refcount table; nothing here reads it.
  const refcounts = await Refcounts.load(
    file,
    { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
    await file.size(),
    new MetadataClusters(header.clusterBits),
    false,
  );
  // Persistent dirty bitmaps (valid while the bitmaps autoclear bit is set) are resized too, as qemu does.
  const bitmaps = bitmapsExtension ? await loadBitmaps(file, geometry.clusterSize, bitmapsExtension, await file.size()) : [];
  const data = dataFileName === undefined ? undefined : await openDataFile(file, dataFileName, options);
  if (newSize > header.size) {
    await grow(file, header, geometry, refcounts, newSize, newL1Size, data, () => growBitmaps(file, refcounts, geometry.clusterSize, bitmaps, header.size, newSize));
  } else if (newSize < header.size) {
    await shrink(file, header, geometry, refcounts, newSize, newL1Size, data, () => shrinkBitmaps(file, refcounts, geometry.clusterSize, bitmaps, newSize));
  }
  log('%s: resized from %d to %d', file.path, header.size, newSize);
}

/** The external data file, and whether it is raw (data_file_raw: every cluster mapped at its guest offset). */
interface DataFile {
  file: Protocol;
  raw: boolean;
}

async function openDataFile(file: Protocol, name: string, options: ResizeOptions): Promise<DataFile> {
  if (!options.files) throw new UnsupportedFeatureError(`${file.path}: resizing it needs its external data file ${name}, which this caller cannot open`);
  if (resolve(resolveBackingName(file.path, name, 'external data file')) === resolve(file.path)) {
    throw new CorruptImageError(`${file.path}: the qcow2 image names itself as its external data file (${name})`);
  }
  const data = await options.files.open(name, 'external data file', { readOnly: false });
  const header = await readHeader(file);
  return { file: data, raw: (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n };
}

async function readHeader(file: Protocol): Promise<Qcow2Header> {
  const start = Buffer.alloc(4096);
  await file.read(0, start);
  return parseHeader(start, await file.size(), file.path);
}

/** What resizing does not handle, refused by name before anything is written; returns the data file's name and the bitmaps, if any. */
async function refuseUnsupported(file: Protocol, header: Qcow2Header): Promise<{ dataFileName: string | undefined; bitmapsExtension: BitmapsExtension | undefined }> {
  const refuse = (what: string): never => {
    throw new UnsupportedFeatureError(`${file.path}: resizing ${what} is not supported`);
  };
  const firstCluster = Buffer.alloc(header.clusterSize);
  await file.read(0, firstCluster);
  const extensions = parseExtensions(firstCluster, header, file.path);
  if (header.cryptMethod !== 0 || extensions.hasCrypto) refuse('encrypted qcow2 images');
  if (header.incompatibleFeatures & ~KNOWN_INCOMPAT) refuse('qcow2 images with unknown incompatible features');
  if (header.incompatibleFeatures & INCOMPAT_CORRUPT) {
    throw new CorruptImageError(`${file.path}: the qcow2 image is marked corrupt; repair it first (imgmount check -r all)`);
  }
  const hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (hasDataFile && extensions.dataFile === undefined) {
    throw new UnsupportedFeatureError(`${file.path}: the qcow2 image keeps its data in an external data file but does not name it`);
  }
  if (hasDataFile && header.nbSnapshots > 0) refuse('a qcow2 image with internal snapshots and an external data file (qemu never writes them together)');
  if (header.nbSnapshots > 0) {
    // As qemu 7.2: a v2 snapshot need not record its disk size, which then follows the image's.
    if (header.version === 2) throw new UnsupportedFeatureError(`${file.path}: Can't resize a v2 image which has snapshots`);
    const snapshots = await readSnapshots(file, header, await file.size());
    const unsized = snapshots.find((snapshot) => snapshot.diskSize === undefined);
    if (unsized) refuse(`a qcow2 image whose snapshot ${unsized.id} records no disk size`);
  }
  const bitmapsValid = extensions.bitmaps !== undefined && (header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  return { dataFileName: hasDataFile ? extensions.dataFile : undefined, bitmapsExtension: bitmapsValid ? extensions.bitmaps : undefined };
}

// --- growing ---

async function grow(
  file: Protocol, header: Qcow2Header, geometry: Geometry, refcounts: Refcounts, newSize: number, newL1Size: number, data: DataFile | undefined, resizeBitmaps: () => Promise<void>,
): Promise<void> {
  const { clusterSize } = geometry;
  let l1Offset = header.l1TableOffset;
  if (newL1Size > header.l1Size) {
    const oldBytes = header.l1Size * 8;
    const oldClusters = Math.ceil(oldBytes / clusterSize);
    if (header.l1Size > 0 && newL1Size * 8 <= oldClusters * clusterSize) {
      // The table's last cluster has room: its unused entries are zeroed before the header names them.
      await file.write(header.l1TableOffset + oldBytes, Buffer.alloc((newL1Size - header.l1Size) * 8));
      await file.flush();
      await writeL1Pointer(file, newL1Size, header.l1TableOffset);
    } else {
      const newClusters = Math.ceil((newL1Size * 8) / clusterSize);
      const table = Buffer.alloc(newClusters * clusterSize);
      if (oldBytes > 0) await file.read(header.l1TableOffset, table.subarray(0, oldBytes));
      const offset = await refcounts.allocate(newClusters);
      await file.write(offset, table);
      await refcounts.barrier();
      await file.flush();
      await writeL1Pointer(file, newL1Size, offset);
      l1Offset = offset;
      if (oldClusters > 0) await freeClusters(file, refcounts, header.l1TableOffset, oldClusters * clusterSize, clusterSize);
      log('%s: L1 table of %d entries moved to %d', file.path, newL1Size, offset);
    }
  }
  if (data) {
    // As qemu: the data file takes the new size (first, so no entry ever points past its end).
    await data.file.truncate(newSize);
    await data.file.flush();
    if (data.raw) await mapGrownClusters(file, geometry, refcounts, l1Offset, Math.max(header.l1Size, newL1Size), header.size, newSize);
  }
  // Bitmap tables large enough for the new size before the header says it.
  await resizeBitmaps();
  await writeSize(file, newSize);
}

/**
 * data_file_raw: the clusters of the grown area are mapped at their guest offset in the
 * data file, as qemu-img resize and create do (the L2 tables of the new area allocated,
 * written and flushed before the L1 entries point to them; extended L2 entries with an
 * empty bitmap, as create writes them).
 */
async function mapGrownClusters(file: Protocol, geometry: Geometry, refcounts: Refcounts, l1Offset: number, l1Size: number, oldSize: number, newSize: number): Promise<void> {
  const { clusterSize, l2Span, l2EntryBytes } = geometry;
  const l1 = await readWords(file, l1Offset, l1Size);
  const first = Math.ceil(oldSize / clusterSize) * clusterSize;
  for (let at = first; at < newSize; ) {
    const l1Index = geometry.l1Index(at);
    const end = Math.min(newSize, (l1Index + 1) * l2Span);
    const [high, low] = wordAt(l1, l1Index * 8);
    const existing = offsetBits(high, low);
    const table = existing !== 0 ? await readL2(file, geometry, existing) : Buffer.alloc(clusterSize);
    const from = geometry.l2Index(at);
    let to = from;
    for (let guest = at; guest < end; guest += clusterSize, to++) {
      // An entry already there (none should be: a shrink clears them) is kept.
      if (table.readBigUInt64BE(to * l2EntryBytes) === 0n) table.writeBigUInt64BE(BigInt(guest) | (1n << 63n), to * l2EntryBytes);
    }
    if (existing !== 0) {
      await file.write(existing + from * l2EntryBytes, table.subarray(from * l2EntryBytes, to * l2EntryBytes));
      await file.flush();
    } else {
      const offset = await refcounts.allocate(1);
      await file.write(offset, table);
      await refcounts.barrier();
      await file.flush();
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(BigInt(offset) | (1n << 63n), 0);
      await file.write(l1Offset + l1Index * 8, entry);
      await file.flush();
    }
    at = end;
  }
}

/** Points the header at an L1 table (l1_size and l1_table_offset in one write) and flushes. */
async function writeL1Pointer(file: Protocol, l1Size: number, l1TableOffset: number): Promise<void> {
  const fields = Buffer.alloc(12);
  fields.writeUInt32BE(l1Size, 0);
  fields.writeBigUInt64BE(BigInt(l1TableOffset), 4);
  await file.write(L1_SIZE_AT, fields);
  await file.flush();
}

async function writeSize(file: Protocol, size: number): Promise<void> {
  const field = Buffer.alloc(8);
  field.writeBigUInt64BE(BigInt(size), 0);
  await file.write(SIZE_AT, field);
  await file.flush();
}

/** Drops one reference of each cluster of the range and punches those that became free. */
async function freeClusters(file: Protocol, refcounts: Refcounts, offset: number, bytes: number, clusterSize: number): Promise<void> {
  await punchFreed(file, await refcounts.decrement(offset, bytes), clusterSize);
}

/** Punches the host range of freed clusters (in runs); the file end is cut separately. */
async function punchFreed(file: Protocol, clusters: number[], clusterSize: number): Promise<void> {
  if (!file.punchHole || clusters.length === 0) return;
  const sorted = [...clusters].sort((a, b) => a - b);
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1]! + 1) j++;
    await file.punchHole(sorted[i]! * clusterSize, (j - i) * clusterSize);
    i = j;
  }
}

// --- shrinking ---

async function shrink(
  file: Protocol, header: Qcow2Header, geometry: Geometry, refcounts: Refcounts, newSize: number, newL1Size: number, data: DataFile | undefined, resizeBitmaps: () => Promise<void>,
): Promise<void> {
  const { clusterSize, l2Span, l2Entries, l2EntryBytes } = geometry;
  const fileSize = await file.size();
  const l1 = await readWords(file, header.l1TableOffset, header.l1Size);
  const firstDropped = Math.ceil(newSize / clusterSize) * clusterSize;

  // 1. Find every reference past the new end before changing anything.
  const l2At = (l1Index: number): number => {
    if (l1Index >= header.l1Size) return 0;
    const [high, low] = wordAt(l1, l1Index * 8);
    const offset = offsetBits(high, low);
    if (offset !== 0 && (offset < 0 || offset % clusterSize !== 0 || offset + clusterSize > fileSize)) {
      throw new CorruptImageError(`${file.path}: L1 entry ${l1Index} points to ${offset}, which is not a cluster of the file; repair it first (imgmount check -r all)`);
    }
    return offset;
  };
  const partialIndex = newL1Size - 1;
  const partialFrom = firstDropped < newL1Size * l2Span ? geometry.l2Index(firstDropped) : l2Entries;
  const partialOffset = partialFrom < l2Entries ? l2At(partialIndex) : 0;
  let partial: { table: Buffer; references: Reference[]; owned: boolean } | undefined;
  if (partialOffset !== 0) {
    const table = await readL2(file, geometry, partialOffset);
    const references = referencesOf(file.path, geometry, table, partialFrom, fileSize);
    const changed = table.subarray(partialFrom * l2EntryBytes).some((byte) => byte !== 0);
    if (changed) partial = { table, references, owned: (l1.readUInt32BE(partialIndex * 8) & L2E_COPIED_HIGH) !== 0 };
  }
  const dropped: { offset: number; references: Reference[] }[] = [];
  for (let l1Index = newL1Size; l1Index < header.l1Size; l1Index++) {
    const offset = l2At(l1Index);
    if (offset === 0) continue;
    dropped.push({ offset, references: referencesOf(file.path, geometry, await readL2(file, geometry, offset), 0, fileSize) });
  }

  const freed: number[] = [];
  const release = async (offset: number, bytes: number): Promise<void> => {
    freed.push(...(await refcounts.decrement(offset, bytes)));
  };

  // 2. The table holding the new end: its entries past the end go (in a copy if a snapshot shares it).
  if (partial) {
    // With extended L2 entries the subcluster bitmaps go too (as qemu's full discard).
    partial.table.fill(0, partialFrom * l2EntryBytes);
    if (partial.owned) {
      await file.write(partialOffset + partialFrom * l2EntryBytes, partial.table.subarray(partialFrom * l2EntryBytes));
      await file.flush();
    } else {
      const copy = await refcounts.allocate(1);
      await file.write(copy, partial.table);
      await refcounts.barrier();
      await file.flush();
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(BigInt(copy), 0);
      entry.writeUInt32BE((entry.readUInt32BE(0) | L2E_COPIED_HIGH) >>> 0, 0);
      await file.write(header.l1TableOffset + partialIndex * 8, entry);
      await file.flush();
      await release(partialOffset, clusterSize);
      log('%s: L2 table %d shared with a snapshot: copied to %d before dropping its tail', file.path, partialIndex, copy);
    }
    for (const reference of partial.references) await release(reference.offset, reference.bytes);
  }

  // 3. Whole tables past the end: unlinked from the L1 table, then their references dropped.
  if (newL1Size < header.l1Size) {
    await file.write(header.l1TableOffset + newL1Size * 8, Buffer.alloc((header.l1Size - newL1Size) * 8));
    await file.flush();
  }
  for (const table of dropped) {
    await release(table.offset, clusterSize);
    for (const reference of table.references) await release(reference.offset, reference.bytes);
  }

  // 4. The header, then the L1 table's clusters past its new length.
  await writeSize(file, newSize);
  if (newL1Size < header.l1Size) {
    await writeL1Pointer(file, newL1Size, header.l1TableOffset);
    const keptClusters = Math.ceil((newL1Size * 8) / clusterSize);
    const oldClusters = Math.ceil((header.l1Size * 8) / clusterSize);
    if (oldClusters > keptClusters) await release(header.l1TableOffset + keptClusters * clusterSize, (oldClusters - keptClusters) * clusterSize);
  }
  await file.flush();
  // Bitmap tables shrink once the header says the new size (their freed clusters count for the cut below).
  await resizeBitmaps();
  // As qemu: the data file ends at the new size too (nothing names the bytes past it any more).
  if (data) {
    await data.file.truncate(newSize);
    await data.file.flush();
  }

  // 5. Freed clusters are punched; the file ends after its last cluster in use.
  const end = await lastUsedEnd(refcounts, Math.max(fileSize, refcounts.endOffset), clusterSize);
  await punchFreed(file, freed.filter((cluster) => (cluster + 1) * clusterSize <= end), clusterSize);
  const sizeNow = await file.size();
  if (end < sizeNow) {
    await file.truncate(end);
    log('%s: file cut from %d to %d bytes', file.path, sizeNow, end);
  }
  await file.flush();
}

/** The host ranges the L2 entries [from, end) of `table` hold references to, each checked to lie in the file. */
function referencesOf(path: string, geometry: Geometry, table: Buffer, from: number, fileSize: number): Reference[] {
  const references: Reference[] = [];
  const { clusterSize, l2EntryBytes } = geometry;
  for (let index = from; index < geometry.l2Entries; index++) {
    const [high, low] = wordAt(table, index * l2EntryBytes);
    if (high === 0 && low === 0) continue;
    let reference: Reference;
    if (high & L2E_COMPRESSED_HIGH) {
      if (geometry.hasDataFile) throw new CorruptImageError(`${path}: an L2 entry is compressed, which images with an external data file cannot be; repair it first (imgmount check -r all)`);
      const { hostOffset, length } = geometry.compressedExtent(high, low);
      reference = { offset: hostOffset - (hostOffset % 512), bytes: length + (hostOffset % 512) };
    } else {
      const offset = offsetBits(high, low);
      if (offset < 0 || offset % clusterSize !== 0) {
        throw new CorruptImageError(`${path}: an L2 entry points to ${offset}, which is not a cluster; repair it first (imgmount check -r all)`);
      }
      // A zero cluster without host space; with a data file, a data cluster (no refcount in the image file).
      if (offset === 0 || geometry.hasDataFile) continue;
      reference = { offset, bytes: clusterSize };
    }
    if (reference.offset + reference.bytes > Math.ceil(fileSize / clusterSize) * clusterSize) {
      throw new CorruptImageError(`${path}: an L2 entry points to ${reference.offset}, past the end of the file; repair it first (imgmount check -r all)`);
    }
    references.push(reference);
  }
  return references;
}

/** An L2 table (one cluster: 8-byte entries, or 16-byte ones with extended L2). */
function readL2(file: Protocol, geometry: Geometry, offset: number): Promise<Buffer> {
  return readWords(file, offset, geometry.clusterSize / 8);
}

/** Bytes up to the end of the last cluster whose refcount is not 0 (at most the file size rounded up to a cluster). */
async function lastUsedEnd(refcounts: Refcounts, fileSize: number, clusterSize: number): Promise<number> {
  for (let cluster = Math.ceil(fileSize / clusterSize) - 1; cluster >= 0; cluster--) {
    if ((await refcounts.get(cluster * clusterSize)) !== 0) return Math.min(fileSize, (cluster + 1) * clusterSize);
  }
  return 0;
}
