/**
 * An opened qcow2 image (read-only in this release): translation of guest
 * offsets through the L1 table and cached L2 tables into runs of data (in the
 * image file or its external data file), zeros, compressed clusters and
 * backing ranges, plus decoding of compressed clusters and `info`.
 *
 * Damaged metadata fails only the requests that meet it: an L1 or L2 entry
 * that is unaligned, points outside the file or into metadata, or has an
 * impossible subcluster bitmap raises CorruptImageError (EIO) for a request
 * touching that range; everything else keeps reading.
 *
 * Concurrency: reads never take a lock. L2 tables come from the shared table
 * cache (a cached table is used synchronously through `peek`; a miss pins it
 * for the duration of the lookup). Nothing is written, so no ordering rules
 * apply yet; writing will follow QED's (allocations serialized, data before
 * the L2 entry, L2 before L1).
 */
import { announce } from '../../block/events.js';
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, EncodedCluster, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import { TableCache } from '../../cache/table-cache.js';
import { decompressCluster } from '../../block/codecs.js';
import { classify, Geometry, Kind, L2E_COPIED_HIGH, offsetBits, wordAt } from './geometry.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, AUTOCLEAR_DATA_FILE_RAW, type Qcow2Header } from './header.js';
import type { Qcow2Extensions } from './extensions.js';
import type { MetadataClusters } from './metadata.js';
import type { Qcow2Snapshot } from './snapshots.js';
import type { BitmapInfo } from './bitmaps.js';
import { appendRun } from '../../block/mapping.js';

const log = createDebug('imgmount:qcow2');

/** Default L2 cache bound: 16 MiB covers 128 GiB of guest data with 64 KiB clusters. */
export const DEFAULT_L2_CACHE_BYTES = 16 * 1024 * 1024;

export interface Qcow2Parts {
  file: Protocol;
  header: Qcow2Header;
  extensions: Qcow2Extensions;
  geometry: Geometry;
  /** The L1 table in use (the active one, or a snapshot's). */
  l1: Buffer;
  l1Entries: number;
  virtualSize: number;
  fileSize: number;
  /** The external data file, when the image has one (opened through the gate). */
  dataFile?: Protocol;
  metadata: MetadataClusters;
  backing: BackingReference | undefined;
  snapshots: Qcow2Snapshot[];
  /** Persistent dirty bitmaps, when the image has a consistent bitmap directory. */
  bitmaps?: BitmapInfo[];
  metadataCacheBytes?: number;
  notice?: (line: string) => void;
}

