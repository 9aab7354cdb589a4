/**
 * qcow2 consistency check and repair, as `qemu-img check [-r leaks|all]`
 * (qemu 7.2) does it and reports it:
 *
 * 0. read the snapshot table tolerantly (check-snapshots.ts): what qemu
 *    cannot read fails the check, what it can repair is counted (and an
 *    overlong table cut in the header at once with -r all);
 * 1. count every reference from the header down (check-refs.ts);
 * 2. compare each cluster's refcount with its references (16-bit counts a
 *    chunk at a time with memcmp, one by one only where a chunk differs): a
 *    refcount above them is a leak ("Leaked cluster N refcount=R
 *    reference=C"), below them a corruption ("ERROR cluster N ..."); a repair
 *    sets the refcount in place;
 * 3. where the refcount structure cannot hold the repair (a referenced cluster
 *    with refcount 0, a damaged refcount table or block), `-r all` writes a
 *    new one past the end of the image (check-rebuild.ts), counts again and
 *    repairs the old structure's clusters, now leaked;
 * 4. check the OFLAG_COPIED bit of the active L1 and L2 entries against
 *    refcount == 1, and fix it (without reading the L2 tables again when what
 *    the counting recorded of the bits agrees with the refcounts);
 * 5. with -r all, rewrite a snapshot table whose entries needed fixing
 *    (check-snapshot-write.ts), once the refcounts can be trusted;
 * 6. with nothing left to repair, clear the dirty and corrupt bits.
 *
 * Counts: `CheckResult.corruptions` / `leaks` are everything found, the
 * `...Fixed` counts what was repaired (the CLI prints what is left). The
 * returned object also has `fragmentedClusters` and `compressedClusters`
 * (qemu-img's figures) beyond CheckResult.
 *
 * `rebuildRefcounts(file)` is the repair a read-write open runs on an image
 * whose dirty bit is set (lazy refcounts): `checkQcow2` with `-r all`,
 * returning the header as it is on disk afterwards (a rebuild moves the
 * refcount table).
 *
 * Concurrency: the image must not be open for writing elsewhere while this
 * runs (the CLI holds the image lock); the check itself is sequential, with
 * parallel reads of tables. Each repair write that another table depends on
 * is flushed before that table is written.
 */
import createDebug from 'debug';
import { constants } from 'node:os';
import { HostIoError } from '../../block/errors.js';
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { EXT_BITMAPS, EXT_CRYPTO, EXT_END } from './extensions.js';
import { Geometry } from './geometry.js';
import { AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, parseHeader, type Qcow2Header } from './header.js';
import { getRefcount, refcountsPerBlock, setRefcount } from './refcount-entries.js';
import { nextNonZeroEntry } from '../../block/table-scan.js';
import { endianness } from 'node:os';
import { countReferences, readTables, type CheckContext, type Counting } from './check-refs.js';
import { writeRefcountStructure } from './check-rebuild.js';
import { checkCopiedFlags } from './check-copied.js';
import { MAX_DIRECTORY_BYTES as MAX_BITMAP_DIRECTORY_BYTES } from './bitmaps.js';
import { readSnapshotTableForCheck, SNAPSHOT_POINTER_AT, type SnapshotTableRead } from './check-snapshots.js';
import { rewriteSnapshotTable } from './check-snapshot-write.js';

const log = createDebug('imgmount:qcow2:check');

const LITTLE_ENDIAN = endianness() === 'LE';
/** Clusters whose 16-bit counts compare is given at once (one memcmp of 512 bytes) before one by one. */
const COMPARE_CHUNK = 256;

/** What a qcow2 check found, with qemu-img's allocation figures. */
export interface Qcow2CheckResult extends CheckResult {
  fragmentedClusters: number;
  compressedClusters: number;
}

export type Qcow2CheckOptions = CheckOptions & { fix?: 'leaks' | 'all' };

/** Counts in qemu's convention while checking: `corruptions` and `leaks` are those left. */
interface Tally {
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  messages: string[];
}

