/**
 * Crash-state tests: a file protocol that records every write (with a copy of
 * its bytes) and every flush in the order they happen, and the subsets of one
 * flush epoch's writes (which may reach the disk in any order before a crash).
 */
import { FileProtocol } from '../../src/block/file.js';
import type { Protocol } from '../../src/block/types.js';

export interface Recorded {
  offset: number;
  data: Buffer;
}

/** Opens `path` read-write through a protocol that logs each write and flush. */
export async function recordingProtocol(path: string): Promise<{ protocol: Protocol; log: Array<Recorded | 'flush'> }> {
  const inner = await FileProtocol.open(path, false);
  const log: Array<Recorded | 'flush'> = [];
  const protocol: Protocol = {
    path,
    readOnly: false,
    read: (offset, buffer) => inner.read(offset, buffer),
    async write(offset, buffer) {
      log.push({ offset, data: Buffer.from(buffer) });
      await inner.write(offset, buffer);
    },
    async flush() {
      log.push('flush');
      await inner.flush();
    },
    size: () => inner.size(),
    allocatedSize: () => inner.allocatedSize(),
    truncate: (length) => inner.truncate(length),
    close: () => inner.close(),
  };
  return { protocol, log };
}

/** Every subset of `items`. */
export function subsets<T>(items: readonly T[]): T[][] {
  return Array.from({ length: 2 ** items.length }, (_, mask) => items.filter((_, i) => mask & (1 << i)));
}
