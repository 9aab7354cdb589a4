/**
 * qcow2 check, part 1: counting the references every host cluster has, from
 * the header cluster down (the header, the active L1 table and every
 * snapshot's, their L2 tables, standard and compressed data clusters, the
 * snapshot table, the refcount table and its blocks, a LUKS header, the
 * bitmap directory, bitmap tables and their data clusters). The counts live in
 * a typed array of the image's refcount width (a count that reaches the
 * width's maximum is an overflow, as in the image itself).
 *
 * What qemu-img check reports while counting is reported the same way here,
 * with the same words and the same corruption counts (test/qcow2-check.test.ts
 * compares both on damaged images). With `fixErrors`, entries that cannot be
 * valid are dropped: unaligned preallocated (zero) clusters become plain zero
 * entries, as qemu does, and (beyond qemu 7.2, which leaves them) L1 and L2
 * entries pointing past the end of the file are dropped, a standard cluster
 * becoming a zero cluster (what qemu reads there) where the version allows.
 * Fixed entries are written together, then flushed, after each batch of L2
 * tables (before the next batch is read) and at the end of each L1 table,
 * so before any refcount is repaired (a write and an fdatasync per entry made
 * a damaged L1 table with thousands of bad entries take minutes).
 *
 * While counting, the OFLAG_COPIED bits of the active tables' entries are
 * recorded (copied-record.ts), so the OFLAG_COPIED pass need not read every
 * L2 table again when they all agree with the refcounts.
 *
 * Concurrency: one scan at a time on an image nobody else writes; reads of
 * L2 tables are issued in parallel batches (into one buffer per batch, used
 * again by the next batch), processed in L1 order.
 */
import { endianness } from 'node:os';
import type { CheckResult, Protocol } from '../../block/types.js';
import type { Geometry } from './geometry.js';
import type { Qcow2Header } from './header.js';
import { maxRefcount } from './refcount-entries.js';
import { nextNonZeroEntry, nextNonZeroIn, readableWords } from '../../block/table-scan.js';
import { CopiedRecord } from './copied-record.js';

/** qemu's limits on an L1 table (32 MiB) and on the snapshot table. */
const MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;
/**
 * L2 tables read per batch (at most that many, and at most that many bytes: a
 * smaller buffer used again stays in the CPU's caches and is not faulted in anew;
 * 64 tables of 64 KiB still keep the thread pool busy when they must come from
 * the disk; never fewer than 16), and bytes per coalesced read.
 */
const L2_BATCH = 256;
const L2_BATCH_BYTES = 4 * 1024 * 1024;
const L2_BATCH_MIN = 16;
const MAX_READ_BYTES = 4 * 1024 * 1024;

export const hex = (value: number): string => value.toString(16);
/** A 64-bit entry as qemu prints it with PRIx64. */
export const hex64 = (high: number, low: number): string =>
  high === 0 ? (low >>> 0).toString(16) : (high >>> 0).toString(16) + (low >>> 0).toString(16).padStart(8, '0');

/** Counts per host cluster, in the image's refcount width; grows on demand. */
export class RefcountArray {
  readonly max: number;
  private counts: Uint8Array | Uint16Array | Uint32Array | Float64Array;
  /** Clusters covered (qemu's nb_clusters): the file's, plus any referenced just past it. */
  length: number;

  constructor(readonly refcountOrder: number, clusters: number) {
    this.max = maxRefcount(refcountOrder);
    this.counts = RefcountArray.allocate(refcountOrder, clusters);
    this.length = clusters;
  }

  private static allocate(order: number, size: number): Uint8Array | Uint16Array | Uint32Array | Float64Array {
    if (order <= 3) return new Uint8Array(size);
    if (order === 4) return new Uint16Array(size);
    if (order === 5) return new Uint32Array(size);
    return new Float64Array(size);
  }

  get(cluster: number): number {
    return cluster < this.length ? this.counts[cluster]! : 0;
  }

  /** The 16-bit counts (refcount_order 4) in host byte order, until the array next grows; undefined for other widths. */
  counts16(): Uint16Array | undefined {
    return this.counts instanceof Uint16Array ? this.counts : undefined;
  }

