/**
 * Decoding ahead of a sequential reader of compressed clusters. A read that
 * starts where the previous one (which met compressed clusters) ended is
 * sequential; then the clusters of the next two read lengths (at least 256
 * KiB, at most 4 MiB ahead of it) start decoding, shared between the calling
 * thread and the decode workers (decode-pool.ts), while the reader is busy
 * with what it got. The worker's round trip (120-160 us on a small VM, more
 * than a 64 KiB cluster takes to decode) is then off the reader's path, and
 * the next read finds its clusters decoded or in flight (the decoded-cluster
 * cache shares an in-flight decode).
 *
 * This module only decides what to decode; BlockImage runs it (mapping the
 * range, counting it as a request in flight, so close waits for it).
 *
 * Concurrency: main thread; `read` is called once per read, in the order the
 * reads were made.
 */

const MIN_AHEAD_BYTES = 256 * 1024;
const MAX_AHEAD_BYTES = 4 * 1024 * 1024;

export class DecodeAhead {
  /** Where a sequential read would start. */
  private expected = -1;
  /** The end of what was already started. */
  private startedTo = 0;

  constructor(
    /** The image's virtual size. */
    private readonly length: number,
    /** Starts decoding the compressed clusters of [offset, offset + length). */
    private readonly start: (offset: number, length: number) => void,
  ) {}

  /** Notes a read of [offset, offset + length) that met compressed clusters. */
  read(offset: number, length: number): void {
    const end = offset + length;
    const sequential = offset === this.expected;
    this.expected = end;
    if (!sequential) {
      this.startedTo = end;
      return;
    }
    const to = Math.min(this.length, end + Math.min(MAX_AHEAD_BYTES, Math.max(MIN_AHEAD_BYTES, 2 * length)));
    const from = Math.max(end, this.startedTo);
    if (to <= from) return;
    this.startedTo = to;
    this.start(from, to - from);
  }
}
