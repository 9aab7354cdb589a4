/**
 * The metadata table cache: byte bound, one shared load for concurrent
 * misses, pinned tables survive eviction, loads in flight survive eviction,
 * a bound below a few tables is raised, failed loads are retried, and under
 * random concurrent use with a tiny bound no caller ever sees a stale or a
 * second copy of a table.
 */
import { setTimeout as delay } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { MIN_CACHED_TABLES, TableCache, type TableHandle } from '../src/cache/table-cache.js';
import { seededRandom } from './helpers/random.js';

function countingCache(maxBytes: number, tableBytes = 100) {
  const loads: number[] = [];
  let failNext = false;
  const cache = new TableCache<Buffer>({
    maxBytes,
    sizeOf: (table) => table.length,
    async load(offset) {
      loads.push(offset);
      await new Promise((resolve) => setTimeout(resolve, 5));
      if (failNext) {
        failNext = false;
        throw new Error('disk error');
      }
      return Buffer.alloc(tableBytes, offset % 256);
    },
  });
  return { cache, loads, failNextLoad: () => (failNext = true) };
}

describe('TableCache', () => {
  it('shares one read between concurrent misses for the same table', async () => {
    const { cache, loads } = countingCache(10_000);
    const handles = await Promise.all(Array.from({ length: 8 }, () => cache.acquire(4096)));
    expect(loads).toEqual([4096]);
    expect(new Set(handles.map((h) => h.table)).size).toBe(1);
    handles.forEach((h) => h.release());
  });

  it('keeps no more unpinned bytes than its bound, evicting the least recently used', async () => {
    const { cache, loads } = countingCache(300);
    for (const offset of [1, 2, 3, 4]) (await cache.acquire(offset)).release();
    expect(cache.cachedBytes).toBeLessThanOrEqual(300);
    (await cache.acquire(4)).release();
    expect(loads).toEqual([1, 2, 3, 4]);
    (await cache.acquire(1)).release();
    expect(loads).toEqual([1, 2, 3, 4, 1]);
  });

  it('never loads a second copy of a pinned table, even after the LRU evicted it', async () => {
    const { cache, loads } = countingCache(150);
    const pinned = await cache.acquire(7);
    pinned.table[0] = 0xee; // a change made while pinned, already written through by the caller
    for (const offset of [8, 9, 10]) (await cache.acquire(offset)).release();
    const again = await cache.acquire(7);
    expect(again.table).toBe(pinned.table);
    expect(again.table[0]).toBe(0xee);
    expect(loads.filter((offset) => offset === 7)).toHaveLength(1);
    again.release();
    pinned.release();
  });

  it('does not cache a failed load; the next access reads again', async () => {
    const { cache, loads, failNextLoad } = countingCache(1000);
    failNextLoad();
    await expect(cache.acquire(5)).rejects.toThrow('disk error');
    const handle = await cache.acquire(5);
    expect(handle.table[0]).toBe(5);
    expect(loads).toEqual([5, 5]);
    handle.release();
  });

  it('serves inserted tables without reading them', async () => {
    const { cache, loads } = countingCache(1000);
    cache.insert(64, Buffer.alloc(100, 9)).release();
    const handle = await cache.acquire(64);
    expect(handle.table[0]).toBe(9);
    expect(loads).toEqual([]);
    handle.release();
  });

  it('finishes a load in flight even when the LRU evicts everything meanwhile', async () => {
    const loads: number[] = [];
    const cache = new TableCache<Buffer>({
      maxBytes: 100,
      sizeOf: (table) => table.length,
      async load(offset) {
        loads.push(offset);
        await delay(offset === 1 ? 60 : 1);
        return Buffer.alloc(100, offset);
      },
    });
    const slow = cache.acquire(1);
    for (let offset = 2; offset < 12; offset++) (await cache.acquire(offset)).release();
    const handle = await slow;
    expect(handle.table[0]).toBe(1);
    const again = await cache.acquire(1);
    expect(again.table).toBe(handle.table);
    expect(loads.filter((offset) => offset === 1)).toHaveLength(1);
    again.release();
    handle.release();
  });

  it(`raises a bound below ${MIN_CACHED_TABLES} tables to ${MIN_CACHED_TABLES} tables and says so`, async () => {
    const loads: number[] = [];
    const cache = new TableCache<Buffer>({
      maxBytes: 1,
      tableBytes: 100,
      sizeOf: (table) => table.length,
      async load(offset) {
        loads.push(offset);
        return Buffer.alloc(100);
      },
    });
    expect(cache.maxBytes).toBe(MIN_CACHED_TABLES * 100);
    expect(cache.raisedFrom).toBe(1);
    for (let round = 0; round < 3; round++) {
      for (let offset = 0; offset < MIN_CACHED_TABLES; offset++) (await cache.acquire(offset)).release();
    }
    expect(loads).toEqual([0, 1, 2, 3]);
    expect(new TableCache<Buffer>({ maxBytes: 1000, tableBytes: 100, sizeOf: (t) => t.length, load: async () => Buffer.alloc(100) }).raisedFrom).toBeUndefined();
  });

  it('never hands out a stale or second copy under random concurrent use with a tiny bound', async () => {
    const random = seededRandom(0xcac4e);
    const TABLES = 24;
    // The "disk": what a load reads. Callers change a table only while pinned, disk first (write-through).
    const disk = Array.from({ length: TABLES }, () => 0);
    const cache = new TableCache<{ version: number }>({
      maxBytes: 1,
      tableBytes: 8,
      sizeOf: () => 8,
      async load(offset) {
        const version = disk[offset]!;
        await delay(random.int(0, 3));
        return { version };
      },
    });
    const live = new Map<number, Set<TableHandle<{ version: number }>>>();
    const problems: string[] = [];
    let changes = 0;
    const worker = async (): Promise<void> => {
      for (let step = 0; step < 150; step++) {
        const offset = random.int(0, TABLES - 1);
        const handle = await cache.acquire(offset);
        const others = live.get(offset) ?? new Set();
        for (const other of others) if (other.table !== handle.table) problems.push(`two copies of table ${offset} pinned at once`);
        if (handle.table.version !== disk[offset]) problems.push(`table ${offset}: version ${handle.table.version} handed out, disk has ${disk[offset]}`);
        others.add(handle);
        live.set(offset, others);
        if (random.int(0, 2) === 0) {
          // The callers serialize changes to one table (QED: the allocation lock); so does this one.
          if (others.size === 1) {
            const next = disk[offset]! + 1;
            await delay(random.int(0, 2));
            disk[offset] = next;
            handle.table.version = next;
            changes += 1;
          }
        } else if (random.int(0, 1) === 0) {
          await delay(random.int(0, 2));
        }
        others.delete(handle);
        handle.release();
        if (cache.cachedBytes > cache.maxBytes) problems.push(`${cache.cachedBytes} bytes cached, bound ${cache.maxBytes}`);
      }
    };
    await Promise.all(Array.from({ length: 16 }, worker));
    expect(problems.slice(0, 5)).toEqual([]);
    expect(changes).toBeGreaterThan(100);
    expect(cache.size).toBeLessThanOrEqual(MIN_CACHED_TABLES);
  });
});