  /** One more reference to `cluster` (below `length`); false, changing nothing, when its count is at the width's maximum. */
  addOne(cluster: number): boolean {
    const count = this.counts[cluster]!;
    if (count === this.max) return false;
    this.counts[cluster] = count + 1;
    return true;
  }

  set(cluster: number, value: number): void {
    this.grow(cluster + 1);
    this.counts[cluster] = value;
  }

  grow(length: number): void {
    if (length <= this.length) return;
    if (length > this.counts.length) {
      const bigger = RefcountArray.allocate(this.refcountOrder, Math.max(length, Math.ceil(this.counts.length * 1.5)));
      bigger.set(this.counts as never);
      this.counts = bigger;
    }
    this.length = length;
  }

  clear(): void {
    this.counts.fill(0);
  }
}

/** A snapshot as the check needs it (read tolerantly: a broken entry is reported, not refused). */
export interface CheckSnapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
}

/** Everything the counting walks, and where its findings go. */
export interface CheckContext {
  file: Protocol;
  header: Qcow2Header;
  geometry: Geometry;
  /** Current size of the file (grows when a refcount block outside it is repaired). */
  fileSize: number;
  snapshots: CheckSnapshot[];
  /** Bytes of the snapshot table (entries padded to 8). */
  snapshotsSize: number;
  /** The refcount table, as read (and rewritten by a rebuild). */
  refcountTable: Buffer;
  /** Extra ranges to count once: the LUKS header, the bitmap directory. */
  luks?: { offset: number; length: number };
  bitmaps?: { directoryOffset: number; directorySize: number; tables: { offset: number; entries: number }[] };
  messages: string[];
  checkErrors: number;
  /** Fixed entries not written yet: the changed byte range of each table buffer (see flushFixes). */
  pendingFixes?: Map<Buffer, { offset: number; start: number; end: number }>;
  progress?: (done: number, total: number) => void;
}

export interface Counting {
  refs: RefcountArray;
  /** The refcount structure must be rebuilt to repair what was found. */
  rebuild: boolean;
  /** Allocated / fragmented / compressed clusters of the active L1 table (qemu's bfi). */
  allocated: number;
  fragmented: number;
  compressed: number;
  /** The OFLAG_COPIED bits of the active L1 and L2 entries counted. */
  copied: CopiedRecord;
}

interface Fix {
  errors: boolean;
}

/** A buffer that successive batches of tables are read into (a batch's tables are done with before the next is read). */
export interface TableScratch {
  buffer?: Buffer;
}

