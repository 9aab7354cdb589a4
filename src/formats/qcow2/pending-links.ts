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
 * Concurrency: used under the image's allocation lock only.
 */
import type { TableHandle } from '../../cache/table-cache.js';

/** Pending entries are written once this many tables, or references to drop, wait... */
const MAX_PENDING_TABLES = 64;
const MAX_PENDING_RELEASES = 4096;

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
