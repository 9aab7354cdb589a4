/**
 * QED address arithmetic and table entries: splitting a guest offset into
 * L1 index / L2 index / byte offset, reading and writing 64-bit table
 * entries, and the validity rules for cluster and table offsets that both
 * the I/O path and the consistency check apply.
 */
import type { QedHeader } from './header.js';
import { tableEntries } from './header.js';

/** An L1 or L2 table: table_size clusters of little-endian 64-bit offsets. */
export type Table = Buffer;

/** L2 entry value meaning "reads as zeros" (written by qemu for zero writes). */
export const ZERO_CLUSTER = 1;
/** Entry value above 2^53: cannot be a real offset; treated as invalid. */
export const INVALID_ENTRY = -1;

export class Geometry {
  readonly clusterSize: number;
  readonly entries: number;
  readonly tableBytes: number;
  /** Guest bytes covered by one L2 table. */
  readonly l2Span: number;
  /** First byte after the header clusters. */
  readonly headerBytes: number;

  constructor(header: QedHeader) {
    this.clusterSize = header.clusterSize;
    this.entries = tableEntries(header);
    this.tableBytes = header.tableSize * header.clusterSize;
    this.l2Span = this.entries * header.clusterSize;
    this.headerBytes = header.headerSize * header.clusterSize;
  }

  l1Index(offset: number): number {
    return Math.floor(offset / this.l2Span);
  }

  l2Index(offset: number): number {
    return Math.floor((offset % this.l2Span) / this.clusterSize);
  }

  clusterStart(offset: number): number {
    return offset - (offset % this.clusterSize);
  }

  /** A data cluster offset is valid when aligned, past the header and inside the file. */
  isValidClusterOffset(offset: number, fileSize: number): boolean {
    return offset >= 0 && offset % this.clusterSize === 0 && offset >= this.headerBytes && offset + this.clusterSize <= fileSize;
  }

  /** A table offset is valid when the whole table fits in the file (table_size 1 included). */
  isValidTableOffset(offset: number, fileSize: number): boolean {
    return offset >= 0 && offset % this.clusterSize === 0 && offset >= this.headerBytes && offset + this.tableBytes <= fileSize;
  }
}

/** Reads entry `index` of a table; INVALID_ENTRY when it does not fit a safe integer. */
export function getEntry(table: Table, index: number): number {
  const low = table.readUInt32LE(index * 8);
  const high = table.readUInt32LE(index * 8 + 4);
  if (high >= 0x200000) return INVALID_ENTRY;
  return high * 0x100000000 + low;
}

export function setEntry(table: Table, index: number, value: number): void {
  table.writeUInt32LE(value % 0x100000000, index * 8);
  table.writeUInt32LE(Math.floor(value / 0x100000000), index * 8 + 4);
}

/** The 512-byte-aligned byte range of a table that holds entries [first, first + count). */
export function sectorRangeOfEntries(first: number, count: number): { start: number; end: number } {
  const start = Math.floor((first * 8) / 512) * 512;
  const end = Math.ceil(((first + count) * 8) / 512) * 512;
  return { start, end };
}