/** Counts one reference to every cluster of [offset, offset + size), as qemu-img check does. */
function countRange(ctx: CheckContext, res: CheckResult, refs: RefcountArray, offset: number, size: number): void {
  if (size <= 0) return;
  const { clusterSize, clusterBits } = ctx.header;
  // The last cluster may be partly written, so a range may end up to a cluster past the file.
  if (offset < 0 || offset + size - ctx.fileSize >= clusterSize) {
    ctx.messages.push(
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(Math.max(offset, 0))} size 0x${hex(size)}`,
    );
    res.corruptions += 1;
    return;
  }
  const first = Math.floor(offset / clusterSize);
  const last = Math.floor((offset + size - 1) / 2 ** clusterBits);
  refs.grow(last + 1);
  for (let cluster = first; cluster <= last; cluster++) {
    if (refs.addOne(cluster)) continue;
    ctx.messages.push(`ERROR: overflow cluster offset=0x${hex(cluster * clusterSize)}`);
    ctx.messages.push(
      'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
    );
    res.corruptions += 1;
  }
}

/**
 * Reads the tables at `offsets` (each `bytes` long), coalescing adjacent ones into one read,
 * all into one buffer: `scratch`'s (taken over, or replaced when too small) when given, whose
 * previous tables must be done with.
 */
export async function readTables(file: Protocol, offsets: readonly number[], bytes: number, scratch?: TableScratch): Promise<Map<number, Buffer>> {
  const sorted = [...new Set(offsets)].sort((a, b) => a - b);
  const tables = new Map<number, Buffer>();
  const runs: { start: number; count: number }[] = [];
  for (const offset of sorted) {
    const run = runs[runs.length - 1];
    if (run && run.start + run.count * bytes === offset && (run.count + 1) * bytes <= MAX_READ_BYTES) run.count += 1;
    else runs.push({ start: offset, count: 1 });
  }
  const total = sorted.length * bytes;
  let pool = scratch?.buffer;
  if (!pool || pool.length < total) {
    // Every byte is read into (a read fills what lies past the end of the file with zeros).
    pool = Buffer.allocUnsafeSlow(total);
    if (scratch) scratch.buffer = pool;
  }
  let used = 0;
  const reads: Promise<void>[] = [];
  for (const { start, count } of runs) {
    const buffer = pool.subarray(used, used + count * bytes);
    used += count * bytes;
    for (let index = 0; index < count; index++) tables.set(start + index * bytes, buffer.subarray(index * bytes, (index + 1) * bytes));
    reads.push(file.read(start, buffer));
  }
  await Promise.all(reads);
  return tables;
}

/**
 * Marks `length` bytes of `table` at `at` (inside the table at `tableOffset`) as fixed;
 * `flushFixes` writes every fixed range and makes it durable.
 */
function writeEntry(ctx: CheckContext, tableOffset: number, table: Buffer, at: number, length: number): void {
  ctx.pendingFixes ??= new Map();
  const pending = ctx.pendingFixes.get(table);
  if (pending) {
    pending.start = Math.min(pending.start, at);
    pending.end = Math.max(pending.end, at + length);
  } else {
    ctx.pendingFixes.set(table, { offset: tableOffset, start: at, end: at + length });
  }
}

/** Writes the fixed ranges of every table and makes them durable (one fdatasync). */
async function flushFixes(ctx: CheckContext): Promise<void> {
  if (!ctx.pendingFixes || ctx.pendingFixes.size === 0) return;
  for (const [table, { offset, start, end }] of ctx.pendingFixes) await ctx.file.write(offset + start, table.subarray(start, end));
  ctx.pendingFixes.clear();
  await ctx.file.flush();
}

/**
 * Walks one L1 table and its L2 tables. `active`: the L1 table in use, whose
 * clusters give the allocation figures.
 */
async function countL1(
  ctx: CheckContext, res: CheckResult, refs: RefcountArray, counting: Counting,
  l1Offset: number, l1Size: number, active: boolean, fix: Fix,
): Promise<void> {
  if (l1Size === 0) return;
  const { clusterSize } = ctx.header;
  countRange(ctx, res, refs, l1Offset, l1Size * 8);
  const l1 = Buffer.alloc(l1Size * 8);
  await ctx.file.read(l1Offset, l1);
  const used: number[] = [];
  for (let index = nextNonZeroEntry(l1, 0, l1Size); index < l1Size; index = nextNonZeroEntry(l1, index + 1, l1Size)) used.push(index);
  const l2Bytes = clusterSize;
  const scratch: TableScratch = {};
  const perBatch = Math.max(L2_BATCH_MIN, Math.min(L2_BATCH, Math.floor(L2_BATCH_BYTES / clusterSize)));
  for (let batch = 0; batch < used.length; batch += perBatch) {
    const indexes = used.slice(batch, batch + perBatch);
    const offsets: number[] = [];
    for (const index of indexes) {
      const high = l1.readUInt32BE(index * 8);
      const low = l1.readUInt32BE(index * 8 + 4);
      const offset = (high & 0x00ffffff) * 0x100000000 + ((low & 0xfffffe00) >>> 0);
      if (offset < ctx.fileSize) offsets.push(offset);
    }
    const tables = await readTables(ctx.file, offsets, l2Bytes, scratch);
    for (let position = 0; position < indexes.length; position++) {
      const index = indexes[position]!;
      if (active) ctx.progress?.(batch + position, used.length);
      const high = l1.readUInt32BE(index * 8);
      const low = l1.readUInt32BE(index * 8 + 4);
      if (high & 0x7f000000 || low & 0x1ff) {
        ctx.messages.push(`ERROR found L1 entry with reserved bits set: ${hex64(high, low)}`);
        res.corruptions += 1;
      }
      const l2Offset = (high & 0x00ffffff) * 0x100000000 + ((low & 0xfffffe00) >>> 0);
      if (fix.errors && l2Offset >= ctx.fileSize) {
        // Reads of such a table give zeros in qemu: the entry is dropped (the range becomes unallocated).
        ctx.messages.push(`Repairing l2_offset=${hex(l2Offset)}: L2 table lies outside the file; L1 entry ${index} dropped`);
        l1.fill(0, index * 8, index * 8 + 8);
        writeEntry(ctx, l1Offset, l1, index * 8, 8);
        res.corruptionsFixed += 1;
        continue;
      }
      countRange(ctx, res, refs, l2Offset, clusterSize);
      if (active && l2Offset !== 0) counting.copied.note(Math.floor(l2Offset / clusterSize), (high & 0x80000000) !== 0);
      if (l2Offset % clusterSize !== 0) {
        ctx.messages.push(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        res.corruptions += 1;
      }
      // A table past the end of the file reads as zeros: it references nothing (no zero-filled copy per entry).
      const l2 = tables.get(l2Offset);
      // (The OFLAG_COPIED pass looks at no table whose L1 entry has offset 0.)
      if (l2) await countL2(ctx, res, refs, counting, l2Offset, l2, active, fix, active && l2Offset !== 0 ? counting.copied : undefined);
    }
    await flushFixes(ctx);
  }
  await flushFixes(ctx);
  if (active) ctx.progress?.(used.length, used.length);
}

async function countL2(
  ctx: CheckContext, res: CheckResult, refs: RefcountArray, counting: Counting,
  l2Offset: number, l2: Buffer, active: boolean, fix: Fix, copied: CopiedRecord | undefined,
): Promise<void> {
  const { geometry, header } = ctx;
  const { clusterSize } = header;
  const extended = geometry.extendedL2;
  const entryBytes = geometry.l2EntryBytes;
  const dataFile = geometry.hasDataFile;
  const walk: L2Walk = { nextContiguous: 0 };
  // Most entries of a sparse image are zero: skipped on the raw words, without decoding.
  const entries = geometry.l2Entries;
  // Big-endian words read through a host-order view, byte-swapped (cheaper than readUInt32BE).
  const words = readableWords(l2);
  const wordsPerEntry = entryBytes / 4;
  const plain = !extended && !dataFile;
  for (let index = nextL2Entry(l2, words, 0, entries, extended); index < entries; index = nextL2Entry(l2, words, index + 1, entries, extended)) {
    if (plain) {
      index = countPlainEntries(ctx, refs, counting, l2, words, index, entries, active, copied, walk);
      if (index >= entries) break;
    }
    const at = index * entryBytes;
    let high = be32(words[index * wordsPerEntry]!);
    const low = be32(words[index * wordsPerEntry + 1]!);
    const zeroBits = extended ? l2.readUInt32BE(at + 8) : 0;
    const allocBits = extended ? l2.readUInt32BE(at + 12) : 0;
    if (high === 0 && low === 0 && zeroBits === 0 && allocBits === 0) continue;
    const compressed = (high & 0x40000000) !== 0;
    if (!compressed && (high & 0x3f000000 || low & 0x1fe)) {
      ctx.messages.push(`ERROR found l2 entry with reserved bits set: ${hex64(high, low)}`);
      res.corruptions += 1;
    }
    if (compressed) {
      if (high & 0x80000000) {
        const { hostOffset } = geometry.compressedExtent(high & 0x7fffffff, low);
        ctx.messages.push(`ERROR: coffset=0x${hex(hostOffset)}: copied flag must never be set for compressed clusters`);
        high &= 0x7fffffff;
        res.corruptions += 1;
      }
      if (dataFile) {
        ctx.messages.push(`ERROR compressed cluster ${index} with data file, entry=0x${hex64(high, low)}`);
        res.corruptions += 1;
        continue;
      }
      if (zeroBits !== 0 || allocBits !== 0) {
        ctx.messages.push(`ERROR compressed cluster ${index} with non-zero subcluster allocation bitmap, entry=0x${hex64(high, low)}`);
        res.corruptions += 1;
        continue;
      }
      const { hostOffset, length } = geometry.compressedExtent(high, low);
      if (fix.errors && hostOffset >= ctx.fileSize) {
        await dropEntry(ctx, res, l2Offset, l2, index, `Repairing coffset=0x${hex(hostOffset)}: compressed cluster lies outside the file; L2 entry dropped`);
        continue;
      }
      countRange(ctx, res, refs, hostOffset, length);
      if (active) {
        counting.allocated += 1;
        counting.compressed += 1;
        counting.fragmented += 1;
      }
      continue;
    }
    const offset = (high & 0x00ffffff) * 0x100000000 + ((low & 0xfffffe00) >>> 0);
    const zeroFlag = !extended && (low & 1) !== 0;
    const allocated = offset !== 0 || (dataFile && (high & 0x80000000) !== 0);
    if (!allocated) {
      // Plain zero, or unallocated.
      if (!zeroFlag && allocBits !== 0) {
        ctx.messages.push('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        res.corruptions += 1;
      }
      continue;
    }
    if ((zeroBits & allocBits) !== 0) {
      ctx.messages.push(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      res.corruptions += 1;
    }
    if (offset % clusterSize !== 0) {
      res.corruptions += 1;
      const containsData = extended ? allocBits !== 0 : !zeroFlag;
      if (!containsData) {
        ctx.messages.push(`${fix.errors ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
        if (fix.errors) {
          res.corruptions -= 1;
          await dropEntry(ctx, res, l2Offset, l2, index, undefined);
          continue;
        }
      } else {
        ctx.messages.push(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
      }
    }
    if (fix.errors && !dataFile && offset >= ctx.fileSize) {
      await dropEntry(ctx, res, l2Offset, l2, index, `Repairing offset=${hex(offset)}: data cluster lies outside the file; L2 entry dropped (the guest reads zeros there, as before)`);
      continue;
    }
    if (active) {
      counting.allocated += 1;
      if (walk.nextContiguous !== 0 && offset !== walk.nextContiguous) counting.fragmented += 1;
      walk.nextContiguous = offset + clusterSize;
    }
    if (copied) {
      // With a data file every data cluster counts as refcount 1: only an entry without the flag needs the pass.
      if (!dataFile) copied.note(Math.floor(offset / clusterSize), (high & 0x80000000) !== 0);
      else if ((high & 0x80000000) === 0) copied.needsFullPass = true;
    }
    if (!dataFile) countRange(ctx, res, refs, offset, clusterSize);
  }
}

