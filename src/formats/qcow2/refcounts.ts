/**
 * qcow2 host cluster management for writing: the refcount table (kept in
 * memory), refcount blocks (through a table cache, written through), the
 * allocation of clusters, refcount changes, and growth of the refcount
 * structure (new refcount blocks, a larger refcount table).
 *
 * Where clusters come from: free clusters (refcount 0) inside the file are
 * reused first; everything else is appended at the end of the file. A
 * cluster freed while the image is open waits in quarantine (quarantine.ts)
 * until its decrement and the change that dropped the reference are durable
 * and no request that began before the free is in flight; then `reclaim`
 * punches its host range (the file's allocated size shrinks, as qemu's
 * discard of freed clusters does) and it can be handed out again.
 *
 * On-disk ordering (a kill -9 at any point leaves at most leaked clusters;
 * after the flushes named here, so does a power loss):
 * - increments are written before `allocate` / `increment` return (in
 *   deferred mode they stay in memory, blocks pinned, until `writeBack`), and
 *   the caller calls `barrier()` (write-back, then an fdatasync unless
 *   refcounts are lazy) before it writes an L2 or L1 entry that links them;
 * - a new refcount block is written whole, flushed, and only then does the
 *   refcount table point to it; a larger refcount table is written whole and
 *   flushed, then the header points to it and is flushed, then the old
 *   table's clusters are freed;
 * - `decrement` is for clusters the caller has already unlinked on disk.
 *
 * Concurrency: every method that changes state runs under the image's
 * allocation lock, which the caller holds; nothing here locks.
 */
import { announce, flushToDisk } from '../../block/events.js';
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { TableCache, type TableHandle } from '../../cache/table-cache.js';
import { offsetBits, wordAt } from './geometry.js';
import type { MetadataClusters } from './metadata.js';
import { getRefcount, maxRefcount, refcountByteRange, refcountsPerBlock, setRefcount } from './refcount-entries.js';
import { Quarantine, type RequestEpochs } from './quarantine.js';

const log = createDebug('imgmount:qcow2');

