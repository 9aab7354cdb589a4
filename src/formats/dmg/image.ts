/**
 * An opened DMG: read-only, its chunk table (blkx.ts) held in memory, sorted
 * by guest offset. `map` answers from the table: zero and ignore chunks as
 * zero runs, raw chunks as data runs at their place in the file, compressed
 * chunks (zlib, bzip2, ADC) as encoded runs, one encoded unit per chunk,
 * which the generic layer decodes through `decode` and keeps in its
 * decoded-cluster cache (a chunk may be up to 64 MiB, larger than the cache's
 * bound: the cache then keeps that one chunk alone).
 *
 * Sectors that no chunk covers are a damaged table: qemu answers EIO for
 * them, and so does `map` here, with a message naming the range.
 *
 * Concurrency: nothing changes after open; map and decode keep no state, so
 * any number may run at once (the generic cache shares one decode of a chunk
 * among concurrent readers).
 */
import { CorruptImageError } from '../../block/errors.js';
import type { EncodedCluster, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import type { Chunk } from './blkx.js';
import { decodeChunk } from './decode.js';
import { SECTOR_BYTES, type Trailer } from './trailer.js';

interface DmgCluster extends EncodedCluster {
  readonly chunk: Chunk;
}

export class DmgImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing = undefined;
  private readonly clusters: (DmgCluster | undefined)[];

  constructor(
    private readonly file: Protocol,
    private readonly trailer: Trailer,
    private readonly chunks: readonly Chunk[],
  ) {
    this.virtualSize = trailer.sectorCount * SECTOR_BYTES;
    this.clusters = chunks.map((chunk, i) =>
      chunk.kind === 'zero' || chunk.kind === 'raw'
        ? undefined
        : { key: `dmg:${i}`, guestStart: chunk.guestStart, decodedLength: chunk.guestLength, hostOffset: chunk.hostOffset, hostLength: chunk.hostLength, chunk },
    );
  }

  /** Index of the first chunk that ends after `offset` (chunks.length when none does). */
  private firstEndingAfter(offset: number): number {
    let low = 0;
    let high = this.chunks.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      const chunk = this.chunks[mid]!;
      if (chunk.guestStart + chunk.guestLength <= offset) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let pos = offset;
    for (let i = this.firstEndingAfter(offset); pos < end; i++) {
      const chunk = this.chunks[i];
      if (!chunk || chunk.guestStart > pos) this.uncovered(pos, chunk ? chunk.guestStart : this.virtualSize);
      const runEnd = Math.min(end, chunk.guestStart + chunk.guestLength);
      const runLength = runEnd - pos;
      const cluster = this.clusters[i];
      if (chunk.kind === 'zero') runs.push({ kind: 'zero', guestOffset: pos, length: runLength });
      else if (chunk.kind === 'raw') runs.push({ kind: 'data', guestOffset: pos, length: runLength, hostOffset: chunk.hostOffset + (pos - chunk.guestStart) });
      else runs.push({ kind: 'encoded', guestOffset: pos, length: runLength, cluster: cluster! });
      pos = runEnd;
    }
    return runs;
  }

  private uncovered(from: number, to: number): never {
    throw new CorruptImageError(
      `${this.file.path}: DMG sectors [${Math.floor(from / SECTOR_BYTES)}, ${Math.ceil(to / SECTOR_BYTES)}) (bytes ${from}..${to - 1}) are in no chunk of the blkx table`,
    );
  }

  async decode(cluster: EncodedCluster): Promise<Buffer> {
    const { chunk } = cluster as DmgCluster;
    if (chunk.kind === 'zero' || chunk.kind === 'raw') throw new CorruptImageError(`${this.file.path}: DMG ${chunk.where} is not compressed`);
    const data = Buffer.alloc(chunk.hostLength);
    await this.file.read(chunk.hostOffset, data);
    try {
      return decodeChunk(chunk.kind, data, chunk.guestLength);
    } catch (error) {
      throw new CorruptImageError(
        `${this.file.path}: DMG ${chunk.where} (${chunk.kind}, ${chunk.hostLength} bytes at offset ${chunk.hostOffset}, guest offset ${chunk.guestStart}): ${(error as Error).message}`,
      );
    }
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    await this.file.close();
  }

  info(): FormatInfo {
    return {};
  }
}
