/**
 * Buffers for READ replies, kept for reuse: a fresh buffer per READ costs an
 * allocation, its page faults and garbage collection, which showed in
 * profiles of 4 KiB reads (about 7% of the daemon's time with the page cache
 * warm). A buffer comes back only after its reply was written and every read
 * into it has finished (the connection's rule for answering), so no I/O is
 * ever in flight on a buffer handed out again.
 *
 * Only whole-page sizes up to 1 MiB are kept, a few of each, and at most
 * MAX_POOLED_BYTES in all; other sizes are allocated each time.
 *
 * Concurrency: main thread only.
 */

const PAGE = 4096;
const MAX_BUFFER_BYTES = 1024 * 1024;
const MAX_PER_SIZE = 8;
/** Upper bound of the memory kept here. */
const MAX_POOLED_BYTES = 4 * 1024 * 1024;

export class ReadBufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  /** A buffer of `size` bytes with unspecified content: the read fills all of it. */
  take(size: number): Buffer {
    const kept = this.free.get(size)?.pop();
    if (kept === undefined) return Buffer.allocUnsafeSlow(size);
    this.pooledBytes -= size;
    return kept;
  }

  /** Gives back a buffer `take` returned; it may be handed out again at once. */
  give(buffer: Buffer): void {
    const size = buffer.length;
    if (size === 0 || size % PAGE !== 0 || size > MAX_BUFFER_BYTES) return;
    if (buffer.byteOffset !== 0 || buffer.buffer.byteLength !== size) return; // a view: not ours to keep
    if (this.pooledBytes + size > MAX_POOLED_BYTES) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    if (list.length >= MAX_PER_SIZE) return;
    list.push(buffer);
    this.pooledBytes += size;
  }
}