/** Refcount blocks kept in memory besides the ones in use: 4 MiB covers 128 TiB of 64 KiB clusters with 16-bit refcounts. */
const REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024;
/** Header fields rewritten when the refcount table moves: refcount_table_offset (u64) and refcount_table_clusters (u32). */
const HEADER_REFCOUNT_TABLE_AT = 48;

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  private readonly clusterSize: number;
  private readonly perBlock: number;
  private readonly max: number;
  private readonly blocks: TableCache<Buffer>;
  /** Cluster index just past the last cluster in use or reserved: new clusters are appended here. */
  private endCluster: number;
  /** The lowest cluster that may be free below `endCluster` (free since the open). */
  private freeHint = 0;
  /** Where searches for several contiguous clusters start: the end at the last one that failed. */
  private runHint = 0;
  /** Set when refcounts were written since the last barrier. */
  private unflushed = false;
  /**
   * Set by a decrement: the L1/L2 change that dropped the reference was written but
   * may not be durable yet, so the next write-back flushes first. Otherwise a power
   * loss could keep the lower refcount without that change: a cluster still referenced
   * but free, handed out again. (QEMU orders the same with a cache dependency.)
   */
  private decrementsWaiting = false;
  /**
   * Changed byte ranges of refcount blocks not written yet (deferred mode), by block
   * offset; each block stays pinned in the cache until `writeBack` writes it.
   */
  private readonly dirtyBlocks = new Map<number, { handle: TableHandle<Buffer>; start: number; end: number }>();
  /**
   * Deferred mode (the writable image's): refcount changes stay in memory until
   * `writeBack` or `barrier`, which the image calls before any L2 or L1 entry that
   * depends on them reaches the disk. Off: every change is written at once.
   */
  deferWrites = false;
  /** Clusters freed since the open, until they may be handed out again. */
  private readonly quarantine: Quarantine;
  /** Clusters from here on lay past the end of the file at open: never written before this open allocated them. */
  private readonly freshFrom: number;
  /** Clusters past `freshFrom` freed since the open: written once, so no longer fresh. */
  private readonly usedFresh = new Set<number>();
  /** Clusters freed that held compressed data, until reclaimed. */
  private readonly compressedFreed = new Set<number>();
  /** Times each cluster that held compressed data was handed out again since the open: part of the decoded-cluster cache key. */
  private readonly reclaims = new Map<number, number>();

  private constructor(
    private readonly file: Protocol,
    private layout: RefcountLayout,
    private table: Buffer,
    fileSize: number,
    private readonly metadata: MetadataClusters,
    /** Lazy refcounts (the dirty bit is set): no flush is needed before linking. */
    private readonly lazy: boolean,
    epochs: RequestEpochs | undefined,
  ) {
    this.quarantine = new Quarantine(epochs);
    this.clusterSize = 2 ** layout.clusterBits;
    this.perBlock = refcountsPerBlock(this.clusterSize, layout.refcountOrder);
    this.max = maxRefcount(layout.refcountOrder);
    this.endCluster = Math.ceil(fileSize / this.clusterSize);
    this.freshFrom = this.endCluster;
    const clusterSize = this.clusterSize;
    this.blocks = new TableCache<Buffer>({
      maxBytes: REFCOUNT_CACHE_BYTES,
      tableBytes: clusterSize,
      sizeOf: (block) => block.length,
      load: async (offset) => {
        const block = Buffer.alloc(clusterSize);
        announce(file, 'refblock_load');
        await file.read(offset, block);
        return block;
      },
    });
  }

  /** `epochs`: the image's in-flight requests (none for offline users such as resize). */
  static async load(file: Protocol, layout: RefcountLayout, fileSize: number, metadata: MetadataClusters, lazy: boolean, epochs?: RequestEpochs): Promise<Refcounts> {
    const table = Buffer.alloc(layout.tableClusters * 2 ** layout.clusterBits);
    await file.read(layout.tableOffset, table);
    return new Refcounts(file, layout, table, fileSize, metadata, lazy, epochs);
  }

  /** Bytes up to the end of the last cluster in use: the file size the image's metadata may reference. */
  get endOffset(): number {
    return this.endCluster * this.clusterSize;
  }

  /**
   * True when the cluster at `offset` (the first of a run `allocate` returned) lies past
   * the end the file had at open and was never freed since: it reads as zeros until
   * written. (A run reused from the free clusters starts with a cluster freed before.)
   */
  isFresh(offset: number): boolean {
    const cluster = Math.floor(offset / this.clusterSize);
    return cluster >= this.freshFrom && !this.usedFresh.has(cluster);
  }

  /** How many times the cluster holding `offset` was handed out again since the open after holding compressed data (0 almost always). */
  generation(offset: number): number {
    return this.reclaims.size === 0 ? 0 : (this.reclaims.get(Math.floor(offset / this.clusterSize)) ?? 0);
  }

  /** Clusters freed since the open that may not be handed out yet. */
  get quarantined(): number {
    return this.quarantine.size;
  }

  /**
   * Runs `flush` (an fdatasync of the file, the caller's) and records it: refcount
   * writes made before it began are durable once it ended (quarantine.ts).
   */
  async flushed(flush: () => Promise<void>): Promise<void> {
    const covered = this.quarantine.flushStarting();
    await flush();
    this.quarantine.flushed(covered);
  }

  private flushFile(): Promise<void> {
    return this.flushed(() => flushToDisk(this.file));
  }

  /** True when `reclaim` may have clusters to hand back. */
  get reclaimable(): boolean {
    return this.quarantine.anyDurable;
  }

  /**
   * Makes the quarantined clusters that are safe now allocatable again, after punching
   * their host range (with PUNCH_HOLE|KEEP_SIZE where the file supports it; a failed
   * punch only leaves the bytes there). Under the allocation lock.
   */
  async reclaim(): Promise<void> {
    const clusters = this.quarantine.takeReclaimable();
    if (clusters.length === 0) return;
    const free: number[] = [];
    // Still free (nothing may take a quarantined cluster, but a damaged image is not trusted).
    for (const cluster of clusters) if ((await this.get(cluster * this.clusterSize)) === 0) free.push(cluster);
    free.sort((a, b) => a - b);
    for (let i = 0; i < free.length; ) {
      let j = i + 1;
      while (j < free.length && free[j] === free[j - 1]! + 1) j++;
      if (this.file.punchHole) {
        try {
          await this.file.punchHole(free[i]! * this.clusterSize, (j - i) * this.clusterSize);
        } catch (error) {
          log('%s: punching freed clusters %d+%d failed: %s', this.file.path, free[i], j - i, (error as Error).message);
        }
      }
      i = j;
    }
    for (const cluster of free) {
      if (this.compressedFreed.delete(cluster)) this.reclaims.set(cluster, (this.reclaims.get(cluster) ?? 0) + 1);
    }
    if (free.length > 0) {
      this.freeHint = Math.min(this.freeHint, free[0]!);
      this.runHint = Math.min(this.runHint, free[0]!);
      log('%s: %d freed cluster(s) reusable again', this.file.path, free.length);
    }
  }

  /** Makes the refcounts written so far durable before something links to them (a no-op with lazy refcounts). */
  async barrier(): Promise<void> {
    await this.writeBack();
    if (!this.unflushed) return;
    this.unflushed = false;
    if (!this.lazy) await this.flushFile();
  }

  /** Writes every deferred refcount change (not flushed: the caller flushes). */
  async writeBack(): Promise<void> {
    if (this.decrementsWaiting && this.dirtyBlocks.size > 0 && !this.lazy) {
      this.decrementsWaiting = false;
      await this.flushFile();
    }
    for (const [offset, dirty] of [...this.dirtyBlocks]) {
      // On failure the rest stays dirty, for the next call to try again.
      announce(this.file, 'refblock_update');
      await this.file.write(offset + dirty.start, dirty.handle.table.subarray(dirty.start, dirty.end));
      this.dirtyBlocks.delete(offset);
      dirty.handle.release();
      this.unflushed = true;
    }
    this.quarantine.allWritten();
  }

  /** The refcount of the cluster holding host byte `offset` (0 where no refcount block covers it). */
  async get(offset: number): Promise<number> {
    const cluster = Math.floor(offset / this.clusterSize);
    const blockOffset = this.blockOffset(Math.floor(cluster / this.perBlock));
    if (blockOffset === 0) return 0;
    return this.blocks.read(blockOffset, (block) => getRefcount(block, cluster % this.perBlock, this.layout.refcountOrder));
  }

  /** Allocates `count` contiguous clusters with refcount 1 and returns the host offset of the first. */
  async allocate(count: number): Promise<number> {
    announce(this.file, 'cluster_alloc');
    if (this.quarantine.anyDurable) await this.reclaim();
    const reused = await this.findFree(count);
    if (reused !== undefined) {
      await this.change(reused, count, +1);
      this.freeHint = reused + count;
      log('%s: reused clusters %d+%d', this.file.path, reused, count);
      return reused * this.clusterSize;
    }
    const appended = await this.appendClusters(count);
    log('%s: appended clusters %d+%d', this.file.path, appended, count);
    return appended * this.clusterSize;
  }

  /** Adds one reference to each cluster of [offset, offset + bytes). */
  async increment(offset: number, bytes: number): Promise<void> {
    const [first, count] = this.clustersOf(offset, bytes);
    await this.change(first, count, +1);
  }

  /**
   * Drops one reference from each cluster of [offset, offset + bytes); returns the clusters
   * that became free. `compressed`: the range held compressed data (decoded copies of it may
   * be cached, keyed by `generation`).
   */
  async decrement(offset: number, bytes: number, compressed = false): Promise<number[]> {
    const [first, count] = this.clustersOf(offset, bytes);
    const freed = await this.change(first, count, -1);
    if (compressed) for (const cluster of freed) this.compressedFreed.add(cluster);
    return freed;
  }

  private clustersOf(offset: number, bytes: number): [number, number] {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    return [first, last - first + 1];
  }

  private blockOffset(blockIndex: number): number {
    if (blockIndex * 8 >= this.table.length) return 0;
    const [high, low] = wordAt(this.table, blockIndex * 8);
    const offset = offsetBits(high, low);
    if (offset === 0) return 0;
    if (offset < 0 || offset % this.clusterSize !== 0) {
      throw new CorruptImageError(`${this.file.path}: refcount table entry ${blockIndex} points to ${offset}, which is not a cluster`);
    }
    // Past the end of the image: updating that block would write it there (a damaged entry made a 1 MB file 256 GiB).
    if (offset >= this.endOffset) {
      throw new CorruptImageError(`${this.file.path}: refcount table entry ${blockIndex} points to ${offset}, past the end of the image (${this.endOffset} bytes)`);
    }
    return offset;
  }

  /** The first run of `count` free clusters below the end, none of them quarantined; undefined when there is none. */
  private async findFree(count: number): Promise<number | undefined> {
    const from = count === 1 ? this.freeHint : Math.max(this.freeHint, this.runHint);
    let runStart = from;
    let cluster = from;
    while (cluster < this.endCluster && runStart + count <= this.endCluster) {
      const blockIndex = Math.floor(cluster / this.perBlock);
      const blockEnd = Math.min(this.endCluster, (blockIndex + 1) * this.perBlock);
      const blockOffset = this.blockOffset(blockIndex);
      if (blockOffset === 0) {
        // Not covered: not reusable (allocating there would need a new block first).
        cluster = blockEnd;
        runStart = cluster;
        continue;
      }
      const found = await this.blocks.read(blockOffset, (block) => {
        for (; cluster < blockEnd; cluster++) {
          // A metadata cluster whose refcount a damaged block says 0 is never handed out (qemu's overlap check).
          if (getRefcount(block, cluster % this.perBlock, this.layout.refcountOrder) !== 0 || this.quarantine.has(cluster) || this.metadata.contains(cluster * this.clusterSize)) {
            runStart = cluster + 1;
          } else if (cluster + 1 - runStart >= count) {
            return runStart;
          }
        }
        return undefined;
      });
      if (found !== undefined) return found;
    }
    // Nothing free below here any more (for this size): later searches start at the end.
    if (count === 1) this.freeHint = this.endCluster;
    else this.runHint = this.endCluster;
    return undefined;
  }

  /**
   * Appends `count` clusters at the end of the file with refcount 1, placing any
   * refcount blocks (and a larger refcount table) they need just before them.
   */
  private async appendClusters(count: number): Promise<number> {
    const start = this.endCluster;
    // The new metadata goes first; its size depends on what it must cover, so iterate.
    let metaClusters = 0;
    let plan: { newBlocks: number[]; tableEntries: number } = { newBlocks: [], tableEntries: this.table.length / 8 };
    for (;;) {
      plan = this.planCoverage(start, start + metaClusters + count);
      const tableClusters = plan.tableEntries * 8 > this.table.length ? Math.ceil((plan.tableEntries * 8) / this.clusterSize) : 0;
      const needed = plan.newBlocks.length + tableClusters;
      if (needed <= metaClusters) break;
      metaClusters = needed;
    }
    if (metaClusters === 0) {
      await this.change(start, count, 'in use');
      this.endCluster = start + count;
      return start;
    }

    const newTableClusters = plan.tableEntries * 8 > this.table.length ? Math.ceil((plan.tableEntries * 8) / this.clusterSize) : 0;
    const blockAt = new Map<number, { cluster: number; block: Buffer }>();
    plan.newBlocks.forEach((blockIndex, i) => blockAt.set(blockIndex, { cluster: start + i, block: Buffer.alloc(this.clusterSize) }));
    const tableCluster = start + plan.newBlocks.length;
    const dataStart = start + metaClusters;
    const end = dataStart + count;

    // Every cluster of the new area gets refcount 1: new blocks, the new table, the caller's clusters.
    const inUse: [number, number][] = [[start, plan.newBlocks.length + newTableClusters], [dataStart, count]];
    const existingChanges: [number, number][] = [];
    for (const [first, n] of inUse) {
      for (let cluster = first; cluster < first + n; cluster++) {
        const target = blockAt.get(Math.floor(cluster / this.perBlock));
        if (target) setRefcount(target.block, cluster % this.perBlock, this.layout.refcountOrder, 1);
        else existingChanges.push([cluster, 1]);
      }
    }
    this.endCluster = end;
    for (const { cluster, block } of blockAt.values()) {
      announce(this.file, 'refblock_alloc');
      await this.file.write(cluster * this.clusterSize, block);
    }
    for (const [cluster] of existingChanges) await this.change(cluster, 1, 'in use');
    // The blocks are durable before anything points to them.
    this.unflushed = true;
    await this.barrier();

    if (newTableClusters > 0) {
      const table = Buffer.alloc(newTableClusters * this.clusterSize);
      this.table.copy(table);
      for (const [blockIndex, { cluster }] of blockAt) writeWord(table, blockIndex * 8, cluster * this.clusterSize);
      const tableOffset = tableCluster * this.clusterSize;
      await this.file.write(tableOffset, table);
      await this.flushFile();
      const pointer = Buffer.alloc(12);
      pointer.writeBigUInt64BE(BigInt(tableOffset), 0);
      pointer.writeUInt32BE(newTableClusters, 8);
      await this.file.write(HEADER_REFCOUNT_TABLE_AT, pointer);
      await this.flushFile();
      const old = { offset: this.layout.tableOffset, bytes: this.table.length };
      this.table = table;
      this.layout = { ...this.layout, tableOffset, tableClusters: newTableClusters };
      this.metadata.addRange(tableOffset, table.length);
      this.metadata.removeRange(old.offset, old.bytes);
      await this.decrement(old.offset, old.bytes);
      log('%s: refcount table moved to %d (%d clusters)', this.file.path, tableOffset, newTableClusters);
    } else {
      for (const [blockIndex, { cluster }] of blockAt) {
        writeWord(this.table, blockIndex * 8, cluster * this.clusterSize);
        await this.file.write(this.layout.tableOffset + blockIndex * 8, this.table.subarray(blockIndex * 8, blockIndex * 8 + 8));
      }
    }
    for (const [, { cluster, block }] of blockAt) {
      this.metadata.addRange(cluster * this.clusterSize, this.clusterSize);
      this.blocks.insert(cluster * this.clusterSize, block).release();
    }
    log('%s: %d new refcount block(s) at cluster %d', this.file.path, blockAt.size, start);
    return dataStart;
  }

  /** Which refcount blocks are missing for clusters [from, to), and how many table entries covering `to` needs. */
  private planCoverage(from: number, to: number): { newBlocks: number[]; tableEntries: number } {
    const newBlocks: number[] = [];
    const lastBlock = Math.floor((to - 1) / this.perBlock);
    for (let blockIndex = Math.floor(from / this.perBlock); blockIndex <= lastBlock; blockIndex++) {
      if (this.blockOffset(blockIndex) === 0) newBlocks.push(blockIndex);
    }
    let tableEntries = this.table.length / 8;
    if (lastBlock >= tableEntries) {
      // Grow by half again at least, as a table that grows one cluster at a time would move often.
      tableEntries = Math.max(lastBlock + 1, Math.ceil((tableEntries * 3) / 2));
    }
    return { newBlocks, tableEntries };
  }

  /**
   * Adds `delta` to the refcount of clusters [first, first + count), or sets it to 1
   * ('in use': clusters appended past the end of the file, where a refcount left by
   * an allocation a crash cut short may linger and must not be added to), writing
   * each changed block range through. Returns the clusters whose refcount became 0.
   */
  private async change(first: number, count: number, delta: 1 | -1 | 'in use'): Promise<number[]> {
    if (delta === -1) this.decrementsWaiting = true;
    const freed: number[] = [];
    const order = this.layout.refcountOrder;
    for (let cluster = first; cluster < first + count; ) {
      const blockIndex = Math.floor(cluster / this.perBlock);
      const until = Math.min(first + count, (blockIndex + 1) * this.perBlock);
      const blockOffset = this.blockOffset(blockIndex);
      if (blockOffset === 0) {
        if (delta === -1) throw new CorruptImageError(`${this.file.path}: freeing cluster ${cluster}, which no refcount block covers`);
        throw new CorruptImageError(`${this.file.path}: cluster ${cluster} has no refcount block`);
      }
      const handle = await this.blocks.acquire(blockOffset);
      try {
        const block = handle.table;
        const firstIndex = cluster % this.perBlock;
        for (let c = cluster; c < until; c++) {
          const index = c % this.perBlock;
          const value = delta === 'in use' ? 1 : getRefcount(block, index, order) + delta;
          if (value < 0) throw new CorruptImageError(`${this.file.path}: cluster ${c} would get a negative refcount`);
          if (value > this.max) throw new CorruptImageError(`${this.file.path}: cluster ${c} would get a refcount above ${this.max}`);
          setRefcount(block, index, order, value);
          if (value === 0) {
            freed.push(c);
            if (delta === -1) {
              this.quarantine.freed(c);
              if (c >= this.freshFrom) this.usedFresh.add(c);
            }
          }
        }
        const { start, end } = refcountByteRange(firstIndex, until - cluster, order);
        if (this.deferWrites) {
          const dirty = this.dirtyBlocks.get(blockOffset);
          if (dirty) {
            dirty.start = Math.min(dirty.start, start);
            dirty.end = Math.max(dirty.end, end);
          } else {
            this.dirtyBlocks.set(blockOffset, { handle: await this.blocks.acquire(blockOffset), start, end });
          }
        } else {
          announce(this.file, 'refblock_update');
          await this.file.write(blockOffset + start, block.subarray(start, end));
          this.unflushed = true;
          this.quarantine.allWritten();
        }
      } finally {
        handle.release();
      }
      cluster = until;
    }
    return freed;
  }
}

function writeWord(buffer: Buffer, at: number, value: number): void {
  buffer.writeBigUInt64BE(BigInt(value), at);
}
