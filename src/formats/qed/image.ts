/**
 * An opened QED image: translation of guest offsets through the L1 table and
 * cached L2 tables, allocating writes, flush and clean close.
 *
 * Concurrency rules:
 * - Reads (map) never take a lock; they see each L2 entry either before or
 *   after an allocation, and both are consistent because data is written
 *   before the entry that points to it.
 * - Writes into allocated clusters go straight to the file, concurrently.
 * - Allocating writes are serialized by `allocationLock` (one at a time, as
 *   in qemu): under the lock the range is mapped again, so two writers that
 *   both saw a cluster unallocated never both allocate it.
 * - Ordering of an allocating write: need-check set and flushed (once), data
 *   (with the untouched part of each new cluster copied from the backing file
 *   or zeros), fdatasync when a backing file is used, then the L2 entries
 *   (a new L2 table is written whole), then the L1 entry.
 * - need-check is cleared at a clean close and, after a while without writes,
 *   by markClean (idle clean), both under `allocationLock`; the next
 *   allocation sets it again first.
 */
import { Mutex } from 'async-mutex';
import createDebug from 'debug';
import { BlockError, CorruptImageError } from '../../block/errors.js';
import { settleAll } from '../../block/settle.js';
import { announce, flushToDisk } from '../../block/events.js';
import { constants as osConstants } from 'node:os';
import type { BackingReader, BackingReference, FormatImage, FormatInfo, Mapping, OpenOptions, Protocol } from '../../block/types.js';
import { TableCache } from '../../cache/table-cache.js';
import { Geometry, getEntry, setEntry, ZERO_CLUSTER, type Table } from './geometry.js';
import { describeFeatures, QED_F_NEED_CHECK, type QedHeader } from './header.js';
import { readTable, updateEntries, writeHeader } from './tables.js';
import { appendRun } from '../../block/mapping.js';

const log = createDebug('imgmount:qed');

/** Default L2 cache bound: 16 MiB covers a 128 GiB image with the default geometry. */
export const DEFAULT_L2_CACHE_BYTES = 16 * 1024 * 1024;

export class QedImage implements FormatImage {
  readonly virtualSize: number;
  readonly geometry: Geometry;
  private readonly l2Cache: TableCache<Table>;
  private readonly allocationLock = new Mutex();
  private readBacking: BackingReader | undefined;
  private closed = false;
  /** Offsets below this (cluster-aligned) may be referenced. */
  private validEnd: number;
  /** Where the next cluster is allocated: the file size rounded up to a cluster. */
  private allocationEnd: number;
  /** The partial last cluster of a truncated file: referenced data there is lost, so it stays invalid. */
  private readonly damagedCluster: number | undefined;

  constructor(
    private readonly file: Protocol,
    private header: QedHeader,
    private readonly l1: Table,
    /** The file size at open; a partial last cluster (a truncated file) is never valid nor reused. */
    fileSize: number,
    readonly backing: BackingReference | undefined,
    options: OpenOptions,
  ) {
    this.virtualSize = header.imageSize;
    this.geometry = new Geometry(header);
    const { clusterSize } = this.geometry;
    this.validEnd = Math.floor(fileSize / clusterSize) * clusterSize;
    this.allocationEnd = Math.ceil(fileSize / clusterSize) * clusterSize;
    this.damagedCluster = this.validEnd < this.allocationEnd ? this.validEnd : undefined;
    const tableBytes = this.geometry.tableBytes;
    this.l2Cache = new TableCache<Table>({
      maxBytes: options.metadataCacheBytes ?? DEFAULT_L2_CACHE_BYTES,
      tableBytes,
      sizeOf: (table) => table.length,
      load: (offset) => {
        announce(file, 'l2_load');
        return readTable(file, offset, tableBytes);
      },
    });
    const raised = this.l2Cache.raisedNotice(file.path, tableBytes);
    if (raised) (options.notice ?? ((line: string) => log(line)))(raised);
  }

  get needCheck(): boolean {
    return (this.header.features & QED_F_NEED_CHECK) !== 0n;
  }

