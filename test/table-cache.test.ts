/**
 * The metadata table cache: byte bound, one shared load for concurrent
 * misses, pinned tables survive eviction, failed loads are retried.
 */
import { describe, expect, it } from 'vitest';
import { TableCache } from '../src/cache/table-cache.js';

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
});
