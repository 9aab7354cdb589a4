/**
 * An opened qcow (version 1) image, read-only: guest offsets go through the
 * L1 table (read whole at open) and L2 tables (loaded on demand through a
 * bounded TableCache). An L2 entry is 0 (unallocated: the backing file or
 * zeros), a cluster offset (data stored as is), or, with bit 63 set, a
 * compressed cluster: its compressed byte count in the bits above
 * 63 - cluster_bits and its offset below, raw deflate (window 2^12, as qemu
 * writes it) that decodes to one whole cluster.
 *
 * Every table entry is checked before it is used: L2 tables and data inside
 * the file, data sector-aligned (as qemu requires) and never on the header
 * or the L1 table; a bad entry fails the request naming the entry.
 *
 * Concurrency: nothing is written, so reads run concurrently without locks;
 * the table cache shares one load of a table among concurrent readers.
 */
import createDebug from 'debug';
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, EncodedCluster, FormatImage, FormatInfo, Mapping, OpenOptions, Protocol } from '../../block/types.js';
import { TableCache } from '../../cache/table-cache.js';
import { HEADER_BYTES, virtualSize, type QcowHeader } from './header.js';
import { appendRun } from '../../block/mapping.js';
import { ReadOnlyImage } from '../read-only-image.js';

const log = createDebug('imgmount:qcow');

/** Default bound of the L2 cache: 4 MiB (qemu keeps 16 tables). */
export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;

const COMPRESSED = 1n << 63n;

export class QcowImage extends ReadOnlyImage implements FormatImage {
  readonly virtualSize: number;
  readonly clusterSize: number;
  private readonly l2Bytes: number;
  private readonly l2Span: number;
  private readonly l2Cache: TableCache<Buffer>;
  private readonly metadataEnd: number;

