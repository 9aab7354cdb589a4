/**
 * L2 entries a writable qcow2 image has set in memory but not yet on disk,
 * and the references they replaced: what waits for the next fdatasync so
 * that many allocating writes share one (writable.ts explains the order).
 *
 * Each table with pending entries stays pinned in the L2 cache (the handle
 * is held here) until its range is written, so it can never be evicted and
 * reloaded without them. `due` says when the caller should write them now;
 * `drain` writes them in the order the image needs (the caller flushes the
 * file first and drops the references afterwards).
 *
 * `detach` takes everything pending out as a `DetachedLinks` batch, with a
 * copy of each range's bytes as they are at that moment, so the file can be
 * flushed while allocating writes go on (and set new entries, even in the
 * same tables) and the batch's entries written afterwards exactly as they
 * were when their data was made durable; a batch that could not be written
 * is put back (`reattach`).
 *
 * Concurrency: used under the image's allocation lock only; a detached batch
 * is the caller's until written or put back.
 */
import type { TableHandle } from '../../cache/table-cache.js';

/** Pending entries are written once this many tables, or references to drop, wait... */
const MAX_PENDING_TABLES = 64;
const MAX_PENDING_RELEASES = 4096;
/** ...and allocating writes wait for the persist in flight once twice as many do. */
const OVERFULL_FACTOR = 2;

interface PendingTable {
  handle: TableHandle<Buffer>;
  /** Entry indexes [first, end) changed since the table was last written. */
  first: number;
  end: number;
}

export class PendingLinks {
  private readonly tables = new Map<number, PendingTable>();
  private releases: (() => Promise<void>)[] = [];

  constructor(private readonly entryBytes: number) {}

  get empty(): boolean {
    return this.tables.size === 0 && this.releases.length === 0;
  }

  /** True when so much waits that it should be written at once rather than later. */
  get due(): boolean {
    return this.tables.size >= MAX_PENDING_TABLES || this.releases.length >= MAX_PENDING_RELEASES;
  }

  /** True when allocating writes should wait for the persist in flight before adding more. */
  get overfull(): boolean {
    return this.tables.size >= OVERFULL_FACTOR * MAX_PENDING_TABLES || this.releases.length >= OVERFULL_FACTOR * MAX_PENDING_RELEASES;
  }

  /** Takes everything pending out, with each range's bytes copied now; `empty` afterwards. */
  detach(): DetachedLinks {
    const ranges = [...this.tables].map(([offset, pending]): DetachedRange => ({
      tableOffset: offset,
      first: pending.first,
      end: pending.end,
      handle: pending.handle,
      bytes: Buffer.from(pending.handle.table.subarray(pending.first * this.entryBytes, pending.end * this.entryBytes)),
    }));
    const batch = new DetachedLinks(ranges, this.releases, this.entryBytes);
    this.tables.clear();
    this.releases = [];
    return batch;
  }

  /** Puts back what a batch could not write: its unwritten ranges and every release, before what came since. */
  reattach(ranges: DetachedRange[], releases: (() => Promise<void>)[]): void {
    for (const range of ranges) {
      const pending = this.tables.get(range.tableOffset);
      if (pending) {
        pending.first = Math.min(pending.first, range.first);
        pending.end = Math.max(pending.end, range.end);
        range.handle.release(); // the table is pinned already
      } else {
        this.tables.set(range.tableOffset, { handle: range.handle, first: range.first, end: range.end });
      }
    }
    this.releases = [...releases, ...this.releases];
  }

  /** Records entries [first, end) of the table at `offset`; `pin` is called (once per table) for a handle that keeps it cached. */
  async add(offset: number, first: number, end: number, pin: () => Promise<TableHandle<Buffer>>, releases: (() => Promise<void>)[]): Promise<void> {
    const pending = this.tables.get(offset);
    if (pending) {
      pending.first = Math.min(pending.first, first);
      pending.end = Math.max(pending.end, end);
    } else {
      this.tables.set(offset, { handle: await pin(), first, end });
    }
    this.releases.push(...releases);
  }

  /**
   * Writes every pending range with `write` (table by table; on a failure the rest
   * stays pending for the next call), then runs the releases.
   */
  async drain(write: (offset: number, bytes: Buffer) => Promise<void>): Promise<void> {
    for (const [offset, pending] of [...this.tables]) {
      await write(offset + pending.first * this.entryBytes, pending.handle.table.subarray(pending.first * this.entryBytes, pending.end * this.entryBytes));
      this.tables.delete(offset);
      pending.handle.release();
    }
    const releases = this.releases;
    this.releases = [];
    for (const release of releases) await release();
  }
}

interface DetachedRange {
  tableOffset: number;
  first: number;
  end: number;
  /** Keeps the table cached (with its entries in memory) until the range is on disk. */
  handle: TableHandle<Buffer>;
  /** The range's bytes when the batch was detached. */
  bytes: Buffer;
}

/** Pending entries taken out by `detach`, written once the file has been flushed. */
export class DetachedLinks {
  constructor(
    private ranges: DetachedRange[],
    private readonly releases: (() => Promise<void>)[],
    private readonly entryBytes: number,
  ) {}

  get empty(): boolean {
    return this.ranges.length === 0 && this.releases.length === 0;
  }

  /** Puts the whole batch back (the flush before it failed). */
  restore(pending: PendingLinks): void {
    pending.reattach(this.ranges, this.releases);
    this.ranges = [];
  }

  /**
   * Writes every range as it was detached, then runs the releases. On a failure the
   * rest (unwritten ranges and every release) goes back into `pending` and the error
   * is thrown. Under the allocation lock.
   */
  async write(write: (offset: number, bytes: Buffer) => Promise<void>, pending: PendingLinks): Promise<void> {
    while (this.ranges.length > 0) {
      const range = this.ranges[0]!;
      try {
        await write(range.tableOffset + range.first * this.entryBytes, range.bytes);
      } catch (error) {
        pending.reattach(this.ranges, this.releases);
        this.ranges = [];
        throw error;
      }
      this.ranges.shift();
      range.handle.release();
    }
    for (const release of this.releases) await release();
  }
}
