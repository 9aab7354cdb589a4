/**
 * Reading the log-writes filter's record for write ordering: where an L2 entry
 * was written, and whether a flush ended between two records.
 */
import { expect } from 'vitest';
import type { WriteLog, WriteLogRecord } from '../../src/block/filters/write-log.js';

/** The first write whose data holds the big-endian L2 entry for `hostOffset` (COPIED set), 8-byte aligned. */
export function entryWrite(log: WriteLog, hostOffset: number): WriteLogRecord | undefined {
  const entry = Buffer.alloc(8);
  entry.writeBigUInt64BE(BigInt(hostOffset) | (1n << 63n));
  return log.records.find((r) => {
    if (r.kind !== 'write' || r.phase !== 'issued' || !r.data) return false;
    for (let at = (8 - (r.offset % 8)) % 8; at + 8 <= r.data.length; at += 8) if (r.data.subarray(at, at + 8).equals(entry)) return true;
    return false;
  });
}

/** Whether a flush issued after `dataEnd` ended before record `before`. */
export function flushBetween(log: WriteLog, dataEnd: number, before: number): boolean {
  const issued = new Map<number, number>();
  for (const r of log.records.slice(dataEnd + 1, before)) {
    if (r.kind !== 'flush') continue;
    if (r.phase === 'issued') issued.set(r.id, r.index);
    else if (r.phase === 'ended' && issued.has(r.id)) return true;
  }
  return false;
}

/**
 * The data write's end record, and the entry write: the first must precede a flush that ends before the second.
 * `dataAt`: a host offset the data write covers (the cluster's start unless the write began later in it).
 */
export function expectDataFlushedFirst(log: WriteLog, hostOffset: number, dataAt = hostOffset): void {
  const data = log.records.find((r) => r.kind === 'write' && r.phase === 'issued' && r.offset <= dataAt && dataAt < r.offset + r.length && r.length >= 512);
  expect(data, 'the data write').toBeDefined();
  const dataEnd = log.records.find((r) => r.kind === 'write' && r.phase === 'ended' && r.id === data!.id)!;
  const entry = entryWrite(log, hostOffset);
  expect(entry, 'the L2 entry write').toBeDefined();
  expect(entry!.index).toBeGreaterThan(dataEnd.index);
  expect(flushBetween(log, dataEnd.index, entry!.index), `a flush between the data (record ${dataEnd.index}) and its L2 entry (record ${entry!.index})`).toBe(true);
}