  constructor(
    file: Protocol,
    private readonly header: QcowHeader,
    private readonly l1: Buffer,
    private readonly fileSize: number,
    readonly backing: BackingReference | undefined,
    options: OpenOptions,
  ) {
    super(file);
    this.virtualSize = virtualSize(header);
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Bytes = 8 * 2 ** header.l2Bits;
    this.l2Span = this.clusterSize * 2 ** header.l2Bits;
    this.metadataEnd = header.l1TableOffset + header.l1Size * 8;
    const l2Bytes = this.l2Bytes;
    this.l2Cache = new TableCache<Buffer>({
      maxBytes: options.metadataCacheBytes ?? DEFAULT_L2_CACHE_BYTES,
      tableBytes: l2Bytes,
      sizeOf: (table) => table.length,
      load: async (offset) => {
        const table = Buffer.alloc(l2Bytes);
        await file.read(offset, table);
        return table;
      },
    });
    const raised = this.l2Cache.raisedNotice(file.path, l2Bytes);
    if (raised) (options.notice ?? ((line: string) => log(line)))(raised);
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1Index = Math.floor(pos / this.l2Span);
      const spanEnd = Math.min(end, (l1Index + 1) * this.l2Span);
      const l2Offset = this.l1.readBigUInt64BE(l1Index * 8);
      if (l2Offset === 0n) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length: spanEnd - pos });
      } else {
        const at = this.checkedTable(l2Offset, l1Index);
        const from = pos;
        await this.l2Cache.read(at, (table) => this.mapInTable(table, from, spanEnd, runs));
      }
      pos = spanEnd;
    }
    return runs;
  }

  private checkedTable(l2Offset: bigint, l1Index: number): number {
    const where = `${this.file.path}: qcow L1 entry ${l1Index} (guest bytes ${l1Index * this.l2Span}..)`;
    if (l2Offset > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${where} points to ${l2Offset}, above 2^53-1`);
    const at = Number(l2Offset);
    if (at + this.l2Bytes > this.fileSize) {
      throw new CorruptImageError(`${where} points to an L2 table at ${at}, whose ${this.l2Bytes} bytes run past the end of the ${this.fileSize}-byte file`);
    }
    if (this.onMetadata(at, this.l2Bytes)) throw new CorruptImageError(`${where} points to an L2 table at ${at}, on the header or the L1 table`);
    return at;
  }

  private mapInTable(table: Buffer, start: number, end: number, runs: Mapping[]): void {
    const c = this.clusterSize;
    let pos = start;
    while (pos < end) {
      const clusterStart = pos - (pos % c);
      const clusterEnd = Math.min(end, clusterStart + c);
      const length = clusterEnd - pos;
      const entry = table.readBigUInt64BE(((clusterStart % this.l2Span) / c) * 8);
      if (entry === 0n) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length });
      } else if (entry & COMPRESSED) {
        runs.push({ kind: 'encoded', guestOffset: pos, length, cluster: this.compressedCluster(entry, clusterStart) });
      } else {
        const host = this.checkedData(entry, clusterStart);
        appendRun(runs, { kind: 'data', guestOffset: pos, length, hostOffset: host + (pos - clusterStart) });
      }
      pos = clusterEnd;
    }
  }

  /** True when [at, at + length) overlaps the header or the L1 table. */
  private onMetadata(at: number, length: number): boolean {
    return at < HEADER_BYTES || (at < this.metadataEnd && at + length > this.header.l1TableOffset);
  }

  private corrupt(clusterStart: number, problem: string): CorruptImageError {
    return new CorruptImageError(`${this.file.path}: qcow L2 entry for guest offset ${clusterStart} ${problem}`);
  }

  private checkedData(entry: bigint, clusterStart: number): number {
    if (entry > BigInt(Number.MAX_SAFE_INTEGER)) throw this.corrupt(clusterStart, `points to ${entry}, above 2^53-1`);
    const host = Number(entry);
    if (host % 512 !== 0) throw this.corrupt(clusterStart, `points to ${host}, which is not a multiple of 512`);
    if (host >= this.fileSize) throw this.corrupt(clusterStart, `points to ${host}, past the end of the ${this.fileSize}-byte file`);
    if (this.onMetadata(host, this.clusterSize)) {
      throw this.corrupt(clusterStart, `points to ${host}, on the header or the L1 table`);
    }
    return host;
  }

  private compressedCluster(entry: bigint, clusterStart: number): EncodedCluster {
    const shift = BigInt(63 - this.header.clusterBits);
    const hostOffset = Number(entry & ((1n << shift) - 1n));
    const stored = Number((entry >> shift) & BigInt(this.clusterSize - 1));
    if (hostOffset >= this.fileSize) throw this.corrupt(clusterStart, `is compressed at ${hostOffset}, past the end of the ${this.fileSize}-byte file`);
    if (this.onMetadata(hostOffset, Math.max(1, stored))) throw this.corrupt(clusterStart, `is compressed at ${hostOffset}, on the header or the L1 table`);
    if (stored === 0) throw this.corrupt(clusterStart, 'is compressed with a size of 0 bytes');
    return {
      key: `${hostOffset}+${stored}`,
      guestStart: clusterStart,
      decodedLength: this.clusterSize,
      hostOffset,
      hostLength: Math.min(stored, this.fileSize - hostOffset),
    };
  }

  async decode(cluster: EncodedCluster): Promise<Buffer> {
    const data = Buffer.alloc(cluster.hostLength);
    await this.file.read(cluster.hostOffset, data);
    let out: Buffer;
    try {
      out = inflateRawSync(data, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: cluster.decodedLength });
    } catch (error) {
      throw new CorruptImageError(
        `${this.file.path}: qcow compressed cluster for guest offset ${cluster.guestStart} (host offset ${cluster.hostOffset}) does not decode: ${(error as Error).message}`,
      );
    }
    if (out.length !== cluster.decodedLength) {
      throw new CorruptImageError(
        `${this.file.path}: qcow compressed cluster for guest offset ${cluster.guestStart} (host offset ${cluster.hostOffset}) decodes to ${out.length} bytes, not the cluster size ${cluster.decodedLength}`,
      );
    }
    return out;
  }

  info(): FormatInfo {
    // qcow has no dirty state; qemu-img shows "dirty-flag": false for it all the same.
    return { clusterSize: this.clusterSize, dirty: false };
  }
}
