/**
 * TableCache: a metadata-table cache (QED L2 tables now, qcow2 later) keyed
 * by the table's host offset and bounded by bytes.
 *
 * Every table the cache knows is in exactly one of three places:
 * - `loading`: a read from disk in flight. Kept in our own Map, never in the
 *   LRU, so eviction can never abort it; concurrent misses for the same
 *   table share it, so two readers never load two copies. A failed load is
 *   forgotten; the next access tries again. When the load finishes, the
 *   table goes straight to `pins`, already pinned once for every caller
 *   that waited for it.
 * - `pins`: tables in use. `acquire` returns a handle that must be
 *   released. A pinned table is never evicted and never loaded a second
 *   time: every `acquire` finds it here first (the double-load race: a
 *   stale reload would hide a fresh allocation and the cluster would be
 *   allocated twice).
 * - the LRU (lru-cache's, sized with each table's byte length): tables
 *   nobody holds, least recently used evicted first once the byte bound is
 *   passed. Acquiring a cached table moves it to `pins`; releasing the last
 *   handle moves it back.
 * Since a table moves between the three places and is never copied, no
 * stale copy can linger anywhere.
 *
 * The bound is raised to at least MIN_CACHED_TABLES tables when the caller
 * says how big a table is (a smaller bound would reread a table on every
 * request); `raisedFrom` tells the caller so it can say it.
 *
 * Write-through: callers change a table only while holding it pinned and
 * write the changed entries to disk before releasing it; the cache never
 * holds data that is not on disk, so eviction never writes anything.
 */
import { LRUCache } from 'lru-cache';

/** The fewest tables the cache is allowed to hold: a smaller bound is raised to this. */
export const MIN_CACHED_TABLES = 4;

export interface TableCacheOptions<Table> {
  /** Upper bound on the bytes of unpinned tables kept (raised to MIN_CACHED_TABLES tables of `tableBytes`). */
  maxBytes: number;
  /** Bytes of one table, when every table has the same size: sets the smallest bound. */
  tableBytes?: number;
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

interface Load<Table> {
  /** Settles with the pin the load made (counting every waiter), or rejects. */
  promise: Promise<Pin<Table>>;
  /** Callers waiting for this load; each gets one pin count. */
  waiters: number;
}

/** The bound a cache really uses for a requested one: at least MIN_CACHED_TABLES tables. */
export function effectiveCacheBytes(requested: number, tableBytes: number): number {
  return Math.max(Number.isFinite(requested) ? Math.floor(requested) : 0, MIN_CACHED_TABLES * tableBytes, 1);
}

export class TableCache<Table extends object> {
  /** The byte bound in use (after raising). */
  readonly maxBytes: number;
  /** The bound asked for, when it was raised to hold MIN_CACHED_TABLES tables; undefined otherwise. */
  readonly raisedFrom: number | undefined;

  /** The line to tell the user when the bound was raised (undefined when it was not), naming the image. */
  raisedNotice(imagePath: string, tableBytes: number): string | undefined {
    if (this.raisedFrom === undefined) return undefined;
    return (
      `${imagePath}: L2-table cache of ${this.raisedFrom} bytes raised to ${this.maxBytes} bytes` +
      ` (${MIN_CACHED_TABLES} tables of ${tableBytes} bytes, the smallest cache allowed)`
    );
  }
  private readonly lru: LRUCache<number, Table>;
  private readonly pins = new Map<number, Pin<Table>>();
  private readonly loading = new Map<number, Load<Table>>();
  private readonly sizeOf: (table: Table) => number;
  private readonly load: (offset: number) => Promise<Table>;

  constructor(options: TableCacheOptions<Table>) {
    this.maxBytes = effectiveCacheBytes(options.maxBytes, options.tableBytes ?? 0);
    this.raisedFrom = this.maxBytes > options.maxBytes ? options.maxBytes : undefined;
    this.sizeOf = (table) => Math.max(1, options.sizeOf(table));
    this.load = options.load;
    // maxEntrySize defaults to maxSize: a table larger than the whole bound is not kept
    // (only possible without `tableBytes`); it is reloaded when needed again.
    this.lru = new LRUCache<number, Table>({ maxSize: this.maxBytes, sizeCalculation: this.sizeOf });
  }