/** Where the walk of one L2 table is, for both countL2 and countPlainEntries. */
interface L2Walk {
  /** The host offset of a data cluster that follows the last one counted (0: none counted yet). */
  nextContiguous: number;
}

/** The value of a big-endian 32-bit word read through a host-order view (byte-swapped on a little-endian host). */
const be32: (word: number) => number = endianness() === 'LE'
  ? (word) => ((word << 24) | ((word & 0xff00) << 8) | ((word >>> 8) & 0xff00) | (word >>> 24)) >>> 0
  : (word) => word >>> 0;

/**
 * Counts the plain entries of a standard L2 table (8-byte entries, no data file) from
 * `from` on, in a loop small enough to be optimized at once: allocated, not compressed,
 * no reserved or zero bit, cluster-aligned, inside the file, with a count below the
 * maximum. Such an entry is counted just as countL2 counts it, with nothing to report.
 * Returns the first entry that is not plain, for countL2 to take, or `entries`.
 */
function countPlainEntries(
  ctx: CheckContext, refs: RefcountArray, counting: Counting, l2: Buffer, words: Uint32Array,
  from: number, entries: number, active: boolean, copied: CopiedRecord | undefined, walk: L2Walk,
): number {
  const { clusterSize } = ctx.header;
  const { fileSize } = ctx;
  for (let index = nextNonZeroIn(l2, words, from, entries); index < entries; index = nextNonZeroIn(l2, words, index + 1, entries)) {
    const high = be32(words[index * 2]!);
    const low = be32(words[index * 2 + 1]!);
    if ((high & 0x7f000000) !== 0 || (low & 0x1ff) !== 0) return index;
    const offset = (high & 0x00ffffff) * 0x100000000 + low;
    if (offset === 0 || offset % clusterSize !== 0 || offset >= fileSize) return index;
    const cluster = offset / clusterSize;
    refs.grow(cluster + 1);
    if (!refs.addOne(cluster)) return index;
    if (active) {
      counting.allocated += 1;
      if (walk.nextContiguous !== 0 && offset !== walk.nextContiguous) counting.fragmented += 1;
      walk.nextContiguous = offset + clusterSize;
    }
    copied?.note(cluster, (high & 0x80000000) !== 0);
  }
  return entries;
}