export async function checkQcow2(file: Protocol, options: Qcow2CheckOptions): Promise<Qcow2CheckResult> {
  const fixErrors = options.repair && (options.fix ?? 'all') === 'all';
  const fixLeaks = options.repair;
  const { ctx, snapshotTable } = await readContext(file, options.progress, options.repair, fixErrors);
  const res: Tally = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: ctx.messages };
  const asResult = res as unknown as CheckResult;

  let counting = await countReferences(ctx, asResult, fixErrors);
  let stored = await StoredRefcounts.load(ctx);
  const before = { ...res };
  let highest = compare(ctx, res, stored, counting, false, false);
  if (counting.rebuild && fixErrors) {
    const old = { ...res };
    ctx.messages.push('Rebuilding refcount structure');
    log('%s: rebuilding the refcount structure', file.path);
    const written = await writeRefcountStructure(file, ctx.header, counting.refs);
    ctx.header = { ...ctx.header, refcountTableOffset: written.tableOffset, refcountTableClusters: written.tableClusters };
    ctx.refcountTable = written.table;
    ctx.fileSize = await file.size();
    res.corruptions = 0;
    res.leaks = 0;
    const allocation = counting;
    counting = await countReferences(ctx, asResult, false);
    Object.assign(counting, { allocated: allocation.allocated, fragmented: allocation.fragmented, compressed: allocation.compressed });
    stored = await StoredRefcounts.load(ctx);
    // The old structure's clusters are leaks now; what cannot be repaired here was made by the rebuild.
    const saved = { ...res };
    const fresh: Tally = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: ctx.messages };
    highest = compare(ctx, fresh, stored, counting, true, false);
    await stored.writeBack(file);
    if (counting.rebuild) ctx.messages.push('ERROR rebuilt refcount structure is still broken');
    Object.assign(res, saved);
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += fresh.leaks;
  } else if (options.repair) {
    if (counting.rebuild) {
      ctx.messages.push('ERROR need to rebuild refcount structures');
      throw checkFailed(`${file.path}: Check failed: the refcount structure must be rebuilt, which only a repair of everything does (-r all)`);
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      Object.assign(res, before);
      highest = compare(ctx, res, stored, counting, fixLeaks, fixErrors);
      await stored.writeBack(file);
    }
  }
  await checkCopiedFlags(ctx, res, stored, fixErrors ? true : fixLeaks ? ctx.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0 : false, counting.copied);
  if (ctx.checkErrors > 0) throw checkFailed(`${file.path}: Check failed: ${ctx.checkErrors} internal errors occurred during the check`);
  if (fixErrors && snapshotTable.corruptions > 0 && !counting.rebuild) await fixSnapshotTable(ctx, snapshotTable, counting.refs);
  if (options.repair && res.corruptions === 0 && snapshotTable.corruptions === 0) await markClean(file, ctx.header);
  return {
    corruptions: res.corruptions + res.corruptionsFixed + snapshotTable.corruptions + snapshotTable.corruptionsFixed,
    leaks: res.leaks + res.leaksFixed,
    corruptionsFixed: res.corruptionsFixed + snapshotTable.corruptionsFixed,
    leaksFixed: res.leaksFixed,
    messages: ctx.messages,
    imageEndOffset: (highest + 1) * ctx.header.clusterSize,
    totalClusters: Math.ceil(ctx.header.size / ctx.header.clusterSize),
    allocatedClusters: counting.allocated,
    fragmentedClusters: counting.fragmented,
    compressedClusters: counting.compressed,
  };
}

/**
 * Recomputes every refcount of the image from its references and writes them
 * (a rebuilt structure where the old one cannot hold them), fixes OFLAG_COPIED
 * flags, and clears the dirty bit: what a read-write open does with an image
 * left dirty under lazy refcounts. Call it before reading any metadata of the
 * image for writing; it returns the header as it now is on disk.
 */
export async function rebuildRefcounts(file: Protocol): Promise<{ result: Qcow2CheckResult; header: Qcow2Header }> {
  const result = await checkQcow2(file, { repair: true, fix: 'all' });
  const head = Buffer.alloc(4096);
  await file.read(0, head);
  return { result, header: parseHeader(head, await file.size(), file.path) };
}

/** Refcounts as the image stores them, block by block, with the changes a repair makes. */
export class StoredRefcounts {
  private readonly dirty = new Set<number>();
  /** The block `block` found last, and its index (a block is never replaced once found). */
  private lastIndex = -1;
  private lastBlock: Buffer | null | undefined = null;
  /** 16-bit counts of 1, a block's worth (made when first needed). */
  private ones16: Buffer | undefined;
  private constructor(
    private readonly ctx: CheckContext,
    /** Blocks by file offset. */
    private readonly blocks: Map<number, Buffer>,
    readonly perBlock: number,
  ) {}