  /** Returns the table at `offset`, loading it once if absent, pinned until released. */
  async acquire(offset: number): Promise<TableHandle<Table>> {
    const held = this.pinHeld(offset);
    if (held) return held;
    let load = this.loading.get(offset);
    if (!load) {
      load = this.startLoad(offset);
      this.loading.set(offset, load);
    }
    load.waiters += 1;
    // The finished load already counted this caller in the pin's count.
    return this.handle(offset, await load.promise);
  }

  /**
   * The table at `offset` if it is held right now, else undefined; no load, no pin.
   * For callers that use the table synchronously (no await before they are done
   * with it): the fast path of lookups.
   */
  peek(offset: number): Table | undefined {
    return this.pins.get(offset)?.table ?? this.lru.get(offset);
  }

  /**
   * Runs `use` on the table at `offset`: at once when it is held (no pin needed,
   * since `use` is synchronous), else after loading it, pinned while `use` runs.
   * The lookup path of the format drivers.
   */
  async read<Result>(offset: number, use: (table: Table) => Result): Promise<Result> {
    const held = this.peek(offset);
    if (held) return use(held);
    const handle = await this.acquire(offset);
    try {
      return use(handle.table);
    } finally {
      handle.release();
    }
  }

  /** Puts a table the caller just wrote to disk (a new allocation) into the cache, pinned. */
  insert(offset: number, table: Table): TableHandle<Table> {
    if (this.pins.has(offset) || this.loading.has(offset)) {
      throw new Error(`table cache: a table at offset ${offset} is already in use; a new table cannot be inserted there`);
    }
    this.lru.delete(offset);
    const pin: Pin<Table> = { table, count: 1 };
    this.pins.set(offset, pin);
    return this.handle(offset, pin);
  }

  /** Forgets every unpinned table (after a repair rewrote tables on disk). */
  clear(): void {
    this.lru.clear();
  }

  /** Number of tables currently held (cached or pinned), for tests and debug output. */
  get size(): number {
    return this.lru.size + this.pins.size;
  }

  /** Bytes of unpinned tables held by the LRU. */
  get cachedBytes(): number {
    return this.lru.calculatedSize;
  }

  /** A handle on a table already in memory (pinned or cached), or undefined. */
  private pinHeld(offset: number): TableHandle<Table> | undefined {
    let pin = this.pins.get(offset);
    if (pin) {
      pin.count += 1;
      return this.handle(offset, pin);
    }
    const cached = this.lru.get(offset);
    if (cached === undefined) return undefined;
    this.lru.delete(offset);
    pin = { table: cached, count: 1 };
    this.pins.set(offset, pin);
    return this.handle(offset, pin);
  }

  private startLoad(offset: number): Load<Table> {
    const load: Load<Table> = { waiters: 0, promise: Promise.resolve(undefined as unknown as Pin<Table>) };
    load.promise = (async () => {
      try {
        const table = await this.load(offset);
        if (table === undefined || table === null) throw new Error(`table load for offset ${offset} returned nothing`);
        // Nothing else can have put this table anywhere while it was loading (every acquire
        // joined this load), so the loaded table is the only copy.
        const pin: Pin<Table> = { table, count: load.waiters };
        this.pins.set(offset, pin);
        return pin;
      } finally {
        this.loading.delete(offset);
      }
    })();
    return load;
  }

  private handle(offset: number, pin: Pin<Table>): TableHandle<Table> {
    let released = false;
    return {
      table: pin.table,
      release: () => {
        if (released) throw new Error(`table cache: the handle on the table at offset ${offset} was released twice`);
        released = true;
        this.release(offset, pin);
      },
    };
  }

  private release(offset: number, pin: Pin<Table>): void {
    pin.count -= 1;
    if (pin.count > 0) return;
    if (this.pins.get(offset) !== pin) return;
    this.pins.delete(offset);
    this.lru.set(offset, pin.table);
  }
}