/** The first L2 entry at or after `from` that is not all zeros (`entries` when none is); `words`: `tableWords(l2)`. */
export function nextL2Entry(l2: Buffer, words: Uint32Array | undefined, from: number, entries: number, extended: boolean): number {
  if (!extended) return nextNonZeroIn(l2, words, from, entries);
  // A 16-byte entry is two 64-bit words.
  return Math.floor(nextNonZeroIn(l2, words, from * 2, entries * 2) / 2);
}

/**
 * Makes L2 entry `index` read as zeros with no host cluster (a zero entry on
 * version 3, with every allocated subcluster made a zero one; unallocated on
 * version 2) and writes it durably: one more corruption fixed. Counts in
 * `res` follow qemu's convention here: `corruptions` are those left.
 */
async function dropEntry(ctx: CheckContext, res: CheckResult, l2Offset: number, l2: Buffer, index: number, message: string | undefined): Promise<void> {
  const { geometry, header } = ctx;
  const at = index * geometry.l2EntryBytes;
  if (message !== undefined) ctx.messages.push(message);
  if (geometry.extendedL2) {
    const zeroBits = l2.readUInt32BE(at + 8);
    const allocBits = l2.readUInt32BE(at + 12);
    l2.fill(0, at, at + 8);
    l2.writeUInt32BE((zeroBits | allocBits) >>> 0, at + 8);
    l2.writeUInt32BE(0, at + 12);
  } else {
    l2.fill(0, at, at + 8);
    if (header.version === 3) l2.writeUInt32BE(1, at + 4);
  }
  writeEntry(ctx, l2Offset, l2, at, geometry.l2EntryBytes);
  res.corruptionsFixed += 1;
}