export class Qcow2Image implements FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined;
  protected readonly file: Protocol;
  protected header: Qcow2Header;
  protected readonly geometry: Geometry;
  /** The L1 table in use; a writable image changes its entries in place (main thread). */
  protected readonly l1: Buffer;
  protected readonly l1Entries: number;
  /** Host bytes that metadata may reference (the file size; a writable image raises it as it allocates). */
  protected fileSize: number;
  protected readonly dataFile: Protocol | undefined;
  protected readonly metadata: MetadataClusters;
  protected readonly l2Cache: TableCache<Buffer>;
  protected closed = false;

  constructor(protected readonly parts: Qcow2Parts) {
    this.file = parts.file;
    this.header = parts.header;
    this.geometry = parts.geometry;
    this.l1 = parts.l1;
    this.l1Entries = parts.l1Entries;
    this.virtualSize = parts.virtualSize;
    this.fileSize = parts.fileSize;
    this.dataFile = parts.dataFile;
    this.metadata = parts.metadata;
    this.backing = parts.backing;
    const tableBytes = this.geometry.clusterSize;
    this.l2Cache = new TableCache<Buffer>({
      maxBytes: parts.metadataCacheBytes ?? DEFAULT_L2_CACHE_BYTES,
      tableBytes,
      sizeOf: (table) => table.length,
      load: async (offset) => {
        const table = Buffer.alloc(tableBytes);
        announce(this.file, 'l2_load');
        await this.file.read(offset, table);
        return table;
      },
    });
    const raised = this.l2Cache.raisedNotice(this.file.path, tableBytes);
    if (raised) (parts.notice ?? ((line: string) => log(line)))(raised);
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1Index = this.geometry.l1Index(pos);
      const spanEnd = Math.min(end, (l1Index + 1) * this.geometry.l2Span);
      const l2Offset = this.l2TableOffset(l1Index);
      if (l2Offset === 0) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length: spanEnd - pos });
      } else {
        const from = pos;
        await this.l2Cache.read(l2Offset, (table) => this.mapInTable(table, from, spanEnd, runs));
      }
      pos = spanEnd;
    }
    return runs;
  }

  /** The L2 table offset of L1 entry `l1Index`; 0 when unallocated; CorruptImageError when impossible. */
  protected l2TableOffset(l1Index: number): number {
    if (l1Index >= this.l1Entries) return 0;
    const [high, low] = wordAt(this.l1, l1Index * 8);
    const offset = offsetBits(high, low);
    if (offset === 0) return 0;
    const { clusterSize } = this.geometry;
    if (offset < 0 || offset % clusterSize !== 0 || offset + clusterSize > this.fileSize || offset < clusterSize) {
      throw new CorruptImageError(
        `${this.file.path}: L1 entry ${l1Index} (guest bytes from ${l1Index * this.geometry.l2Span}) points to an L2 table at ${offset < 0 ? 'an offset above 2^53' : offset}, which is unaligned or outside the file`,
      );
    }
    return offset;
  }

  private mapInTable(table: Buffer, start: number, end: number, runs: Mapping[]): void {
    const g = this.geometry;
    let pos = start;
    while (pos < end) {
      const clusterStart = g.clusterStart(pos);
      const clusterEnd = Math.min(end, clusterStart + g.clusterSize);
      const entryAt = g.l2Index(pos) * g.l2EntryBytes;
      const [high, low] = wordAt(table, entryAt);
      let zeroBits = 0;
      let allocBits = 0;
      if (g.extendedL2) [zeroBits, allocBits] = wordAt(table, entryAt + 8);
      if (!g.extendedL2 || (high & 0x40000000) !== 0) {
        this.pushCluster(runs, classify(g, high, low, 0, 0, 0), high, low, clusterStart, pos, clusterEnd);
      } else {
        while (pos < clusterEnd) {
          const sub = Math.floor((pos - clusterStart) / g.subclusterSize);
          const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * g.subclusterSize);
          this.pushCluster(runs, classify(g, high, low, zeroBits, allocBits, sub), high, low, clusterStart, pos, subEnd);
          pos = subEnd;
        }
      }
      pos = clusterEnd;
    }
  }

  /** Appends the run for [from, to) of the cluster at `clusterStart`, whose entry is (high, low) of kind `kind`. */
  private pushCluster(runs: Mapping[], kind: Kind, high: number, low: number, clusterStart: number, from: number, to: number): void {
    const length = to - from;
    switch (kind) {
      case Kind.Unallocated:
      case Kind.Zero: {
        const run: Extract<Mapping, { kind: 'zero' | 'backing' }> = { kind: kind === Kind.Zero ? 'zero' : 'backing', guestOffset: from, length };
        // Host space that stays allocated under zeros or an unallocated subcluster: qemu-img map shows its offset.
        const hostCluster = offsetBits(high, low);
        const allocated = hostCluster > 0 || (this.dataFile !== undefined && hostCluster === 0 && (high & L2E_COPIED_HIGH) !== 0);
        if (allocated && hostCluster % this.geometry.clusterSize === 0) {
          run.hostOffset = hostCluster + (from - clusterStart);
          if (this.dataFile) run.file = this.dataFile;
        }
        appendRun(runs, run);
        return;
      }
      case Kind.Normal: {
        const hostCluster = this.validDataCluster(high, low, clusterStart);
        const run: Mapping = { kind: 'data', guestOffset: from, length, hostOffset: hostCluster + (from - clusterStart) };
        if (this.dataFile) run.file = this.dataFile;
        appendRun(runs, run);
        return;
      }
      case Kind.Compressed:
        runs.push({ kind: 'encoded', guestOffset: from, length, cluster: this.compressedCluster(high, low, clusterStart) });
        return;
      case Kind.Invalid:
        throw this.corrupt(clusterStart, 'has an impossible subcluster bitmap (a subcluster both allocated and zero, or allocated in an unallocated cluster)');
    }
  }

  protected validDataCluster(high: number, low: number, clusterStart: number): number {
    const offset = offsetBits(high, low);
    const { clusterSize } = this.geometry;
    if (offset < 0) throw this.corrupt(clusterStart, 'points to an offset above 2^53');
    if (offset % clusterSize !== 0) throw this.corrupt(clusterStart, `points to ${offset}, which is not aligned to the cluster size ${clusterSize}`);
    if (this.dataFile) return offset;
    if (offset >= this.fileSize) throw this.corrupt(clusterStart, `points to ${offset}, past the end of the file (${this.fileSize} bytes)`);
    if (this.metadata.contains(offset)) throw this.corrupt(clusterStart, `points to ${offset}, which holds the image's metadata`);
    return offset;
  }

  /** How many times the host cluster at `offset` was handed out again while open (writable.ts); 0 for a reader. */
  protected hostGeneration(_offset: number): number {
    return 0;
  }

  protected compressedCluster(high: number, low: number, clusterStart: number): EncodedCluster {
    if (this.dataFile) throw this.corrupt(clusterStart, 'is compressed, which images with an external data file cannot be');
    const { hostOffset, length } = this.geometry.compressedExtent(high, low);
    if (hostOffset >= this.fileSize) throw this.corrupt(clusterStart, `is compressed at ${hostOffset}, past the end of the file (${this.fileSize} bytes)`);
    if (this.metadata.contains(hostOffset)) throw this.corrupt(clusterStart, `is compressed at ${hostOffset}, which holds the image's metadata`);
    return {
      key: `${hostOffset}+${length}#${this.hostGeneration(hostOffset)}`,
      guestStart: clusterStart,
      decodedLength: this.geometry.clusterSize,
      hostOffset,
      // The last sector may run past the end of the file (legal); only what is there is read.
      hostLength: Math.min(length, this.fileSize - hostOffset),
    };
  }

  async decode(cluster: EncodedCluster, parallel = false): Promise<Buffer> {
    const data = Buffer.alloc(cluster.hostLength);
    announce(this.file, 'read_aio');
    await this.file.read(cluster.hostOffset, data);
    try {
      return await decompressCluster(this.header.compressionType === 'zstd' ? 'zstd' : 'deflate', data, cluster.decodedLength, parallel);
    } catch (error) {
      throw new CorruptImageError(
        `${this.file.path}: the compressed cluster for guest offset ${cluster.guestStart} (host offset ${cluster.hostOffset}): ${(error as Error).message}`,
      );
    }
  }

  protected corrupt(clusterStart: number, problem: string): CorruptImageError {
    return new CorruptImageError(`${this.file.path}: the L2 entry for guest offset ${clusterStart} ${problem}`);
  }

  async flush(): Promise<void> {
    // Read-only: nothing to make durable.
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    log('closing %s', this.file.path);
    await this.file.close();
  }

  info(): FormatInfo {
    const { extensions } = this.parts;
    const header = this.header;
    const specific: Record<string, unknown> = { compat: header.version === 3 ? '1.1' : '0.10', 'compression-type': header.compressionType };
    if (header.version === 3) specific['lazy-refcounts'] = (header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
    if (this.parts.bitmaps) specific.bitmaps = this.parts.bitmaps;
    specific['refcount-bits'] = 2 ** header.refcountOrder;
    if (extensions.dataFile !== undefined) {
      specific['data-file'] = extensions.dataFile;
      specific['data-file-raw'] = (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    if (header.version === 3) {
      specific.corrupt = (header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
      specific['extended-l2'] = this.geometry.extendedL2;
    }
    return {
      clusterSize: this.geometry.clusterSize,
      dirty: (header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      specific,
      snapshots: this.parts.snapshots.length > 0 ? this.parts.snapshots.map(({ l1TableOffset: _l1, l1Size: _size, ...snapshot }) => snapshot) : undefined,
    };
  }
}