  static async load(ctx: CheckContext): Promise<StoredRefcounts> {
    const { clusterSize, refcountOrder } = ctx.header;
    const offsets: number[] = [];
    const entries = ctx.refcountTable.length / 8;
    for (let index = nextNonZeroEntry(ctx.refcountTable, 0, entries); index < entries; index = nextNonZeroEntry(ctx.refcountTable, index + 1, entries)) {
      const offset = StoredRefcounts.blockOffset(ctx.refcountTable, index);
      if (offset > 0 && offset % clusterSize === 0 && offset < ctx.fileSize) offsets.push(offset);
    }
    return new StoredRefcounts(ctx, await readTables(ctx.file, offsets, clusterSize), refcountsPerBlock(clusterSize, refcountOrder));
  }

  private static blockOffset(table: Buffer, index: number): number {
    return table.readUInt32BE(index * 8) * 0x100000000 + ((table.readUInt32BE(index * 8 + 4) & 0xfffffe00) >>> 0);
  }

  /** The refcount block holding `cluster`'s count: null for none (count 0), undefined for an unreadable one. */
  block(cluster: number): Buffer | null | undefined {
    const index = Math.floor(cluster / this.perBlock);
    if (index === this.lastIndex) return this.lastBlock;
    const block = this.findBlock(index);
    this.lastIndex = index;
    this.lastBlock = block;
    return block;
  }

  private findBlock(index: number): Buffer | null | undefined {
    if (index >= this.ctx.refcountTable.length / 8) return null;
    const offset = StoredRefcounts.blockOffset(this.ctx.refcountTable, index);
    if (offset === 0) return null;
    if (offset % this.ctx.header.clusterSize !== 0) return undefined;
    let block = this.blocks.get(offset);
    if (!block) {
      block = Buffer.alloc(this.ctx.header.clusterSize); // past the end of the file: zeros
      this.blocks.set(offset, block);
    }
    return block;
  }

  /** Count `index` of one of these blocks. */
  countIn(block: Buffer, index: number): number {
    return refcountIn(block, index, this.ctx.header.refcountOrder);
  }

  /** True when counts [index, index + count) of one of these blocks are all 1 (16-bit counts: one memcmp). */
  allOne(block: Buffer, index: number, count: number): boolean {
    const order = this.ctx.header.refcountOrder;
    if (order === 4) {
      this.ones16 ??= Buffer.alloc(this.ctx.header.clusterSize, Buffer.from([0, 1]));
      return block.compare(this.ones16, 0, count * 2, index * 2, (index + count) * 2) === 0;
    }
    for (let at = index; at < index + count; at++) if (refcountIn(block, at, order) !== 1) return false;
    return true;
  }

  /** The stored count of `cluster`, or undefined (an unaligned refcount block) after reporting it. */
  get(cluster: number): number | undefined {
    const block = this.block(cluster);
    if (block === null) return 0;
    if (block === undefined) return undefined;
    return refcountIn(block, cluster % this.perBlock, this.ctx.header.refcountOrder);
  }

  set(cluster: number, value: number): void {
    const block = this.block(cluster);
    if (!block) throw checkFailed(`cluster ${cluster} has no refcount block to repair`);
    setRefcount(block, cluster % this.perBlock, this.ctx.header.refcountOrder, value);
    const offset = StoredRefcounts.blockOffset(this.ctx.refcountTable, Math.floor(cluster / this.perBlock));
    this.dirty.add(offset);
  }

  /** Writes the changed blocks and flushes. */
  async writeBack(file: Protocol): Promise<void> {
    if (this.dirty.size === 0) return;
    for (const offset of [...this.dirty].sort((a, b) => a - b)) await file.write(offset, this.blocks.get(offset)!);
    this.dirty.clear();
    await file.flush();
  }
}

/** Entry `index` of a refcount block: the common widths (8 and 16 bits) read directly. */
function refcountIn(block: Buffer, index: number, order: number): number {
  if (order === 4) return (block[index * 2]! << 8) | block[index * 2 + 1]!;
  if (order === 3) return block[index]!;
  return getRefcount(block, index, order);
}