/** qemu's calculate_refcounts: every reference from the header down, then the refcount blocks' own checks. */
export async function countReferences(ctx: CheckContext, res: CheckResult, fixErrors: boolean): Promise<Counting> {
  const { header, geometry } = ctx;
  const { clusterSize } = header;
  const refs = new RefcountArray(header.refcountOrder, Math.ceil(ctx.fileSize / clusterSize));
  const counting: Counting = {
    refs, rebuild: false, allocated: 0, fragmented: 0, compressed: 0, copied: new CopiedRecord(Math.ceil(ctx.fileSize / clusterSize)),
  };
  const fix: Fix = { errors: fixErrors };
  countRange(ctx, res, refs, 0, clusterSize);
  await countL1(ctx, res, refs, counting, header.l1TableOffset, header.l1Size, true, fix);
  if (geometry.hasDataFile && ctx.snapshots.length > 0) {
    ctx.messages.push(`ERROR ${ctx.snapshots.length} snapshots in image with data file`);
    res.corruptions += 1;
  }
  for (const snapshot of ctx.snapshots) {
    if (snapshot.l1TableOffset % clusterSize !== 0) {
      ctx.messages.push(
        `ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_offset=0x${hex(snapshot.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      res.corruptions += 1;
      continue;
    }
    if (snapshot.l1Size > MAX_L1_ENTRIES) {
      ctx.messages.push(
        `ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_size=0x${hex(snapshot.l1Size)}: L1 table is too large; snapshot table entry corrupted`,
      );
      res.corruptions += 1;
      continue;
    }
    await countL1(ctx, res, refs, counting, snapshot.l1TableOffset, snapshot.l1Size, false, fix);
  }
  countRange(ctx, res, refs, header.snapshotsOffset, ctx.snapshotsSize);
  countRange(ctx, res, refs, header.refcountTableOffset, header.refcountTableClusters * clusterSize);
  if (ctx.luks) countRange(ctx, res, refs, ctx.luks.offset, ctx.luks.length);
  if (ctx.bitmaps) await countBitmaps(ctx, res, refs);
  await checkRefcountBlocks(ctx, res, counting, fixErrors);
  return counting;
}

async function countBitmaps(ctx: CheckContext, res: CheckResult, refs: RefcountArray): Promise<void> {
  const bitmaps = ctx.bitmaps!;
  const { clusterSize } = ctx.header;
  countRange(ctx, res, refs, bitmaps.directoryOffset, bitmaps.directorySize);
  for (const table of bitmaps.tables) {
    countRange(ctx, res, refs, table.offset, table.entries * 8);
    // A table the file cannot hold (a damaged bitmap_table_size or offset) was reported just above; its entries are not read.
    if (table.offset < 0 || table.offset + table.entries * 8 - ctx.fileSize >= clusterSize) continue;
    const entries = Buffer.alloc(table.entries * 8);
    await ctx.file.read(table.offset, entries);
    for (let index = 0; index < table.entries; index++) {
      const high = entries.readUInt32BE(index * 8);
      const low = entries.readUInt32BE(index * 8 + 4);
      const offset = (high & 0x00ffffff) * 0x100000000 + ((low & 0xfffffe00) >>> 0);
      if ((high & 0xff000000) !== 0 || (low & 0x1fe) !== 0 || (offset !== 0 && offset % clusterSize !== 0)) {
        ctx.messages.push(`ERROR bitmap table entry ${index} at 0x${hex(table.offset)} is corrupted: ${hex64(high, low)}`);
        res.corruptions += 1;
        continue;
      }
      if (offset !== 0) countRange(ctx, res, refs, offset, clusterSize);
    }
  }
}

/** qemu's check_refblocks: each refcount table entry must be clean, aligned, inside the image, and its block used once. */
async function checkRefcountBlocks(ctx: CheckContext, res: CheckResult, counting: Counting, fixErrors: boolean): Promise<void> {
  const { clusterSize } = ctx.header;
  const { refs } = counting;
  const table = ctx.refcountTable;
  const entries = table.length / 8;
  // A zero entry (no block) has nothing to check.
  for (let index = nextNonZeroEntry(table, 0, entries); index < entries; index = nextNonZeroEntry(table, index + 1, entries)) {
    const high = table.readUInt32BE(index * 8);
    const low = table.readUInt32BE(index * 8 + 4);
    const offset = high * 0x100000000 + ((low & 0xfffffe00) >>> 0);
    const cluster = Math.floor(offset / clusterSize);
    if (low & 0x1ff) {
      ctx.messages.push(`ERROR refcount table entry ${index} has reserved bits set`);
      res.corruptions += 1;
      counting.rebuild = true;
      continue;
    }
    if (offset % clusterSize !== 0) {
      ctx.messages.push(`ERROR refcount block ${index} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions += 1;
      counting.rebuild = true;
      continue;
    }
    if (cluster >= refs.length) {
      res.corruptions += 1;
      ctx.messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} refcount block ${index} is outside image`);
      // qemu grows the file to hold the block; a damaged entry can put it petabytes away (a huge
      // sparse file, and counts for every cluster up to it in memory), so here the structure is rebuilt.
      if (fixErrors) counting.rebuild = true;
      continue;
    }
    if (offset !== 0) {
      countRange(ctx, res, refs, offset, clusterSize);
      if (refs.get(cluster) !== 1) {
        ctx.messages.push(`ERROR refcount block ${index} refcount=${refs.get(cluster)}`);
        res.corruptions += 1;
        counting.rebuild = true;
      }
    }
  }
}
