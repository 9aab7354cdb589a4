/**
 * When the L2 entries a writable qcow2 image sets in memory reach the file
 * (without lazy refcounts; writable.ts explains the order on disk): after an
 * fdatasync that makes their data and refcounts durable, shared by every entry
 * pending then. A persist runs at a guest flush (`soon`), a second after the
 * first pending entry, when many are pending (pending-links.ts says how many),
 * and at close (`persistLocked`).
 *
 * A persist does not hold the allocation lock across its fdatasync: under the
 * lock the refcounts are written back and the pending entries detached with a
 * copy of their bytes; the file is flushed with the lock free, so allocating
 * writes go on (setting new entries, even in the same tables); then, under the
 * lock again, the detached copy is written, exactly what was pending when the
 * flush began, and what those entries replaced is released. Holding the lock
 * across the flush stalled sequential 1 MiB allocating writes for 100-280 ms
 * every second (docs/formats/qcow2.md).
 *
 * Concurrency: `add` and `persistLocked` are called with the allocation lock
 * held; `soon` takes it itself. One persist runs at a time, in order (a later
 * one's older copy must never land over a newer one's entries); a call while
 * one waits to start shares it. `persistLocked` writes the pending entries
 * directly, so it runs only once no detached persist can be in flight: at
 * close, after `beginClose`, which also stops new persists from starting.
 */
import type { Mutex } from 'async-mutex';
import createDebug from 'debug';
import type { TableHandle } from '../../cache/table-cache.js';
import { PendingLinks, type DetachedLinks } from './pending-links.js';
import type { Refcounts } from './refcounts.js';

const log = createDebug('imgmount:qcow2');

/** Pending L2 entries are written this long after the first of them at the latest (or sooner when many wait). */
const LINK_DELAY_MS = 1000;

/** What a persist needs of the image. */
export interface PersistTarget {
  /** The image's allocation lock. */
  readonly lock: Mutex;
  readonly refcounts: Refcounts;
  /** Makes guest data durable (the data file too) and tells the refcounts a flush happened. */
  flushData(): Promise<void>;
  /** Writes L2 entry bytes at a file offset. */
  writeEntries(offset: number, bytes: Buffer): Promise<void>;
  isClosed(): boolean;
  readonly path: string;
}

export class LinkPersister {
  private readonly pending: PendingLinks;
  private timer: NodeJS.Timeout | undefined;
  /** The persists, one after the other; never rejects. */
  private persisting: Promise<void> = Promise.resolve();
  /** The persist waiting for the one before it to finish: later calls share it. */
  private queued: Promise<void> | undefined;
  private closingNow = false;

  constructor(
    private readonly target: PersistTarget,
    entryBytes: number,
  ) {
    this.pending = new PendingLinks(entryBytes);
  }

  /** Nothing waits to be written. */
  get empty(): boolean {
    return this.pending.empty;
  }

  /** Set by `beginClose`: no persist starts from then on but close's own. */
  get closing(): boolean {
    return this.closingNow;
  }

  /**
   * Records entries [first, end) of the table at `tableOffset`, just set in memory, and the
   * releases of what they replaced; starts a persist when many are pending, else makes sure
   * one comes within LINK_DELAY_MS. Under the allocation lock.
   */
  async add(tableOffset: number, first: number, end: number, pin: () => Promise<TableHandle<Buffer>>, releases: (() => Promise<void>)[]): Promise<void> {
    await this.pending.add(tableOffset, first, end, pin, releases);
    if (this.pending.due) this.inBackground();
    else this.timer ??= setTimeout(() => this.inBackground(), LINK_DELAY_MS).unref();
  }

  /** Before taking the allocation lock: with far more pending than a persist takes at once, wait for one (pinned tables stay bounded). */
  async throttle(): Promise<void> {
    if (this.pending.overfull && !this.closingNow) await this.soon().catch(() => undefined);
  }

  /** Persists every entry pending now (after the persist in flight, if any). Not under the allocation lock. */
  soon(): Promise<void> {
    if (this.queued) return this.queued;
    const next = this.persisting.then(() => {
      this.queued = undefined;
      return this.persistDetached();
    });
    this.queued = next;
    this.persisting = next.catch(() => undefined);
    return next;
  }

  /** Close begins: no persist starts from now on, and the one in flight (if any) ends first. */
  async beginClose(): Promise<void> {
    this.closingNow = true;
    await this.persisting;
  }

  /** Flushes, writes every pending entry, releases what they replaced. Under the lock, after `beginClose`. */
  async persistLocked(): Promise<void> {
    this.stopTimer();
    const { refcounts } = this.target;
    await refcounts.writeBack();
    if (!this.pending.empty) {
      await this.target.flushData();
      await this.pending.drain((offset, bytes) => this.target.writeEntries(offset, bytes));
      // The decrements go to disk now too (after their entries; a crash before leaves leaks only).
      await refcounts.writeBack();
    }
    // Freed clusters an earlier flush made durable: punched and reusable now.
    if (refcounts.reclaimable) await refcounts.reclaim();
  }

  private inBackground(): void {
    this.stopTimer();
    if (this.target.isClosed() || this.closingNow) return;
    this.soon().catch((error: unknown) => {
      log('%s: writing pending L2 entries failed (retried at the next flush): %s', this.target.path, (error as Error).message);
    });
  }

  private stopTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private async persistDetached(): Promise<void> {
    const { lock, refcounts } = this.target;
    let batch: DetachedLinks | undefined;
    await lock.runExclusive(async () => {
      if (this.target.isClosed()) return;
      this.stopTimer();
      await refcounts.writeBack();
      if (!this.pending.empty) batch = this.pending.detach();
    });
    if (!batch) return;
    const detached = batch;
    try {
      await this.target.flushData();
    } catch (error) {
      await lock.runExclusive(async () => detached.restore(this.pending));
      throw error;
    }
    await lock.runExclusive(async () => {
      await detached.write((offset, bytes) => this.target.writeEntries(offset, bytes), this.pending);
      // The decrements go to disk now too (after their entries; a crash before leaves leaks only).
      await refcounts.writeBack();
      // Freed clusters an earlier flush made durable: punched and reusable now.
      if (refcounts.reclaimable) await refcounts.reclaim();
    });
  }
}
