/**
 * VMDK extents: the pieces of the virtual disk, in order. A flat extent is a
 * plain run of sectors in a file (FLAT, VMFS); a sparse extent (a "KDMV"
 * file) maps each grain through its grain directory (GD) and grain tables
 * (GT), the two-level table of 32-bit sector numbers qemu reads:
 *
 *   GT entry 0                      not stored here (backing file, or zeros)
 *   GT entry 1 with zeroed grains   reads as zeros
 *   GT entry n                      the grain at sector n (compressed: a grain
 *                                   marker {lba u64, size u32} and zlib data)
 *
 * The primary GD (gd_offset) is what qemu reads; the redundant one
 * (rgd_offset) is only ever written beside it (writable.ts), so reading never
 * uses it. A GT or grain outside the file, or a grain below grain_offset
 * (inside the metadata), is refused, naming the entry, for the range it covers.
 *
 * Concurrency: map and decode may run concurrently; grain tables are cached
 * (least recently used first out) as promises, so concurrent misses of one
 * table share one read, and a failed read is not kept.
 */
import { inflateSync } from 'node:zlib';
import { LRUCache } from 'lru-cache';
import { CorruptImageError } from '../../block/errors.js';
import type { EncodedCluster, Mapping, Protocol } from '../../block/types.js';
import { FLAG_MARKER, FLAG_ZERO_GRAIN, COMPRESSION_DEFLATE, SECTOR, type SparseHeader } from './header.js';
import { appendRun } from '../../block/mapping.js';

/** Grain tables cached per sparse extent by default (4 MiB of 512-entry tables). */
const DEFAULT_GT_CACHE_BYTES = 4 * 1024 * 1024;
/** A grain marker: lba (u64), size of the compressed data (u32). */
const GRAIN_MARKER_BYTES = 12;

/** What `info` shows of one extent (qemu-img's format-specific extents). */
export interface ExtentInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  'cluster-size'?: number;
  compressed?: boolean;
}

export interface Extent {
  /** The extent's file. */
  readonly file: Protocol;
  /** Guest bytes the extent holds. */
  readonly length: number;
  /** Grain size in bytes; undefined for flat extents. */
  readonly grainSize: number | undefined;
  readonly compressed: boolean;
  /** Maps [offset, offset + length) of this extent; offsets in the answer are the extent's plus `base`. */
  map(offset: number, length: number, base: number): Promise<Mapping[]>;
  info(): ExtentInfo;
}

/** A FLAT or VMFS extent: guest byte x of the extent is byte flatOffset + x of its file. */
export class FlatExtent implements Extent {
  readonly grainSize = undefined;
  readonly compressed = false;
  constructor(
    readonly file: Protocol,
    readonly length: number,
    readonly flatOffset: number,
    private readonly type: string,
    private readonly own: boolean,
  ) {}

  map(offset: number, length: number, base: number): Promise<Mapping[]> {
    const run: Mapping = { kind: 'data', guestOffset: base + offset, length, hostOffset: this.flatOffset + offset };
    if (!this.own) run.file = this.file;
    return Promise.resolve([run]);
  }

  info(): ExtentInfo {
    return { 'virtual-size': this.length, filename: this.file.path, format: this.type };
  }
}

export interface SparseExtentParts {
  file: Protocol;
  /** True when the extent is the image's own file (its runs name no other file). */
  own: boolean;
  header: SparseHeader;
  gd: Uint32Array;
  fileSize: number;
  /** The extent line's type ('' for a monolithic sparse file, as qemu shows it). */
  type: string;
  /** Identifies the extent in decoded-cluster cache keys. */
  index: number;
  cacheBytes?: number;
}

export class SparseExtent implements Extent {
  readonly file: Protocol;
  readonly length: number;
  readonly grainSize: number;
  readonly compressed: boolean;
  private readonly own: boolean;
  readonly header: SparseHeader;
  private readonly gd: Uint32Array;
  private fileSize: number;
  private readonly type: string;
  private readonly index: number;
  private readonly gtBytes: number;
  /** Guest bytes one grain table covers. */
  private readonly gtCoverage: number;
  readonly zeroGrains: boolean;
  private readonly markers: boolean;
  private readonly tables: LRUCache<number, Promise<Uint32Array>>;

  constructor(parts: SparseExtentParts) {
    this.file = parts.file;
    this.own = parts.own;
    this.header = parts.header;
    this.gd = parts.gd;
    this.fileSize = parts.fileSize;
    this.type = parts.type;
    this.index = parts.index;
    this.length = parts.header.capacity * SECTOR;
    this.grainSize = parts.header.granularity * SECTOR;
    this.compressed = parts.header.compressAlgorithm === COMPRESSION_DEFLATE;
    this.zeroGrains = (parts.header.flags & FLAG_ZERO_GRAIN) !== 0;
    this.markers = (parts.header.flags & FLAG_MARKER) !== 0;
    this.gtBytes = parts.header.numGtesPerGt * 4;
    this.gtCoverage = parts.header.numGtesPerGt * this.grainSize;
    const max = Math.max(1, Math.floor((parts.cacheBytes ?? DEFAULT_GT_CACHE_BYTES) / this.gtBytes));
    this.tables = new LRUCache({ max });
  }

  /** The grain table at GD index `gdIndex`, or undefined when none is allocated. */
  private table(gdIndex: number): Promise<Uint32Array> | undefined {
    const sector = this.gd[gdIndex]!;
    if (sector === 0) return undefined;
    let table = this.tables.get(gdIndex);
    if (!table) {
      table = this.readTable(gdIndex, sector);
      this.tables.set(gdIndex, table);
      table.catch(() => this.tables.delete(gdIndex));
    }
    return table;
  }