/** qemu's compare_refcounts, one refcount block's range of clusters at a time; returns the highest cluster in use. */
function compare(ctx: CheckContext, res: Tally, stored: StoredRefcounts, counting: Counting, fixLeaks: boolean, fixErrors: boolean): number {
  const { refs } = counting;
  const order = ctx.header.refcountOrder;
  const { perBlock } = stored;
  // 16-bit counts on a little-endian host: compared with a byte-swapped copy of each block, chunk by chunk (memcmp).
  const counts = LITTLE_ENDIAN ? refs.counts16() : undefined;
  const countBytes = counts && Buffer.from(counts.buffer, counts.byteOffset, counts.byteLength);
  let swapped: Buffer | undefined;
  // Clusters in use found one by one; those of chunks that compared equal are found after the loop.
  let highest = 0;
  const compareClusters = (block: Buffer | null, base: number, from: number, to: number): void => {
    for (let cluster = from; cluster < to; cluster++) {
      const references = refs.get(cluster);
      // No block: every count is 0.
      const refcount = block === null ? 0 : refcountIn(block, cluster - base, order);
      if (refcount > 0 || references > 0) highest = cluster;
      if (refcount !== references) mismatch(ctx, res, stored, counting, cluster, refcount, references, fixLeaks, fixErrors);
    }
  };
  for (let base = 0; base < refs.length; base += perBlock) {
    const end = Math.min(refs.length, base + perBlock);
    const block = stored.block(base);
    if (block === undefined) {
      for (let cluster = base; cluster < end; cluster++) {
        ctx.messages.push(`Can't get refcount for cluster ${cluster}: Input/output error`);
        ctx.checkErrors += 1;
      }
      continue;
    }
    if (block === null || countBytes === undefined) {
      compareClusters(block, base, base, end);
      continue;
    }
    const bytes = (end - base) * 2;
    swapped ??= Buffer.allocUnsafeSlow(perBlock * 2);
    block.copy(swapped, 0, 0, bytes);
    swapped.subarray(0, bytes).swap16();
    for (let from = base; from < end; from += COMPARE_CHUNK) {
      const to = Math.min(end, from + COMPARE_CHUNK);
      if (countBytes.compare(swapped, (from - base) * 2, (to - base) * 2, from * 2, to * 2) !== 0) compareClusters(block, base, from, to);
    }
  }
  return Math.max(highest, lastInUse(refs, stored, order));
}

/** The last cluster with references or a stored count, outside blocks that cannot be read (0 when none is). */
function lastInUse(refs: Counting['refs'], stored: StoredRefcounts, order: number): number {
  for (let cluster = refs.length - 1; cluster >= 0; cluster--) {
    const block = stored.block(cluster);
    if (block === undefined) {
      cluster -= cluster % stored.perBlock;
      continue;
    }
    if (refs.get(cluster) > 0 || (block !== null && refcountIn(block, cluster % stored.perBlock, order) > 0)) return cluster;
  }
  return 0;
}

/** One cluster whose stored refcount is not its count of references: reported, and repaired as far as asked. */
function mismatch(
  ctx: CheckContext, res: Tally, stored: StoredRefcounts, counting: Counting,
  cluster: number, refcount: number, references: number, fixLeaks: boolean, fixErrors: boolean,
): void {
  let fixing: 'leaks' | 'corruptions' | undefined;
  if (refcount === 0) counting.rebuild = true;
  else if (refcount > references && fixLeaks) fixing = 'leaks';
  else if (refcount < references && fixErrors) fixing = 'corruptions';
  const word = fixing ? 'Repairing' : refcount < references ? 'ERROR' : 'Leaked';
  ctx.messages.push(`${word} cluster ${cluster} refcount=${refcount} reference=${references}`);
  if (fixing) {
    stored.set(cluster, references);
    if (fixing === 'leaks') res.leaksFixed += 1;
    else res.corruptionsFixed += 1;
    return;
  }
  if (refcount < references) res.corruptions += 1;
  else res.leaks += 1;
}

/**
 * qemu's qcow2_check_fix_snapshot_table: the table written again with its
 * entries fixed, the header pointed at it, the old table freed.
 */
async function fixSnapshotTable(ctx: CheckContext, table: SnapshotTableRead, refs: Counting['refs']): Promise<void> {
  const { header, file } = ctx;
  const counted = table.size > 0 && table.offset + table.size - ctx.fileSize < header.clusterSize;
  try {
    await rewriteSnapshotTable(file, header, table.entries, { offset: table.offset, size: table.size, counted }, refs);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw checkFailed(`${file.path}: ERROR failed to update snapshot table: ${reason}; Check failed`);
  }
  table.corruptionsFixed += table.corruptions;
  table.corruptions = 0;
}

