/**
 * TableCache: a metadata-table cache (QED L2 tables now, qcow2 later) keyed
 * by the table's host offset and bounded by bytes.
 *
 * Policy:
 * - Least recently used tables are evicted once the byte bound is passed
 *   (the LRU itself is lru-cache's, sized with each table's byte length).
 * - Concurrent misses for the same table share one read: lru-cache keeps the
 *   in-flight Promise, so two readers never load two copies. A failed load
 *   is not cached; the next access tries again.
 * - Tables in use are pinned: `acquire` returns a handle that must be
 *   released. A pinned table evicted from the LRU moves to a side map and is
 *   still found there, so nobody reloads a second copy from disk while the
 *   pinned one is being changed (the double-load race: a stale reload would
 *   hide a fresh allocation and the cluster would be allocated twice).
 * - Write-through: callers change a table only while holding it pinned and
 *   write the changed entries to disk before releasing it; the cache never
 *   holds data that is not on disk, so eviction never writes anything.
 */
import { LRUCache } from 'lru-cache';

export interface TableCacheOptions<Table> {
  /** Upper bound on the bytes of unpinned tables kept. */
  maxBytes: number;
  sizeOf(table: Table): number;
  load(offset: number): Promise<Table>;
}

/** A pinned table; call `release` exactly once when done with it. */
export interface TableHandle<Table> {
  readonly table: Table;
  release(): void;
}

interface Pin<Table> {
  table: Table;
  count: number;
}

export class TableCache<Table extends object> {
  private readonly lru: LRUCache<number, Table>;
  private readonly pins = new Map<number, Pin<Table>>();

  constructor(options: TableCacheOptions<Table>) {
    this.lru = new LRUCache<number, Table>({
      maxSize: Math.max(1, options.maxBytes),
      sizeCalculation: (table) => Math.max(1, options.sizeOf(table)),
      fetchMethod: (offset) => options.load(offset),
    });
  }

  /** Returns the table at `offset`, loading it once if absent, pinned until released. */
  async acquire(offset: number): Promise<TableHandle<Table>> {
    let pin = this.pins.get(offset);
    if (!pin) {
      const loaded = await this.lru.fetch(offset);
      if (loaded === undefined) throw new Error(`table load for offset ${offset} returned nothing`);
      pin = this.pins.get(offset);
      if (!pin) {
        pin = { table: loaded, count: 0 };
        this.pins.set(offset, pin);
      }
    }
    pin.count += 1;
    return { table: pin.table, release: () => this.release(offset, pin) };
  }

  /**
   * The table at `offset` if it is held right now, else undefined; no load, no pin.
   * For callers that use the table synchronously (no await before they are done
   * with it): the fast path of lookups.
   */
  peek(offset: number): Table | undefined {
    return this.pins.get(offset)?.table ?? this.lru.get(offset);
  }

  /** Puts a table the caller just wrote to disk (a new allocation) into the cache, pinned. */
  insert(offset: number, table: Table): TableHandle<Table> {
    this.lru.set(offset, table);
    const pin: Pin<Table> = { table, count: 1 };
    this.pins.set(offset, pin);
    return { table, release: () => this.release(offset, pin) };
  }

  /** Forgets every unpinned table (after a repair rewrote tables on disk). */
  clear(): void {
    this.lru.clear();
  }

  /** Number of tables currently held (cached or pinned), for tests and debug output. */
  get size(): number {
    let count = this.lru.size;
    for (const offset of this.pins.keys()) if (!this.lru.has(offset)) count += 1;
    return count;
  }

  /** Bytes of tables held by the LRU. */
  get cachedBytes(): number {
    return this.lru.calculatedSize;
  }

  private release(offset: number, pin: Pin<Table>): void {
    pin.count -= 1;
    if (pin.count > 0) return;
    if (this.pins.get(offset) === pin) this.pins.delete(offset);
    if (!this.lru.has(offset)) this.lru.set(offset, pin.table);
  }
}
