/**
 * Writing compressed qcow2 clusters (qemu-img convert -c): one whole guest
 * cluster at a time, deflated as qemu does (raw deflate, a 4 KiB window, so
 * qemu's inflate with its 12-bit window reads it), into a cluster that is
 * unallocated (or a zero cluster without a host cluster) only, as qemu
 * requires: a compressed cluster is never written over data.
 *
 * Compressed data is packed: each one goes after the previous one in the
 * current host cluster when it fits there (that cluster gains a reference per
 * compressed cluster in it, which is what qemu-img check counts), else into a
 * newly allocated host cluster. Data compressed to no less than a cluster is
 * written uncompressed, by the ordinary write path, as qemu does.
 *
 * Ordering on disk is the writer's (writable.ts `link`): the compressed bytes
 * and refcounts first, a flush, then the L2 entry.
 *
 * Concurrency: `write` deflates outside the lock, then does every metadata
 * change under the writer's allocation lock (`underLock`). The current packing
 * cluster is forgotten whenever the writer drops a compressed cluster's
 * reference (`forget`), so bytes are never added to a host cluster that may
 * have been freed and handed out again.
 */
import { deflateRaw, constants as zlibConstants } from 'node:zlib';
import { promisify } from 'node:util';
import createDebug from 'debug';
import { InvalidArgumentError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import type { TableHandle } from '../../cache/table-cache.js';
import { classify, Kind, L2E_COMPRESSED_HIGH, offsetBits, wordAt, type Geometry } from './geometry.js';
import type { CompressionType } from './header.js';
import type { Refcounts } from './refcounts.js';

const log = createDebug('imgmount:qcow2');
const deflate = promisify(deflateRaw);

type Table = { offset: number; handle: TableHandle<Buffer> };
type Entry = [high: number, low: number] | [high: number, low: number, zeroBits: number, allocBits: number];

/** What the writer (writable.ts) lends the compressed path. */
export interface CompressedWriteParts {
  file: Protocol;
  geometry: Geometry;
  refcounts: Refcounts;
  compressionType: CompressionType;
  virtualSize: number;
  hasDataFile: boolean;
  /** Runs a metadata change under the writer's allocation lock. */
  underLock(change: () => Promise<void>): Promise<void>;
  /** The L2 table of an L1 index, owned and pinned (allocated or copied when needed). */
  ownedTable(l1Index: number): Promise<Table>;
  /** Sets L2 entries after the data and refcounts are durable (writable.ts `link`). */
  link(table: Table, first: number, entries: Entry[]): Promise<void>;
  /** With lazy refcounts, the dirty bit before the first change. */
  markDirty(): Promise<void>;
  /** The logical end of the file grew (a cluster was allocated). */
  grew(): void;
  /** The ordinary write, for data that does not compress. */
  writePlain(offset: number, data: Buffer): Promise<void>;
}

export class CompressedWriter {
  /** The host cluster being filled with compressed data, and the first free byte in it. */
  private packing: { cluster: number; used: number } | undefined;

  constructor(private readonly parts: CompressedWriteParts) {}

  /** Why compressed clusters cannot be written into this image, or undefined. */
  static refusal(parts: Pick<CompressedWriteParts, 'compressionType' | 'hasDataFile'>): string | undefined {
    if (parts.hasDataFile) return 'images with an external data file cannot hold compressed clusters';
    if (parts.compressionType !== 'zlib') return `compression_type=${parts.compressionType} is read here but not written (only zlib)`;
    return undefined;
  }

  /** A compressed cluster's reference was dropped: its host cluster may be freed, so no more packing into it. */
  forget(): void {
    this.packing = undefined;
  }

  /** Writes the guest cluster at `offset` (cluster-aligned), compressed; `data` is the whole cluster, or up to the end of the image for the last one. */
  async write(offset: number, data: Buffer): Promise<void> {
    const { geometry: g, file } = this.parts;
    const refusal = CompressedWriter.refusal(this.parts);
    if (refusal !== undefined) throw new UnsupportedFeatureError(`${file.path}: cannot write compressed clusters: ${refusal}`);
    const expected = Math.min(g.clusterSize, this.parts.virtualSize - offset);
    if (offset % g.clusterSize !== 0 || data.length !== expected) {
      throw new InvalidArgumentError(`${file.path}: a compressed write must cover one whole cluster (${g.clusterSize} bytes at a multiple of it, less only at the end), not ${data.length} bytes at ${offset}`);
    }
    const cluster = data.length === g.clusterSize ? data : Buffer.concat([data, Buffer.alloc(g.clusterSize - data.length)]);
    const compressed = await deflate(cluster, { windowBits: 12, memLevel: 9, level: zlibConstants.Z_DEFAULT_COMPRESSION });
    if (compressed.length >= g.clusterSize) {
      await this.parts.writePlain(offset, data);
      return;
    }
    await this.parts.underLock(() => this.place(offset, compressed));
  }

  private async place(offset: number, compressed: Buffer): Promise<void> {
    const { geometry: g, file, refcounts } = this.parts;
    const l1Index = g.l1Index(offset);
    const l2Index = g.l2Index(offset);
    const table = await this.parts.ownedTable(l1Index);
    try {
      const [high, low] = wordAt(table.handle.table, l2Index * g.l2EntryBytes);
      const [zeroBits, allocBits] = g.extendedL2 ? wordAt(table.handle.table, l2Index * g.l2EntryBytes + 8) : [0, 0];
      const kinds = new Set<Kind>();
      for (let sub = 0; sub < g.subclustersPerCluster; sub++) kinds.add(classify(g, high, low, zeroBits, allocBits, sub));
      const free = [...kinds].every((kind) => kind === Kind.Unallocated || kind === Kind.Zero) && offsetBits(high, low) === 0;
      if (!free) {
        throw new InvalidArgumentError(`${file.path}: guest offset ${offset} is already allocated; compressed clusters can only be written into unallocated clusters`);
      }
      await this.parts.markDirty();
      let hostOffset: number;
      if (this.packing && this.packing.used + compressed.length <= g.clusterSize) {
        hostOffset = this.packing.cluster + this.packing.used;
        await refcounts.increment(this.packing.cluster, g.clusterSize);
      } else {
        const cluster = await refcounts.allocate(1);
        this.parts.grew();
        this.packing = { cluster, used: 0 };
        hostOffset = cluster;
      }
      this.packing.used += compressed.length;
      await file.write(hostOffset, compressed);
      // Additional 512-byte sectors the data spans after its first, in the bits above the host offset.
      const sectors = Math.floor((hostOffset + compressed.length - 1) / 512) - Math.floor(hostOffset / 512);
      const entry = (1n << 62n) | (BigInt(sectors) << BigInt(62 - (g.clusterBits - 8))) | BigInt(hostOffset);
      const entryHigh = Number(entry >> 32n) >>> 0;
      if (!(entryHigh & L2E_COMPRESSED_HIGH)) throw new Error('compressed entry without its flag'); // cannot happen: bit 62 is set above
      const words: Entry = [entryHigh, Number(entry & 0xffffffffn) >>> 0];
      await this.parts.link(table, l2Index, [g.extendedL2 ? [words[0], words[1], 0, 0] : words]);
      log('%s: cluster at guest %d compressed to %d bytes at host %d', file.path, offset, compressed.length, hostOffset);
    } finally {
      table.handle.release();
    }
  }
}