/** The header, the refcount table, the snapshot table, and the extensions the counting needs. */
async function readContext(
  file: Protocol, progress: CheckOptions['progress'], repair: boolean, fixErrors: boolean,
): Promise<{ ctx: CheckContext; snapshotTable: SnapshotTableRead }> {
  const fileSize = await file.size();
  const start = Buffer.alloc(4096);
  await file.read(0, start);
  // As qemu's open for a check: the snapshot table pointer is left out here and read tolerantly below.
  const withoutSnapshots = Buffer.from(start);
  withoutSnapshots.fill(0, SNAPSHOT_POINTER_AT, SNAPSHOT_POINTER_AT + 12);
  const header = parseHeader(withoutSnapshots, fileSize, file.path);
  const firstCluster = Buffer.alloc(header.clusterSize);
  await file.read(0, firstCluster);
  const refcountTable = Buffer.alloc(header.refcountTableClusters * header.clusterSize);
  await file.read(header.refcountTableOffset, refcountTable);
  const ctx: CheckContext = {
    file, header, geometry: new Geometry(header), fileSize, snapshots: [], snapshotsSize: 0, refcountTable,
    messages: [], checkErrors: 0, progress,
  };
  const snapshotTable = await readSnapshotTableForCheck(file, start, {
    version: header.version, clusterSize: header.clusterSize, fileSize, repair, fixErrors, messages: ctx.messages,
  });
  ctx.snapshots = snapshotTable.entries;
  ctx.snapshotsSize = snapshotTable.size;
  ctx.header = { ...header, nbSnapshots: snapshotTable.entries.length, snapshotsOffset: snapshotTable.offset };
  await readExtensions(ctx, firstCluster);
  return { ctx, snapshotTable };
}

/** The LUKS header and bitmap directory ranges, from the header extensions. */
async function readExtensions(ctx: CheckContext, firstCluster: Buffer): Promise<void> {
  const { header } = ctx;
  const end = header.backingFileOffset > header.headerLength ? Math.min(header.backingFileOffset, firstCluster.length) : firstCluster.length;
  let bitmapExtension: { count: number; size: number; offset: number } | undefined;
  for (let at = header.headerLength; at + 8 <= end; ) {
    const type = firstCluster.readUInt32BE(at);
    const length = firstCluster.readUInt32BE(at + 4);
    if (type === EXT_END || at + 8 + length > end) break;
    const data = firstCluster.subarray(at + 8, at + 8 + length);
    if (type === EXT_CRYPTO && length >= 16) ctx.luks = { offset: Number(data.readBigUInt64BE(0)), length: Number(data.readBigUInt64BE(8)) };
    if (type === EXT_BITMAPS && length >= 24) {
      bitmapExtension = { count: data.readUInt32BE(0), size: Number(data.readBigUInt64BE(8)), offset: Number(data.readBigUInt64BE(16)) };
    }
    at += 8 + Math.ceil(length / 8) * 8;
  }
  // As qemu: the directory counts only while the autoclear bit says it belongs to this image.
  if (!bitmapExtension || !(header.autoclearFeatures & AUTOCLEAR_BITMAPS) || bitmapExtension.count === 0) return;
  if (bitmapExtension.size > MAX_BITMAP_DIRECTORY_BYTES || bitmapExtension.offset + bitmapExtension.size > ctx.fileSize) {
    // As qemu, whose check fails when the directory cannot be loaded; never an allocation of what the field claims.
    ctx.messages.push(
      `ERROR bitmap directory at 0x${bitmapExtension.offset.toString(16)} (size 0x${bitmapExtension.size.toString(16)}) is larger than ${MAX_BITMAP_DIRECTORY_BYTES} bytes or lies outside the file (${ctx.fileSize} bytes)`,
    );
    ctx.checkErrors += 1;
    return;
  }
  const directory = Buffer.alloc(bitmapExtension.size);
  await ctx.file.read(bitmapExtension.offset, directory);
  const tables: { offset: number; entries: number }[] = [];
  for (let at = 0, index = 0; index < bitmapExtension.count && at + 24 <= directory.length; index++) {
    tables.push({ offset: Number(directory.readBigUInt64BE(at)), entries: directory.readUInt32BE(at + 8) });
    const nameSize = directory.readUInt16BE(at + 18);
    const extraSize = directory.readUInt32BE(at + 20);
    at = Math.ceil((at + 24 + extraSize + nameSize) / 8) * 8;
  }
  ctx.bitmaps = { directoryOffset: bitmapExtension.offset, directorySize: bitmapExtension.size, tables };
}

/** Clears the dirty and corrupt bits (version 3), after flushing every repair. */
async function markClean(file: Protocol, header: Qcow2Header): Promise<void> {
  if (header.version !== 3) return;
  const bytes = Buffer.alloc(8);
  await file.read(72, bytes);
  const features = bytes.readBigUInt64BE(0);
  const cleared = features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if (cleared === features) return;
  await file.flush();
  bytes.writeBigUInt64BE(cleared);
  await file.write(72, bytes);
  await file.flush();
}

/** The check could not be completed (qemu-img: "Check failed", exit status 1). */
function checkFailed(message: string): HostIoError {
  return new HostIoError(message, constants.errno.EIO);
}