  attachBacking(reader: BackingReader | undefined): void {
    this.readBacking = reader;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1Index = this.geometry.l1Index(pos);
      const spanEnd = Math.min(end, (l1Index + 1) * this.geometry.l2Span);
      const l2Offset = getEntry(this.l1, l1Index);
      if (l2Offset === 0) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length: spanEnd - pos });
      } else {
        if (!this.isValidTable(l2Offset)) {
          throw new CorruptImageError(
            `${this.file.path}: L1 entry ${l1Index} (guest bytes ${l1Index * this.geometry.l2Span}..) points to L2 table at ${l2Offset}, which is misaligned, outside the file or on the L1 table; run 'imgmount check -r'`,
          );
        }
        const from = pos;
        await this.l2Cache.read(l2Offset, (table) => this.mapInTable(table, from, spanEnd, runs));
      }
      pos = spanEnd;
    }
    return runs;
  }

  private mapInTable(table: Table, start: number, end: number, runs: Mapping[]): void {
    const { clusterSize } = this.geometry;
    let pos = start;
    while (pos < end) {
      const clusterEnd = Math.min(end, this.geometry.clusterStart(pos) + clusterSize);
      const entry = getEntry(table, this.geometry.l2Index(pos));
      const length = clusterEnd - pos;
      if (entry === 0) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length });
      } else if (entry === ZERO_CLUSTER) {
        appendRun(runs, { kind: 'zero', guestOffset: pos, length });
      } else if (!this.isValidCluster(entry)) {
        throw new CorruptImageError(
          `${this.file.path}: the L2 entry for guest offset ${this.geometry.clusterStart(pos)} points to ${entry === -1 ? 'an offset above 2^53' : entry}, which is misaligned, outside the file or on the L1 table; run 'imgmount check -r'`,
        );
      } else {
        appendRun(runs, { kind: 'data', guestOffset: pos, length, hostOffset: entry + (pos % clusterSize) });
      }
      pos = clusterEnd;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const runs = await this.map(offset, data.length);
    // Every part finishes before the request answers (settleAll, not Promise.all): a part
    // failing fast must not hand the buffer back while another still writes from it.
    await settleAll(
      runs.map((run) => {
        const part = data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length);
        return run.kind === 'data' ? this.writeData(run.hostOffset, part) : this.allocatingWrite(run.guestOffset, part);
      }),
    );
  }

  /** Writes to a range that was unallocated when looked at; serialized with other allocations. */
  private async allocatingWrite(offset: number, data: Buffer): Promise<void> {
    await this.allocationLock.runExclusive(async () => {
      this.assertOpen();
      for (const run of await this.map(offset, data.length)) {
        const part = data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length);
        if (run.kind === 'data') {
          await this.writeData(run.hostOffset, part);
          continue;
        }
        // Runs may span L2 tables; allocate one table's share at a time.
        for (let pos = run.guestOffset; pos < run.guestOffset + run.length; ) {
          const end = Math.min(run.guestOffset + run.length, (this.geometry.l1Index(pos) + 1) * this.geometry.l2Span);
          await this.allocateClusters({ ...run, guestOffset: pos, length: end - pos }, part.subarray(pos - run.guestOffset, end - run.guestOffset));
          pos = end;
        }
      }
    });
  }

  /** Guest data into allocated clusters. */
  private writeData(hostOffset: number, data: Buffer): Promise<void> {
    announce(this.file, 'write_aio');
    return this.file.write(hostOffset, data);
  }

  /** Allocates the clusters under one unallocated run (inside one L2 table) and writes `data` there. */
  private async allocateClusters(run: Mapping, data: Buffer): Promise<void> {
    const { clusterSize, tableBytes } = this.geometry;
    const first = this.geometry.clusterStart(run.guestOffset);
    const runEnd = run.guestOffset + run.length;
    const last = Math.ceil(runEnd / clusterSize) * clusterSize;
    const count = (last - first) / clusterSize;
    await this.setNeedCheck();

    const head = run.guestOffset - first;
    const tail = last - runEnd;
    let clusters = data;
    if (head > 0 || tail > 0) {
      clusters = Buffer.alloc(last - first);
      if (run.kind === 'backing' && this.readBacking) {
        announce(this.file, 'cow_read');
        if (head > 0) await this.readBacking(first, clusters.subarray(0, head));
        if (tail > 0) await this.readBackingClamped(runEnd, clusters.subarray(clusters.length - tail));
      }
      data.copy(clusters, head);
    }
    // New clusters are written before anything points to them; if that fails (ENOSPC),
    // the file is cut back so the failed allocation leaves neither leak nor garbage.
    const mark = { allocationEnd: this.allocationEnd, validEnd: this.validEnd };
    const entries: number[] = [];
    let newTable: { offset: number; table: Table } | undefined;
    const l1Index = this.geometry.l1Index(first);
    const l2Index = this.geometry.l2Index(first);
    const l2Offset = getEntry(this.l1, l1Index);
    try {
      const hostOffset = this.allocate(clusters.length);
      for (let i = 0; i < count; i++) entries.push(hostOffset + i * clusterSize);
      announce(this.file, clusters === data ? 'write_aio' : 'cow_write');
      await this.file.write(hostOffset, clusters);
      if (this.readBacking) {
        await flushToDisk(this.file);
      }
      if (l2Offset === 0) {
        newTable = { offset: this.allocate(tableBytes), table: Buffer.alloc(tableBytes) };
        entries.forEach((entry, i) => setEntry(newTable!.table, l2Index + i, entry));
        announce(this.file, 'l2_alloc_write');
        announce(this.file, 'l2_update');
        await this.file.write(newTable.offset, newTable.table);
      }
    } catch (error) {
      await this.rollBackAllocation(mark);
      throw error;
    }

    if (newTable) {
      // Cached before the L1 entry points to it, so no reader ever loads a second copy.
      const handle = this.l2Cache.insert(newTable.offset, newTable.table);
      try {
        announce(this.file, 'l1_update');
        await updateEntries(this.file, this.header.l1TableOffset, this.l1, l1Index, [newTable.offset]);
      } finally {
        handle.release();
      }
      log('allocated L2 table %d at %d', l1Index, newTable.offset);
    } else {
      const handle = await this.l2Cache.acquire(l2Offset);
      try {
        announce(this.file, 'l2_update');
        await updateEntries(this.file, l2Offset, handle.table, l2Index, entries);
      } finally {
        handle.release();
      }
    }
  }

  /** Undoes allocations nothing points to yet: forgets them and truncates the file back. */
  private async rollBackAllocation(mark: { allocationEnd: number; validEnd: number }): Promise<void> {
    this.allocationEnd = mark.allocationEnd;
    this.validEnd = mark.validEnd;
    try {
      if ((await this.file.size()) > mark.allocationEnd) await this.file.truncate(mark.allocationEnd);
    } catch (error) {
      log('%s: could not cut back a failed allocation (%s); the clusters stay as leaks', this.file.path, (error as Error).message);
    }
  }

  /** Reserves `bytes` (whole clusters) at the end of the file. */
  private allocate(bytes: number): number {
    const offset = this.allocationEnd;
    this.allocationEnd += bytes;
    this.validEnd = this.allocationEnd;
    return offset;
  }

  private isValidCluster(offset: number): boolean {
    return this.geometry.isValidClusterOffset(offset, this.validEnd) && offset !== this.damagedCluster && !this.onL1Table(offset, this.geometry.clusterSize);
  }

  private isValidTable(offset: number): boolean {
    const damaged = this.damagedCluster;
    const overlapsDamage = damaged !== undefined && offset <= damaged && damaged < offset + this.geometry.tableBytes;
    return this.geometry.isValidTableOffset(offset, this.validEnd) && !overlapsDamage && !this.onL1Table(offset, this.geometry.tableBytes);
  }

  /** True when [offset, offset + bytes) overlaps the L1 table: a damaged entry pointing there would show it as data, and a write would overwrite it. */
  private onL1Table(offset: number, bytes: number): boolean {
    const l1 = this.header.l1TableOffset;
    return offset < l1 + this.geometry.tableBytes && l1 < offset + bytes;
  }

  /** Backing bytes for a cluster tail; the range may run past the image end (never past the cluster). */
  private async readBackingClamped(offset: number, buffer: Buffer): Promise<void> {
    const inside = Math.max(0, Math.min(buffer.length, this.virtualSize - offset));
    if (inside > 0) await this.readBacking!(offset, buffer.subarray(0, inside));
  }

  /**
   * Sets QED_F_NEED_CHECK and makes it durable before the first metadata change.
   * The bit counts as set (in memory) only once the header write and the flush
   * succeeded: after a failure the next allocation writes the header again.
   */
  private async setNeedCheck(): Promise<void> {
    if (this.needCheck) return;
    const header = { ...this.header, features: this.header.features | QED_F_NEED_CHECK };
    await writeHeader(this.file, header);
    await flushToDisk(this.file);
    this.header = header;
    log('%s: need-check set', this.file.path);
  }

  /**
   * Makes [offset, offset + length) read as zeros. Allocated clusters keep their
   * L2 entries (QED has no refcounts: a dropped entry would leave a leaked
   * cluster that qemu-img check reports) and their host range is punched, which
   * frees the space of whole clusters and zeroes partial ones. Zero clusters stay.
   * Unallocated ranges read as zeros already without a backing file; over one,
   * zeros are written (an allocating write).
   */
  async zero(offset: number, length: number): Promise<void> {
    this.assertOpen();
    const runs = await this.map(offset, length);
    await settleAll(
      runs.map((run) => {
        if (run.kind === 'data') return this.clearHostRange(run.hostOffset, run.length);
        if (run.kind === 'backing' && this.readBacking) return this.writeZeros(run.guestOffset, run.length);
        return undefined;
      }),
    );
  }

  /** Writes zeros over [offset, offset + length) in pieces of at most 1 MiB. */
  private async writeZeros(offset: number, length: number): Promise<void> {
    const piece = Buffer.alloc(Math.min(length, 1024 * 1024));
    for (let pos = offset; pos < offset + length; pos += piece.length) {
      await this.write(pos, piece.subarray(0, Math.min(piece.length, offset + length - pos)));
    }
  }

  /** Discard: QED cannot free a cluster without leaking it, so it zeroes (see zero). */
  async discard(offset: number, length: number): Promise<void> {
    await this.zero(offset, length);
  }

  private async clearHostRange(hostOffset: number, length: number): Promise<void> {
    if (this.file.punchHole) await this.file.punchHole(hostOffset, length);
    else await this.file.write(hostOffset, Buffer.alloc(length));
  }

  async flush(): Promise<void> {
    this.assertOpen();
    await flushToDisk(this.file);
  }

  /**
   * Idle clean (the generic layer calls it after a while without writes): flushes,
   * then clears need-check durably. The next allocating write sets it again first
   * (setNeedCheck). Under the allocation lock, so no allocation is halfway.
   */
  async markClean(): Promise<void> {
    await this.allocationLock.runExclusive(async () => {
      if (this.closed || this.file.readOnly) return;
      if (!this.needCheck) {
        await flushToDisk(this.file);
        return;
      }
      await this.clearNeedCheck();
      log('%s: need-check cleared (idle)', this.file.path);
    });
  }

  /**
   * Flushes, then clears QED_F_NEED_CHECK on disk and flushes again. The bit is
   * clear in memory before the header write: after a failure the next allocation
   * writes the header (with the bit) again.
   */
  private async clearNeedCheck(): Promise<void> {
    await flushToDisk(this.file);
    this.header = { ...this.header, features: this.header.features & ~QED_F_NEED_CHECK };
    await writeHeader(this.file, this.header);
    await flushToDisk(this.file);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.allocationLock.runExclusive(async () => {
      this.closed = true;
      try {
        if (!this.file.readOnly && this.needCheck) {
          await this.clearNeedCheck();
          log('%s: need-check cleared on close', this.file.path);
        }
      } finally {
        await this.file.close();
      }
    });
  }

  info(): FormatInfo {
    return {
      clusterSize: this.geometry.clusterSize,
      dirty: this.needCheck,
      specific: {
        'table-size': this.header.tableSize,
        'header-size': this.header.headerSize,
        'l1-table-offset': this.header.l1TableOffset,
        features: describeFeatures(this.header.features),
      },
    };
  }

  private assertOpen(): void {
    if (this.closed) throw new BlockError(`${this.file.path}: image is closed`, osConstants.errno.EBADF);
  }
}