  private async readTable(gdIndex: number, sector: number): Promise<Uint32Array> {
    const offset = sector * SECTOR;
    if (offset + this.gtBytes > this.fileSize) {
      throw new CorruptImageError(
        `${this.file.path}: VMDK grain directory entry ${gdIndex} (sector ${sector}) points to a grain table outside the file (${this.fileSize} bytes)`,
      );
    }
    const bytes = Buffer.alloc(this.gtBytes);
    await this.file.read(offset, bytes);
    const entries = new Uint32Array(this.header.numGtesPerGt);
    for (let i = 0; i < entries.length; i++) entries[i] = bytes.readUInt32LE(i * 4);
    return entries;
  }

  async map(offset: number, length: number, base: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const gdIndex = Math.floor(at / this.gtCoverage);
      const tableEnd = Math.min(end, (gdIndex + 1) * this.gtCoverage);
      const table = this.table(gdIndex);
      if (!table) {
        appendRun(runs, { kind: 'backing', guestOffset: base + at, length: tableEnd - at });
        at = tableEnd;
        continue;
      }
      const entries = await table;
      while (at < tableEnd) {
        const grainStart = at - (at % this.grainSize);
        const runEnd = Math.min(tableEnd, grainStart + this.grainSize);
        const entry = entries[Math.floor((at % this.gtCoverage) / this.grainSize)]!;
        appendRun(runs, this.grainRun(entry, grainStart, at, runEnd - at, base, gdIndex));
        at = runEnd;
      }
    }
    return runs;
  }

  private grainRun(entry: number, grainStart: number, at: number, length: number, base: number, gdIndex: number): Mapping {
    const guestOffset = base + at;
    if (entry === 0) return { kind: 'backing', guestOffset, length };
    if (entry === 1 && this.zeroGrains) return { kind: 'zero', guestOffset, length };
    if (entry < this.header.grainOffset) {
      // qemu would show the header, descriptor or tables as guest data; grains start at grain_offset
      throw new CorruptImageError(
        `${this.file.path}: VMDK grain table ${gdIndex} maps the grain at extent offset ${grainStart} to sector ${entry}, inside the metadata (grains start at sector ${this.header.grainOffset})`,
      );
    }
    const hostStart = entry * SECTOR;
    if (hostStart >= this.fileSize) {
      throw new CorruptImageError(
        `${this.file.path}: VMDK grain table ${gdIndex} maps the grain at extent offset ${grainStart} to sector ${entry}, past the end of the file (${this.fileSize} bytes)`,
      );
    }
    if (this.compressed) {
      const cluster: EncodedCluster = {
        key: `vmdk:${this.index}:${hostStart}`,
        guestStart: base + grainStart,
        decodedLength: Math.min(this.grainSize, this.length - grainStart),
        hostOffset: hostStart,
        // qemu reads two grains: the marker and the compressed data may be longer than one
        hostLength: Math.min(2 * this.grainSize, this.fileSize - hostStart),
      };
      return { kind: 'encoded', guestOffset, length, cluster };
    }
    const run: Mapping = { kind: 'data', guestOffset, length, hostOffset: hostStart + (at - grainStart) };
    if (!this.own) run.file = this.file;
    return run;
  }

  /** Decodes a compressed grain this extent mapped. */
  async decode(cluster: EncodedCluster): Promise<Buffer> {
    const where = `${this.file.path}: VMDK compressed grain at sector ${cluster.hostOffset / SECTOR} (guest offset ${cluster.guestStart})`;
    const stored = Buffer.alloc(cluster.hostLength);
    await this.file.read(cluster.hostOffset, stored);
    let data = stored.subarray(0, this.grainSize);
    if (this.markers) {
      const size = stored.length >= GRAIN_MARKER_BYTES ? stored.readUInt32LE(8) : 0;
      if (size === 0 || GRAIN_MARKER_BYTES + size > stored.length) {
        throw new CorruptImageError(`${where}: its marker gives ${size} bytes of compressed data (1 to ${stored.length - GRAIN_MARKER_BYTES} fit)`);
      }
      data = stored.subarray(GRAIN_MARKER_BYTES, GRAIN_MARKER_BYTES + size);
    }
    let decoded: Buffer;
    try {
      decoded = inflateSync(data, { maxOutputLength: this.grainSize });
    } catch (error) {
      throw new CorruptImageError(`${where} does not decode (${(error as Error).message})`);
    }
    if (decoded.length < cluster.decodedLength) {
      throw new CorruptImageError(`${where} decodes to ${decoded.length} bytes, fewer than the ${cluster.decodedLength} it must hold`);
    }
    return decoded.subarray(0, cluster.decodedLength);
  }

  info(): ExtentInfo {
    const info: ExtentInfo = { 'virtual-size': this.length, filename: this.file.path, format: this.type, 'cluster-size': this.grainSize };
    if (this.compressed) info.compressed = true;
    return info;
  }

  /** For check: the grain directory entries and a reader of grain tables (bounds checked). */
  get directory(): Uint32Array {
    return this.gd;
  }

  get fileBytes(): number {
    return this.fileSize;
  }

  grainTable(gdIndex: number): Promise<Uint32Array> | undefined {
    return this.table(gdIndex);
  }

  /** A grain was appended (writable.ts): the file now ends at least at `size`. */
  grewTo(size: number): void {
    this.fileSize = Math.max(this.fileSize, size);
  }

  /** After the entry was written to disk (writable.ts): the cached table, if any, follows. */
  async entryWritten(gdIndex: number, index: number, value: number): Promise<void> {
    const table = this.tables.get(gdIndex);
    if (table) (await table)[index] = value;
  }
}
