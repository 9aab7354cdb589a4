/**
 * DecodedClusterCache: decoded (decompressed) clusters, bounded by bytes, so a
 * sequential read in 4 KiB requests decodes each compressed cluster once, not
 * once per request.
 *
 * Policy: least recently used clusters go first once the bound is passed
 * (lru-cache sized by each buffer's length; a cluster larger than the bound is
 * still kept alone, the bound is raised to one cluster). Concurrent misses of
 * one cluster share a single decode through the `inFlight` map, which lives
 * beside the LRU, so eviction can never abort a decode somebody waits for. A
 * failed decode is not cached. Decoded buffers are never handed out: callers
 * copy the bytes they need, so nobody can change a cached cluster.
 */
import { LRUCache } from 'lru-cache';
import type { EncodedCluster } from './types.js';

export const DEFAULT_DECODED_CACHE_BYTES = 16 * 1024 * 1024;

export class DecodedClusterCache {
  private readonly lru: LRUCache<string, Buffer>;
  private readonly inFlight = new Map<string, Promise<Buffer>>();

  constructor(
    private readonly decode: (cluster: EncodedCluster, parallel: boolean) => Promise<Buffer>,
    maxBytes = DEFAULT_DECODED_CACHE_BYTES,
  ) {
    this.lru = new LRUCache<string, Buffer>({
      maxSize: Math.max(1, maxBytes),
      maxEntrySize: Number.MAX_SAFE_INTEGER,
      sizeCalculation: (buffer) => Math.max(1, Math.min(buffer.length, maxBytes)),
    });
  }

  /** Copies `target.length` decoded bytes starting at `offsetInCluster` into `target`; `parallel`: as FormatImage.decode's. */
  async read(cluster: EncodedCluster, offsetInCluster: number, target: Buffer, parallel = false): Promise<void> {
    const decoded = await this.get(cluster, parallel);
    decoded.copy(target, 0, offsetInCluster, offsetInCluster + target.length);
  }

  /** Starts decoding `cluster` unless it is cached or being decoded; resolves when done, failed or not. */
  prefetch(cluster: EncodedCluster, parallel: boolean): Promise<void> {
    if (this.lru.has(cluster.key) || this.inFlight.has(cluster.key)) return Promise.resolve();
    return this.get(cluster, parallel).then(
      () => undefined,
      () => undefined, // the read that needs the cluster decodes it again and reports the failure
    );
  }

  private get(cluster: EncodedCluster, parallel: boolean): Promise<Buffer> {
    const cached = this.lru.get(cluster.key);
    if (cached) return Promise.resolve(cached);
    let pending = this.inFlight.get(cluster.key);
    if (!pending) {
      pending = this.decode(cluster, parallel).then(
        (decoded) => {
          this.inFlight.delete(cluster.key);
          this.lru.set(cluster.key, decoded);
          return decoded;
        },
        (error: unknown) => {
          this.inFlight.delete(cluster.key);
          throw error;
        },
      );
      this.inFlight.set(cluster.key, pending);
    }
    return pending;
  }
}
