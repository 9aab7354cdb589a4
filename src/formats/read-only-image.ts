/**
 * What the read-only format images (bochs, cloop, parallels, qcow v1) share:
 * nothing to flush, and a close that closes the image's file once.
 *
 * Concurrency: close may be called more than once (and while reads are still
 * settling: the generic layer waits for them first); the first call closes the file.
 */
import type { Protocol } from '../block/types.js';

export abstract class ReadOnlyImage {
  private closed = false;

  constructor(protected readonly file: Protocol) {}

  async flush(): Promise<void> {
    // Read-only: nothing to make durable.
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.close();
  }
}
